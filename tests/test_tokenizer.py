import json
import shutil
from pathlib import Path

import pytest

from mossserve.errors import CheckpointError, InvalidRequestError
from mossserve.text.tokenizer import TextTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "moss_tokenizer"
GOLDENS = json.loads((FIXTURES / "tokenizer_goldens.json").read_text(encoding="utf-8"))["items"]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_dir(FIXTURES)


@pytest.mark.parametrize("item", GOLDENS, ids=[f"{i}:{g['text'][:24]!r}" for i, g in enumerate(GOLDENS)])
def test_golden(tokenizer, item):
    assert tokenizer.encode(item["text"]) == item["ids"]
    assert tokenizer.tokens(item["text"]) == item["tokens"]
    assert tokenizer.decode(item["ids"]) == item["decode"]
    assert tokenizer.decode(item["ids"], skip_special_tokens=True) == item["decode_skip_special"]


def test_goldens_cover_special_tokens_and_scripts():
    texts = [g["text"] for g in GOLDENS]
    assert len(texts) >= 90
    assert any("<|im_end|>" in t for t in texts) and any("你好" in t for t in texts)


def test_added_tokens_are_matched_verbatim(tokenizer):
    assert tokenizer.encode("<|audio_start|><|audio_user_slot|>x") == [151652, 151654, 87]
    assert tokenizer.encode("<|im_start|>assistant\n") == [151644, 77091, 198]


def test_token_lookups(tokenizer):
    assert tokenizer.token_to_id("<|audio_assistant_delay_slot|>") == 151662
    assert tokenizer.id_to_token(151656) == "<|audio_assistant_gen_slot|>"
    assert tokenizer.id_to_token(151700) is None  # in the model's vocab, but no token
    assert tokenizer.token_to_id("<|no_such_token|>") is None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_no_special_tokens_added(tokenizer):
    assert tokenizer.encode("") == []
    assert tokenizer.encode("a") == [64]


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_file(tmp_path, missing):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if name != missing:
            shutil.copy(FIXTURES / name, tmp_path / name)
    with pytest.raises(CheckpointError, match=missing):
        TextTokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("corrupt", ["tokenizer.json", "tokenizer_config.json"])
def test_corrupt_file(tmp_path, corrupt):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    (tmp_path / corrupt).write_text('{"truncated": ', encoding="utf-8")
    with pytest.raises(CheckpointError, match=corrupt):
        TextTokenizer.from_dir(tmp_path)


def test_a_control_spelling_is_refused_whatever_its_special_flag(tmp_path):
    """Qwen3 flags <|fim_pad|> (id 151662) non-special, and MOSS-TTS reuses that id as its delay slot:
    with the flag off, typed '<|audio_assistant_delay_slot|>' became the slot id in the user turn."""
    data = json.loads((FIXTURES / "tokenizer.json").read_text(encoding="utf-8"))
    for token in data["added_tokens"]:
        if token["content"] == "<|audio_assistant_delay_slot|>":
            token["special"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    shutil.copy(FIXTURES / "tokenizer_config.json", tmp_path)
    tokenizer = TextTokenizer.from_dir(tmp_path)
    with pytest.raises(InvalidRequestError, match=r"input contains the special token\(s\) <\|audio_assistant_delay_slot\|>"):
        tokenizer.encode_user("hi <|audio_assistant_delay_slot|> there", "input")
    assert tokenizer.encode_user("<think> and <tool_call>", "input")  # plain added words, as the reference reads them

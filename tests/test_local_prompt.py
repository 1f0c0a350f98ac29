"""Local prompt matrices against upstream's processor goldens, and SpeechRequest -> conversation."""
from __future__ import annotations

import numpy as np
import pytest
from local_cases import (
    LOCAL_DIR,
    N_VQ,
    TOKENIZER_DIR,
    conversations,
    goldens,
    local_family,
    meta,
)

from mossserve.errors import InvalidRequestError
from mossserve.models.moss_local import SKIPPED
from mossserve.models.moss_local_config import MossLocalConfig
from mossserve.speech_request import SpeechRequest
from mossserve.text.delay_prompt import UserMessage
from mossserve.text.local_prompt import LocalPromptBuilder
from mossserve.text.tokenizer import TextTokenizer

CASES = list(meta("prompts")["cases"])


@pytest.fixture(scope="module")
def builder() -> LocalPromptBuilder:
    return LocalPromptBuilder(TextTokenizer.from_dir(TOKENIZER_DIR), MossLocalConfig.from_file(LOCAL_DIR / "config.json"))


@pytest.mark.parametrize("case", CASES)
def test_prompt_matrices_match_the_processor(builder: LocalPromptBuilder, case: str) -> None:
    batch, mode = conversations(case)
    ids, mask = builder(batch, mode)
    g = goldens("prompts")
    assert np.array_equal(ids, g[f"{case}.input_ids"])
    assert np.array_equal(mask, g[f"{case}.attention_mask"].astype(bool))


def test_every_prompt_case_is_checked() -> None:
    assert set(CASES) == {"tts_zh", "tts_en", "tts_pinyin", "clone", "clone_two_speakers_fields", "continuation",
                          "continuation_clone", "assistant_merge_placeholders", "batch_zh_clone2"}


def test_rendered_text_column(builder: LocalPromptBuilder) -> None:
    """The text column decodes to upstream's rendered string (generation mode opens the audio)."""
    info = meta("prompts")["cases"]["clone"]
    batch, mode = conversations("clone")
    ids, _ = builder(batch, mode)
    assert ids[0, :, 0].tolist() == info["text_column_ids"][0]
    assert ids[0, -1, 0] == 151652 and (ids[0, -1, 1:] == 1024).all()


def _golden_rows(case: str) -> np.ndarray:
    g = goldens("prompts")
    mask = g[f"{case}.attention_mask"][0].astype(bool)
    return g[f"{case}.input_ids"][0][mask]


@pytest.mark.parametrize("case,request_fields", [
    ("tts_en", {"input": "Hello there! This is a tiny test of the MOSS local transformer."}),
    ("tts_zh", {"input": "今天天气真不错，我们一起去公园散步吧。"}),
    ("tts_pinyin", {"input": "nin2 hao3，qing3 wen4 nin2 lai2 zi4 na3 zuo4 cheng2 shi4？", "language": "Chinese"}),
    ("clone", {"input": "Please read this sentence in the reference voice.", "voice": "clone"}),
])
def test_speech_requests_build_the_processor_prompts(case: str, request_fields: dict) -> None:
    fields = dict(request_fields)
    if "voice" in fields:
        fields["voice"] = goldens("prompts")[f"ref.{fields['voice']}"]
    prompt = local_family(with_tokenizer=True).build_prompt(SpeechRequest(**fields))
    assert np.array_equal(prompt.rows, _golden_rows(case))
    assert prompt.start_length == 0 and prompt.info["depth"] == N_VQ and "codebooks" not in prompt.info


def test_request_fields_fill_the_template() -> None:
    """Instruction, duration tokens and language land in the user template; continuation puts the
    voice in the reference and as the assistant's prefix, with the transcript before the text."""
    fam = local_family(with_tokenizer=True)
    voice = goldens("prompts")["ref.cont"]
    prompt = fam.build_prompt(SpeechRequest(input="Hello.", instructions=" Speak slowly. ", duration_tokens=40,
                                            language="English"))
    text = fam.tokenizer.decode(prompt.rows[:, 0].tolist())
    assert "- Instruction:\nSpeak slowly.\n- Tokens:\n40\n" in text and "- Language:\nEnglish\n" in text
    cont = fam.build_prompt(SpeechRequest(input="And more.", voice=voice, reference_text="Some words."))
    assert cont.start_length == len(voice)
    assert np.array_equal(cont.rows[-len(voice):, 1:], voice)
    assert (cont.rows[-len(voice):, 0] == 151656).all()
    assert "Some words. And more." in fam.tokenizer.decode(cont.rows[:, 0].tolist())


def test_depth_masks_channels_above_k_and_keeps_the_matrix() -> None:
    fam = local_family(with_tokenizer=True)
    prompt = fam.build_prompt(SpeechRequest(input="Hi.", voice=goldens("prompts")["ref.clone"], depth=8))
    assert prompt.info["depth"] == prompt.info["codebooks"] == 8
    assert (prompt.rows[:, 9:] == SKIPPED).all()
    assert np.array_equal(prompt.rows[:, :9], prompt.info["matrix"][:, :9])
    assert (prompt.info["matrix"][:, 9:] != SKIPPED).all()
    again = fam.with_depth(prompt, 16)  # always derived from the processor's matrix
    assert np.array_equal(again.rows[:, :17], prompt.info["matrix"][:, :17]) and (again.rows[:, 17:] == SKIPPED).all()


@pytest.mark.parametrize("depth", [0, 33, -1, 2.5, True])
def test_depth_out_of_range_is_refused(depth) -> None:
    fam = local_family(with_tokenizer=True)
    prompt = fam.prompt_from_rows(_golden_rows("tts_en"))
    with pytest.raises(InvalidRequestError, match="depth must be an integer in 1..32"):
        fam.with_depth(prompt, depth)


@pytest.mark.parametrize("fields,message", [
    ({"input": "x", "task": "dialogue"}, "only the tts task"),
    ({"input": "[S1] x", "speakers": [{"voice": None}]}, "speakers"),
    ({"input": "x", "reference_text": "y"}, "give the voice too"),
    # typed text that spells a control token or the builder's placeholder
    ({"input": "x <|im_end|>"}, r"input contains the special token\(s\) <\|im_end\|>"),
    ({"input": "x", "language": "<|audio_start|>"}, r"language contains the special token\(s\) <\|audio_start\|>"),
    ({"input": "x <|audio|>"}, r"input contains <\|audio\|>"),
    # each field allowed, joined by the template (a typed "{language}" takes the language's text)
    ({"input": "Hi.", "instructions": "<|im_{language}", "language": "end|>"},
     r"the prompt's user text \(the request's text fields as its template joins them\) contains the special "
     r"token\(s\) <\|im_end\|>"),
])
def test_unsupported_requests_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        local_family(with_tokenizer=True).build_prompt(SpeechRequest(**fields))


def test_delay_requests_refuse_depth() -> None:
    from mossserve.text.delay_requests import delay_conversation

    with pytest.raises(InvalidRequestError, match="depth is used only by the Local model"):
        delay_conversation(SpeechRequest(input="x", depth=4), n_vq=32, audio_vocab_size=1024)
    with pytest.raises(InvalidRequestError, match="depth must be an integer, got 2.5"):
        SpeechRequest(input="x", depth=2.5)
    for depth in (0, -1, 33):  # the range is the model's: one message whatever side of it
        with pytest.raises(InvalidRequestError, match=f"depth must be an integer in 1..32 .*got {depth}"):
            local_family(with_tokenizer=True).build_prompt(SpeechRequest(input="x", depth=depth))


def test_moss_families_refuse_fish_chunk_length() -> None:
    from mossserve.text.delay_requests import delay_conversation

    with pytest.raises(InvalidRequestError, match="chunk_length is used only by Fish S2 Pro"):
        delay_conversation(SpeechRequest(input="x", chunk_length=40), n_vq=32, audio_vocab_size=1024)
    with pytest.raises(InvalidRequestError, match="chunk_length is used only by Fish S2 Pro"):
        local_family(with_tokenizer=True).build_prompt(SpeechRequest(input="x", chunk_length=40))


# Upstream's Local processor fills the template with the text as given (only the Delay one normalizes):
# line breaks, dash runs and ellipses stay what they are.
RAW_TEXTS = ["亲爱的你，\n你好呀。", "Hello -- world... (aside)", "Line one.\n\nLine two…… done"]


def _template_ids(text: str, tokenizer: TextTokenizer) -> list[int]:
    """The text column of upstream's `tts_en` prompt with its text replaced by `text`."""
    info = meta("prompts")["cases"]["tts_en"]
    golden_text = "Hello there! This is a tiny test of the MOSS local transformer."
    assert f"- Text:\n{golden_text}\n</user_inst>" in info["rendered_messages"][0][0]
    return tokenizer.encode(info["rendered_messages"][0][0].replace(golden_text, text)) + [151652]


@pytest.mark.parametrize("text", RAW_TEXTS)
def test_request_text_is_not_normalized(text: str) -> None:
    fam = local_family(with_tokenizer=True)
    prompt = fam.build_prompt(SpeechRequest(input=text))
    assert prompt.rows[:, 0].tolist() == _template_ids(text, fam.tokenizer)


@pytest.mark.parametrize("text", RAW_TEXTS)
def test_conversation_file_text_is_normalized_by_delay_only(builder: LocalPromptBuilder, text: str) -> None:
    """A conversation file's role-dict text is read before the model is known: the Local builder takes it
    as given, the Delay builder (same config and tokenizer) normalizes it, as their processors do."""
    from mossserve.text.conversation import parse_conversations
    from mossserve.text.delay_prompt import DelayPromptBuilder
    from mossserve.text.normalizer import normalize_tts_text

    [conversation] = parse_conversations([{"role": "user", "text": text}])
    assert builder.build(conversation)[:, 0].tolist() == _template_ids(text, builder.tokenizer)
    assert normalize_tts_text(text) != text
    delay = DelayPromptBuilder(builder.tokenizer, builder.config).build(conversation)
    expected = builder.tokenizer.encode(builder.templated("user", UserMessage(normalize_tts_text(text)).content, True))
    assert delay[:, 0].tolist() == expected


def test_whitespace_only_input_is_still_refused() -> None:
    with pytest.raises(InvalidRequestError, match="input is empty"):
        local_family(with_tokenizer=True).build_prompt(SpeechRequest(input=" \n\t "))


@pytest.mark.parametrize("transcript,text,joined", [
    ("太阳系八大行星之一。", "它离太阳第四近。", "太阳系八大行星之一。它离太阳第四近。"),
    ("Some words.", "And more.", "Some words. And more."),
    ("Hello", "世界", "Hello世界"),
    ("你好", "world", "你好world"),
    ("Ｈｉ！", "again", "Ｈｉ！again"),  # full-width forms
    ("Hi 123", "go", "Hi 123 go"),
])
def test_continuation_joins_transcript_and_text(transcript: str, text: str, joined: str) -> None:
    """No normalizer removes a space again: none where either side of the join is CJK or full-width."""
    fam = local_family(with_tokenizer=True)
    voice = goldens("prompts")["ref.cont"]
    prompt = fam.build_prompt(SpeechRequest(input=text, voice=voice, reference_text=transcript))
    assert f"- Text:\n{joined}\n</user_inst>" in fam.tokenizer.decode(prompt.rows[:, 0].tolist())


def test_typed_text_is_checked_as_the_model_reads_it() -> None:
    """A zero-width space inside a special token's spelling keeps it plain text here (no normalizer removes
    it, as the Delay one would), so it is allowed; the spelling itself is still refused."""
    fam = local_family(with_tokenizer=True)
    prompt = fam.build_prompt(SpeechRequest(input="a <|im_\u200bend|> b"))
    assert prompt.rows[:, 0].tolist() == _template_ids("a <|im_\u200bend|> b", fam.tokenizer)
    with pytest.raises(InvalidRequestError, match="special token"):
        fam.build_prompt(SpeechRequest(input="a <|im_end|> b"))

"""Delay prompt builder and the conversation JSON form against the reference processor's goldens."""
import json
from pathlib import Path

import numpy as np
import pytest

from mossserve.errors import CheckpointError, InvalidRequestError
from mossserve.models.moss_delay_config import MossDelayConfig
from mossserve.text.conversation import load_conversations, parse_conversations
from mossserve.text.delay_prompt import (
    AssistantMessage,
    DelayPromptBuilder,
    UserMessage,
    build_assistant_message,
    build_user_message,
    message_parts,
)
from mossserve.models.delay_pattern import delay_pattern
from mossserve.text.tokenizer import TextTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = TextTokenizer.from_dir(FIXTURES / "moss_tokenizer")
BUILDERS = {
    n: DelayPromptBuilder(TOKENIZER, MossDelayConfig.from_file(FIXTURES / "moss_tts_delay" / f"tiny_nvq{n}" / "config.json"))
    for n in (32, 16)
}
GOLDENS = {n: json.loads((FIXTURES / "moss_tokenizer" / f"prompts_nvq{n}.json").read_text(encoding="utf-8")) for n in (32, 16)}
ARRAYS = {n: np.load(FIXTURES / "moss_tokenizer" / f"prompts_nvq{n}.npz") for n in (32, 16)}
CASES = [(n, case) for n in (32, 16) for case in GOLDENS[n]["cases"]]
CASE_IDS = [f"nvq{n}-{case['id']}" for n, case in CASES]


def array(n: int, case: dict, key: str) -> np.ndarray:
    return ARRAYS[n][f"{case['id']}/{key}"]


def golden_message(n: int, case: dict, m: dict):
    """The case's raw input message, in the form its `kind` names."""
    fields = dict(m.get("fields") or {})
    if "reference" in m:
        fields["reference"] = [None if r is None else array(n, case, r) for r in m["reference"]]
    codes = [array(n, case, k) for k in m.get("audio_codes", [])]
    kind = m["kind"]
    if kind == "user":
        return build_user_message(**fields)
    if kind == "user_dict":
        return {"role": "user", **fields}
    if kind == "user_dataclass":
        return UserMessage(**fields)
    if kind == "prebuilt":
        return {"role": m["role"], "content": m["content_arg"], "audio_codes_list": codes}
    if kind == "assistant":
        if m.get("content_arg") is not None:
            return build_assistant_message(codes, content=m["content_arg"])
        return build_assistant_message(codes)
    raise AssertionError(f"unknown message kind {kind}")


def golden_conversations(n: int, case: dict) -> list:
    return [[golden_message(n, case, m) for m in conversation] for conversation in case["conversations"]]


def test_all_cases_present():
    expected = {"zh_plain", "clone_zh", "clone_short_reference", "continuation_multi_turn", "computing_loss",
                "merge_consecutive_placeholders", "batch_left_padding", "raw_dict_user",
                "dataclass_user_no_normalization", "prebuilt_content", "no_chat_template", "ttsd_partial_reference"}
    for n in (32, 16):
        ids = {c["id"] for c in GOLDENS[n]["cases"]}
        assert expected <= ids and len(ids) == 41
        assert BUILDERS[n].n_vq == GOLDENS[n]["n_vq"] == n


@pytest.mark.parametrize("n,case", CASES, ids=CASE_IDS)
def test_matrix(n, case):
    input_ids, attention_mask = BUILDERS[n](golden_conversations(n, case), mode=case["mode"], **case["processor_call_kwargs"])
    expected_ids, expected_mask = array(n, case, "input_ids"), array(n, case, "attention_mask")
    assert input_ids.dtype == np.int64 and attention_mask.dtype == np.bool_
    assert input_ids.shape == expected_ids.shape == tuple(case["shape"])
    np.testing.assert_array_equal(input_ids, expected_ids)
    np.testing.assert_array_equal(attention_mask, expected_mask)


@pytest.mark.parametrize("n,case", CASES, ids=CASE_IDS)
def test_intermediates(n, case):
    builder = BUILDERS[n]
    template = case["processor_call_kwargs"].get("apply_chat_template", True)
    for conversation in case["conversations"]:
        for i, m in enumerate(conversation):
            if "normalized_text" in m:
                assert build_user_message(**m["fields"]).text == m["normalized_text"]
            role, content, codes = message_parts(golden_message(n, case, m))
            assert (role, content) == (m["role"], m["content"])
            generation_prompt = case["mode"] == "generation" and i == len(conversation) - 1
            templated = builder.templated(role, content, generation_prompt) if template else content
            assert templated == m["templated"]
            expanded, merged = builder.expand(role, templated, [np.asarray(c) for c in codes])
            assert expanded == m["expanded"]
            assert len(TOKENIZER.encode(expanded)) == m["expanded_token_count"]
            truncate = case["mode"] == "continuation" and role == "assistant"
            assert len(builder.rows(expanded, merged, truncate)) == m["unified_rows"]


def test_build_one_conversation_and_input_forms():
    n, builder = 32, BUILDERS[32]
    case = next(c for c in GOLDENS[n]["cases"] if c["id"] == "continuation_clone")
    [conversation] = golden_conversations(n, case)
    matrix = builder.build(conversation, mode="continuation")
    np.testing.assert_array_equal(matrix, array(n, case, "input_ids")[0])
    # A single message is a conversation; a message at the top level of a list is one too.
    case = next(c for c in GOLDENS[n]["cases"] if c["id"] == "batch_left_padding")
    flat = [conversation[0] for conversation in golden_conversations(n, case)]
    np.testing.assert_array_equal(builder(flat)[0], array(n, case, "input_ids"))
    single = builder(flat[1])[0]
    np.testing.assert_array_equal(single[0], builder.build([flat[1]]))


def test_delay_pattern_by_hand():
    codes = np.array([[1, 2, 3], [4, 5, 6]])
    P = 9
    expected = np.array([[1, P, P], [4, 2, P], [P, 5, 3], [P, P, 6]])
    np.testing.assert_array_equal(delay_pattern(codes, P), expected)


def test_nested_list_codes_accepted():
    builder = BUILDERS[16]
    codes = np.arange(3 * 16).reshape(3, 16)
    message = build_user_message(text="Hi.", reference=[codes.tolist()])
    np.testing.assert_array_equal(builder.build(message), builder.build(build_user_message(text="Hi.", reference=codes)))


# ----------------------------------------------------------------------------- errors

def codes16(frames: int = 3) -> np.ndarray:
    return np.zeros((frames, 16), dtype=np.int64)


@pytest.mark.parametrize(
    "conversation,mode,match",
    [
        ([build_user_message(text="a", reference=codes16(0))], "generation", "zero frames"),
        ([build_user_message(text="a", reference=codes16()[:, :8])], "generation", "n_vq=16"),
        ([build_user_message(text="a", reference=codes16() + 1024)], "generation", "0..1023"),
        ([build_user_message(text="a", reference=codes16() - 1)], "generation", "0..1023"),
        ([build_user_message(text="a", reference=codes16().astype(float))], "generation", "integers"),
        ([build_user_message(text="a", reference="voice.wav")], "generation", "codec"),
        ([build_user_message(text="a", reference=np.zeros(16, dtype=int))], "generation", "2-D"),
        ([build_user_message(text="a <|audio|>", reference=codes16())], "generation", "placeholder"),
        ([build_user_message(text="<|audio_start|>", reference=codes16())], "generation", "do not match"),
        ([{"role": "user", "content": "<|audio|>", "audio_codes_list": []}], "generation", "placeholder"),
        ([build_user_message(text="a"), build_assistant_message([codes16()])], "generation", "odd number"),
        ([build_user_message(text="a"), build_assistant_message([codes16()]), build_assistant_message([codes16()])],
         "generation", "ending with a user"),
        ([build_user_message(text="a")], "continuation", "even number"),
        ([build_user_message(text="a"), build_user_message(text="b")], "continuation", "ending with an assistant"),
        ([build_user_message(text="a")], "computing_loss", "even number"),
        ([], "generation", "at least one message"),
        ([build_user_message(text="a")], "training", "mode must be"),
        ([{"role": "system", "content": "x", "audio_codes_list": []}], "generation", "role"),
        ([{"role": "user", "text": "a", "speed": 2}], "generation", "speed"),
        ([{"role": "user", "content": "a"}], "generation", "content"),
        ([{"role": "assistant", "audio_codes_list": [codes16()], "extra": 1}], "continuation", "extra"),
        ([build_user_message(text="a"), build_assistant_message([None])], "continuation", "codes"),
        ([UserMessage(text="a", reference=codes16())], "generation", "must be a list"),
        (["hello"], "generation", "UserMessage"),
        ([build_user_message(text="a"), {"role": "assistant", "content": "<|audio|>", "audio_codes_list": codes16()}],
         "continuation", "list audio_codes_list"),
        ([{"role": "user", "text": 3}], "generation", "text must be a string"),
    ],
)
def test_errors(conversation, mode, match):
    with pytest.raises(InvalidRequestError, match=match):
        BUILDERS[16].build(conversation, mode=mode)


def test_assistant_message_needs_a_list():
    with pytest.raises(InvalidRequestError, match="list of code tensors"):
        build_assistant_message(codes16())


def test_n_vq_argument_is_a_consistency_check():
    conversation = [build_user_message(text="a", reference=codes16())]
    assert BUILDERS[16].build(conversation, n_vq=16).shape[1] == 17
    with pytest.raises(InvalidRequestError, match="n_vq=8"):
        BUILDERS[16].build(conversation, n_vq=8)


def test_empty_batch_rejected():
    with pytest.raises(InvalidRequestError):
        BUILDERS[16]([])


def test_tokenizer_without_configured_token():
    config = MossDelayConfig.from_dict({**json.loads((FIXTURES / "moss_tts_delay" / "tiny_nvq16" / "config.json").read_text()),
                                        "audio_user_slot_token_id": 151700})
    with pytest.raises(CheckpointError, match="151700"):
        DelayPromptBuilder(TOKENIZER, config)


# ----------------------------------------------------------------------------- conversation JSON

def json_message(n: int, case: dict, m: dict, tmp_path: Path, inline: bool):
    """A fixture message in the JSON form: codes inline, or as .npy files beside the JSON."""

    def entry(key):
        if key is None:
            return None
        codes = array(n, case, key)
        if inline:
            return codes.tolist()
        np.save(tmp_path / f"{key}.npy", codes)
        return f"{key}.npy"

    if m["kind"] == "user":
        message = {"role": "user", **m["fields"]}
        if "reference" in m:
            message["reference"] = [entry(r) for r in m["reference"]]
        return message
    assert m["kind"] == "assistant"
    message = {"role": "assistant", "audio_codes_list": [entry(k) for k in m["audio_codes"]]}
    if m.get("content_arg") is not None:
        message["content"] = m["content_arg"]
    return message


JSON_CASES = ["clone_zh", "all_fields", "continuation_clone", "ttsd_partial_reference", "multi_turn_generation",
              "merge_consecutive_placeholders", "batch_left_padding", "sound_effect_duration", "reference_all_none"]


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "npy"])
@pytest.mark.parametrize("case_id", JSON_CASES)
def test_conversation_json_round_trip(tmp_path, monkeypatch, case_id, inline):
    n = 16
    case = next(c for c in GOLDENS[n]["cases"] if c["id"] == case_id)
    data = [[json_message(n, case, m, tmp_path, inline) for m in conv] for conv in case["conversations"]]
    if len(data) == 1 and case_id != "all_fields":  # one conversation may be written without the batch list
        data = data[0]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative .npy paths resolve beside the JSON file
    input_ids, attention_mask = BUILDERS[n](load_conversations(path), mode=case["mode"])
    np.testing.assert_array_equal(input_ids, array(n, case, "input_ids"))
    np.testing.assert_array_equal(attention_mask, array(n, case, "attention_mask"))


def test_conversation_single_entries_and_cwd_paths(tmp_path, monkeypatch):
    n = 16
    case = next(c for c in GOLDENS[n]["cases"] if c["id"] == "continuation_clone")
    voice = array(n, case, "conv0.msg0.reference0")
    np.save(tmp_path / "voice.npy", voice)
    monkeypatch.chdir(tmp_path)
    text = case["conversations"][0][0]["fields"]["text"]
    data = [{"role": "user", "text": text, "reference": "voice.npy"}, {"role": "assistant", "audio_codes": voice.tolist()}]
    [conversation] = parse_conversations(data, base_dir=None)
    np.testing.assert_array_equal(BUILDERS[n]([conversation], mode="continuation")[0], array(n, case, "input_ids"))
    # an audio path goes through the codec
    calls = []
    wav = FIXTURES / "audio" / "reference_zh.wav"
    data[0]["reference"] = str(wav)
    [conversation] = parse_conversations(data, encode_voice=lambda p: calls.append(p) or voice)
    assert calls == [wav]
    np.testing.assert_array_equal(BUILDERS[n].build(conversation, mode="continuation"), array(n, case, "input_ids")[0])


@pytest.mark.parametrize(
    "data,match",
    [
        ([{"role": "user", "text": "a", "speed": 1}], "speed"),
        ([{"role": "user", "tokens": "12"}], r"conversation\[0\]\.tokens"),
        ([{"role": "user", "tokens": True}], "tokens"),
        ([{"role": "user", "text": "Hi.", "tokens": -5}], r"tokens must be a positive integer or null, got -5"),
        ([{"role": "user", "text": 5}], r"\.text must be a string"),
        ([{"role": "user", "language": ["en"]}], "language"),
        ([{"role": "narrator", "text": "a"}], "role"),
        ([{"text": "a"}], "role"),
        (["a"], "object"),
        ([], "non-empty"),
        ({"role": "user"}, "list"),
        ([[{"role": "user", "text": "a"}], []], r"conversation\[1\] has no messages"),
        ([{"role": "user", "reference": "missing.npy"}], "not found"),
        ([{"role": "user", "reference": "missing.wav"}], "not found"),
        ([{"role": "user", "reference": [[[1.5, 2]]]}], "integers"),
        ([{"role": "user", "reference": 7}], "reference"),
        ([{"role": "user", "reference": [[1, 2], [3]]}], "reference"),
        ([{"role": "user"}, {"role": "assistant", "audio_codes_list": [None]}], "null"),
        ([{"role": "user"}, {"role": "assistant", "audio_codes": [[1]], "audio_codes_list": [[[1]]]}], "not both"),
        ([{"role": "user"}, {"role": "assistant", "audio_codes": [[1]], "content": 3}], "content"),
        ([{"role": "user"}, {"role": "assistant", "audio_codes": [[1]], "text": "x"}], "text"),
    ],
)
def test_conversation_json_errors(data, match):
    with pytest.raises(InvalidRequestError, match=match):
        parse_conversations(data)


def test_conversation_audio_path_needs_codec():
    data = [{"role": "user", "text": "a", "reference": str(FIXTURES / "audio" / "reference_zh.wav")}]
    with pytest.raises(InvalidRequestError, match="codec"):
        parse_conversations(data)


def test_conversation_file_errors(tmp_path):
    with pytest.raises(InvalidRequestError, match="not found"):
        load_conversations(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("[{", encoding="utf-8")
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        load_conversations(tmp_path / "bad.json")


def test_conversation_messages_are_normalized_like_role_dicts():
    [[message]] = parse_conversations([[{"role": "user", "text": "a,\nb"}]])
    assert isinstance(message, UserMessage) and message.text == "a,。b"
    [[_, assistant]] = parse_conversations([[{"role": "user"}, {"role": "assistant", "audio_codes": [[1, 2]]}]])
    assert isinstance(assistant, AssistantMessage) and assistant.audio_codes_list[0].shape == (1, 2)


def test_an_assistant_content_without_its_placeholders_says_what_it_needs() -> None:
    codes = [[1] * 16] * 3
    [conversation] = parse_conversations([{"role": "user", "text": "Hello."},
                                          {"role": "assistant", "audio_codes": codes, "content": "x"}], base_dir=None)
    with pytest.raises(InvalidRequestError, match=r"the assistant message's content has 0 <\|audio\|> placeholders "
                                                  r"for 1 code tensors: it needs one per tensor"):
        BUILDERS[16].build(conversation, mode="continuation")


def test_an_assistant_message_without_content_gets_one_placeholder_per_tensor(tmp_path):
    """docs/cli.md: adjacent placeholders join into one block, so codes split in two build the golden prompt."""
    n = 16
    case = next(c for c in GOLDENS[n]["cases"] if c["id"] == "continuation_clone")
    data = [json_message(n, case, m, tmp_path, inline=True) for m in case["conversations"][0]]
    [codes] = data[1]["audio_codes_list"]
    assert "content" not in data[1] and len(codes) > 2
    data[1]["audio_codes_list"] = [codes[:2], codes[2:]]
    [conversation] = parse_conversations(data, base_dir=None)
    np.testing.assert_array_equal(BUILDERS[n]([conversation], mode="continuation")[0], array(n, case, "input_ids"))

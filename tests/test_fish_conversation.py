"""`--conversation` on Fish S2 Pro (text/fish_conversation.py): the reference's growing conversation
given up to the text to speak (README 3.4). Earlier batches with their codes must give the
reference's prompt of the next batch, and the next batch's greedy codes are the golden's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import AUDIO_DIR
from fish_cases import FISH_DIR, GREEDY, family, gen_case, npz, prompts_json

from mossserve import TTS
from mossserve.cli import main
from mossserve.errors import InvalidRequestError


def batch_text(case: str, batch: int) -> str:
    return prompts_json()[case]["batches"][batch]["batch_text"]


def multi_speaker_conversation() -> list:
    """Batch 0's text and codes, then batch 1's text: what the reference had when it built batch 1."""
    return [{"role": "user", "text": batch_text("multi_speaker", 0)},
            {"role": "assistant", "audio_codes": gen_case("multi_speaker").codes[0].tolist()},
            {"role": "user", "text": batch_text("multi_speaker", 1)}]


def write(tmp_path: Path, data) -> str:
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    return str(path)


def say_codes(tmp_path: Path, data) -> np.ndarray:
    out = tmp_path / "codes.npy"
    assert main(["say", "--model", str(FISH_DIR), "--conversation", write(tmp_path, data), "--greedy",
                 "--codes-out", str(out)]) == 0
    return np.load(out)


def test_earlier_batches_give_the_reference_prompt_of_the_next(tmp_path: Path) -> None:
    case = gen_case("multi_speaker")
    [prompt] = family().conversation_prompts(multi_speaker_conversation(), None, None)
    assert np.array_equal(prompt.rows, case.prompts[1]) and prompt.info["continuations"] == []
    rows = tmp_path / "prompt.npy"
    assert main(["prompt", "--model", str(FISH_DIR), "--conversation", write(tmp_path, multi_speaker_conversation()),
                 "-o", str(rows)]) == 0
    assert np.array_equal(np.load(rows), case.prompts[1])
    assert np.array_equal(say_codes(tmp_path, multi_speaker_conversation()), case.codes[1])


def test_the_last_message_is_spoken_in_batches_as_a_request_input(tmp_path: Path) -> None:
    text = prompts_json()["multi_speaker"]["text"]
    codes = say_codes(tmp_path, {"conversations": [{"role": "user", "text": text}], "chunk_length": 40})
    assert np.array_equal(codes, np.concatenate(gen_case("multi_speaker").codes))


def test_references_are_the_system_message_of_a_clone(tmp_path: Path) -> None:
    clone = prompts_json()["clone"]
    voice = npz("codec_encode")["codes"][:, 0:12].T.copy()
    np.save(tmp_path / "voice.npy", voice)
    data = {"references": [{"text": clone["prompt_text"][0], "audio_codes": "voice.npy"}],
            "conversations": [{"role": "user", "text": clone["text"]}]}
    [prompt] = family().conversation_prompts(data, tmp_path, None)
    assert np.array_equal(prompt.rows, gen_case("clone").prompts[0])
    assert np.array_equal(say_codes(tmp_path, data), np.concatenate(gen_case("clone").codes))


def test_audio_files_are_encoded_by_the_codec() -> None:
    speech = str(AUDIO_DIR / "reference_en.m4a")
    with TTS.from_pretrained(FISH_DIR) as tts:
        codes = tts.encode_voice(Path(speech)).tolist()
        by_audio = [{"role": "user", "text": "Hello."}, {"role": "assistant", "wav": speech},
                    {"role": "user", "text": "Again."}]
        by_codes = [by_audio[0], {"role": "assistant", "audio_codes": codes}, by_audio[2]]
        [a] = tts.talker.conversation_prompts(by_audio, None, None, tts.encode_voice)
        [b] = tts.talker.conversation_prompts(by_codes, None, None)
        assert np.array_equal(a.rows, b.rows) and len(codes) > 10
        assert tts.generate_codes(a, GREEDY, 4).shape[1] == tts.talker.codebooks
    with pytest.raises(InvalidRequestError, match="needs the codec"):
        family().conversation_prompts(by_audio, None, None)


@pytest.mark.parametrize("data, message", [
    ([{"role": "user", "text": "Hi."}, {"role": "assistant", "audio_codes": [[1] * 10] * 3}],
     "ends with the user's message"),
    ([{"role": "assistant", "audio_codes": [[1] * 10] * 3}, {"role": "user", "text": "Hi."}],
     r"conversations\[0\]: messages alternate user, assistant"),
    ([{"role": "user", "text": "Hi."}, {"role": "user", "text": "Hello?"}], "this one is the user's"),
    ([{"role": "user", "text": "Hi."}, {"role": "assistant"}, {"role": "user", "text": "Hello?"}],
     r"conversations\[1\]: give the audio as audio_codes"),
    ([{"role": "user", "text": "Hi."}, {"role": "assistant", "audio_codes": [[1] * 4] * 3},
      {"role": "user", "text": "Hello?"}], r"conversations\[1\]: codes must have shape"),
    ([{"role": "user", "text": "<|speaker:0|>"}], r"conversations\[0\].text holds speaker tags and no text"),
    ([{"role": "user", "text": "Hi."}, {"role": "assistant", "audio_codes": [[1] * 10] * 3},
      {"role": "user", "text": "Hi <|im_end|>"}], r"conversations\[2\].text"),
    ({"conversations": [{"role": "user", "text": "Hi."}], "references": [{"text": "<|speaker:0|> ",
                                                                          "audio_codes": [[1] * 10] * 3}]},
     r"references\[0\].text is speaker tags alone"),
    ({"conversations": [{"role": "user", "text": "Hi."}], "references": [{"text": "Hello.",
                                                                          "audio_codes": [[1] + [9999] * 9] * 3}]},
     r"references\[0\]: codes must lie in"),
    ([{"role": "user", "text": "Hi.", "voice": "a.wav"}], "unknown user field"),
    ({"conversations": [{"role": "user", "text": "Hi."}], "chunk_length": 0}, "chunk_length must be a positive"),
    ({"conversations": [{"role": "user", "text": "Hi."}], "references": [{"audio_codes": [[1] * 10] * 3}]},
     r"references\[0\].text must be a non-empty string"),
])
def test_bad_conversations_are_refused_clearly(data, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        family().conversation_prompts(data, None, None)


def test_continuation_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="does not continue"):
        family().conversation_prompts([{"role": "user", "text": "Hi."}], None, "continuation")


def test_a_conversation_too_long_for_its_last_batch_is_refused_before_it_runs() -> None:
    """Earlier codes fill most of the prompt; the first batch to generate fits, but the last one's
    prompt would exceed the limit before any audio of its own (as the request path refuses)."""
    limit = family().builder().prompt_limit
    codes = np.ones((limit - 100, 10), dtype=np.int64).tolist()
    text = "".join(f"<|speaker:{i % 2}|>Sentence number {i} is here." for i in range(12))
    data = {"conversations": [{"role": "user", "text": "Hi."}, {"role": "assistant", "audio_codes": codes},
                              {"role": "user", "text": text}], "chunk_length": 40}
    with pytest.raises(InvalidRequestError, match=r"batch \d+ \(text alone, before any generated audio\).*"
                                                  "shorten the conversation, the text"):
        family().conversation_prompts(data, None, None)
    first_only = {**data, "conversations": data["conversations"][:2] + [{"role": "user", "text": "Bye."}]}
    assert family().conversation_prompts(first_only, None, None)[0].rows.shape[0] < limit


def test_a_list_holding_one_list_of_messages_is_that_list() -> None:
    messages = multi_speaker_conversation()
    [a] = family().conversation_prompts([messages], None, None)
    assert np.array_equal(a.rows, gen_case("multi_speaker").prompts[1])

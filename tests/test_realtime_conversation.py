"""`--conversation` on the Realtime family (text/realtime_conversation.py): upstream's fine-tuning
record read as the context of the turn to speak. Earlier turns with their given audio must give
exactly the context the reference's session had built when it spoke the last turn (README §5.7),
so the last turn's greedy frames are the golden's; a continuation goes on from given frames."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CODEC_DIR, STREAMED_VS_WHOLE_ATOL
from realtime_cases import REALTIME_DIR, golden, realtime_family
from test_realtime_session import script

from mossserve import TTS, SessionScript
from mossserve.cli import main
from mossserve.errors import InvalidRequestError
from mossserve.sampling import SamplingParams

TEXT_PAD = 151655  # <|text_pad|>
STREAM_RUNS = ["stream_multiturn", "stream_text_only_short", "stream_zh_user_short_text"]


def frames(run: str, turn: int) -> np.ndarray:
    """The turn's frames as the reference session returned them, without the EOS frame."""
    return golden("generation")[f"{run}.turn{turn}.frames"].numpy()[:-1]


def conversation(run: str) -> dict:
    """The golden session as a conversation: each turn's user message and the assistant's text as the
    reference got it (pieces or token chunks); earlier turns carry the audio the reference generated."""
    session = script(run)
    messages = []
    for index, turn in enumerate(session["turns"]):
        if "user_text" in turn:
            messages.append({"role": "user", "text": turn["user_text"],
                             **({"audio_codes": turn["user_audio"]} if "user_audio" in turn else {})})
        text = {"text_tokens": turn["input_tokens"]} if "input_tokens" in turn else {"text": turn["input"]}
        audio = {"audio_codes": frames(run, index).tolist()} if index + 1 < len(session["turns"]) else {}
        messages.append({"role": "assistant", **text, **audio})
    return {"ref_audio_codes": session["voice"], "conversations": messages} if "voice" in session else messages


def context(run: str) -> np.ndarray:
    """What the reference's backbone had seen when the last turn's prefill ran."""
    g = golden("generation")
    key = f"{run}.turn1.context_input_ids"
    return (g[key] if key in g else g[f"{run}.turn0.prefill_input_ids"]).numpy()


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


@pytest.mark.parametrize("run", STREAM_RUNS)
def test_the_prompt_is_the_reference_sessions_context(run: str) -> None:
    [prompt] = realtime_family().conversation_prompts(conversation(run), None, None)
    assert np.array_equal(prompt.rows, context(run))
    last = len(script(run)["turns"]) - 1
    steps = golden("generation")[f"{run}.turn{last}.step_input_rows"].numpy()[:, 0]
    ids = prompt.info["text_ids"]  # then one per step, as the reference's step rows have them, then pads
    assert np.array_equal(ids, steps[: len(ids)]) and (steps[len(ids):] == TEXT_PAD).all() and len(steps) > len(ids)
    assert prompt.start_length == 0 and "history" not in prompt.info


@pytest.mark.parametrize("run", STREAM_RUNS)
def test_say_speaks_the_last_turn_as_the_reference_session(tmp_path: Path, run: str) -> None:
    path, codes, rows = write(tmp_path, conversation(run)), tmp_path / "codes.npy", tmp_path / "prompt.npy"
    assert main(["say", "--model", str(REALTIME_DIR), "--conversation", str(path), "--greedy",
                 "--codes-out", str(codes)]) == 0
    assert np.array_equal(np.load(codes), frames(run, len(script(run)["turns"]) - 1))
    assert main(["prompt", "--model", str(REALTIME_DIR), "--conversation", str(path), "-o", str(rows)]) == 0
    assert np.array_equal(np.load(rows), context(run))


@pytest.mark.parametrize("given", [1, 5, 11])
def test_a_continuation_goes_on_from_the_given_frames(tmp_path: Path, given: int) -> None:
    """The given frames are fed as the session fed its own and start the repetition history (greedy
    decoding applies the penalty), so the golden turn comes back whole: given frames first."""
    data = conversation("stream_multiturn")
    expected = frames("stream_multiturn", 1)
    data["conversations"][-1]["audio_codes"] = expected[:given].tolist()
    codes = tmp_path / "codes.npy"
    assert main(["say", "--model", str(REALTIME_DIR), "--conversation", str(write(tmp_path, data)), "--greedy",
                 "--codes-out", str(codes)]) == 0
    assert np.array_equal(np.load(codes), expected)


def test_continuation_audio_is_the_generated_part_decoded_after_the_given_one() -> None:
    data = conversation("stream_multiturn")
    data["conversations"][-1]["audio_codes"] = frames("stream_multiturn", 1)[:5].tolist()
    with TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny") as tts:
        [prompt] = tts.talker.conversation_prompts(data, None, None)
        audio = tts.synthesize(prompt, tts.sampling(greedy=True))  # the family's penalty kept
        generation = audio.generation
        assert generation.start_length == 5 and np.array_equal(audio.codes, frames("stream_multiturn", 1))
        with torch.inference_mode():
            whole = tts.codec.decode(torch.from_numpy(generation.frames.T.copy()), n_quantizers=16).numpy()
        cut = 5 * tts.codec.samples_per_frame
        np.testing.assert_allclose(audio.samples, whole[:, cut:], atol=STREAMED_VS_WHOLE_ATOL)


def test_audio_files_are_encoded_as_codes(tmp_path: Path) -> None:
    """`wav` and `ref_wav` name audio; they mean what their codes mean."""
    from conftest import AUDIO_DIR

    speech = str(AUDIO_DIR / "reference_en.m4a")
    with TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny") as tts:
        codes = tts.encode_voice(Path(speech))[:, :16].tolist()
        by_audio = {"ref_wav": speech, "conversations": [
            {"role": "user", "text": "Say hello.", "wav": speech},
            {"role": "assistant", "text": "Hello there.", "wav": speech},
            {"role": "assistant", "text": "And again."}]}
        by_codes = {"ref_audio_codes": codes, "conversations": [
            {"role": "user", "text": "Say hello.", "audio_codes": codes},
            {"role": "assistant", "text": "Hello there.", "audio_codes": codes},
            {"role": "assistant", "text": "And again."}]}
        [a] = tts.talker.conversation_prompts(by_audio, None, None, tts.encode_voice)
        [b] = tts.talker.conversation_prompts(by_codes, None, None)
    assert len(codes) > 16 and np.array_equal(a.rows, b.rows)
    with pytest.raises(InvalidRequestError, match="needs the codec"):
        realtime_family().conversation_prompts(by_audio, None, None)


def test_the_history_of_given_frames_is_what_stepping_them_leaves() -> None:
    """`_remember_all` (a continuation's given frames at once) against `_remember` frame by frame,
    with a window shorter than the frames (frames leave the ring) and the whole history."""
    fam = realtime_family()
    rng = np.random.default_rng(0)
    given = torch.from_numpy(rng.integers(0, 8, size=(10, 16)))
    for window in (3, 0):
        sampling = SamplingParams(audio_repetition_window=window)
        at_once, stepped = fam.new_state(2, torch.device("cpu")), fam.new_state(2, torch.device("cpu"))
        for state in (at_once, stepped):
            fam.continue_session(state, 1, fam.prompt_from_rows(context("stream_text_only_short")), sampling)
        fam._remember_all(at_once, 1, given)
        slots = torch.tensor([1])
        for frame in given:
            fam._remember(stepped, slots, frame[None])
            stepped.frames[slots] += 1
        for name in ("counts", "frames") + (("ring",) if window else ()):  # no ring for the whole history
            assert torch.equal(getattr(at_once, name), getattr(stepped, name)), (window, name)


@pytest.mark.parametrize("data, message", [
    ([{"role": "user", "text": "Hi."}], "ends with the assistant's message"),
    ([{"role": "user", "text": "Hi."}, {"role": "user", "text": "Hello?"}, {"role": "assistant", "text": "Yes."}],
     "two user messages in a row"),
    ([{"role": "assistant", "text": "One."}, {"role": "assistant", "text": "Two."}], "assistant message 0 needs its audio"),
    ([{"role": "assistant", "text": "One.", "text_tokens": [[3]]}], "give text .* or text_tokens, not both"),
    ([{"role": "assistant", "text": "  "}], "the assistant says nothing"),
    ([{"role": "assistant", "text": None}], r"conversations\[0\].text must be a string or a list of strings"),
    ([{"role": "system", "text": "One."}], "role must be 'user' or 'assistant'"),
    ([{"role": "assistant", "text": "One.", "voice": "x"}], "unknown assistant field"),
    ({"conversations": [{"role": "assistant", "text": "One."}], "speaker": 1}, "unknown conversation field"),
    ([{"role": "assistant", "text": "One.", "audio_codes": [[1] * 8] * 4}], "codes need 16 to 32 codebooks"),
])
def test_bad_conversations_are_refused_clearly(data, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        realtime_family().conversation_prompts(data, None, None)


def test_the_mode_must_match_the_last_message() -> None:
    fam = realtime_family()
    spoken = [{"role": "assistant", "text": "One.", "audio_codes": [[1] * 16] * 4}]
    with pytest.raises(InvalidRequestError, match="it is a continuation"):
        fam.conversation_prompts(spoken, None, "generation")
    with pytest.raises(InvalidRequestError, match="continuation goes on from the last assistant message's audio"):
        fam.conversation_prompts([{"role": "assistant", "text": "One."}], None, "continuation")
    assert fam.conversation_prompts(spoken, None, "continuation")[0].start_length == 4


def test_a_file_of_several_records_is_refused_before_the_model_loads(tmp_path: Path, capsys) -> None:
    record = {"conversations": [{"role": "assistant", "text": "One."}]}
    path = write(tmp_path, [record, record])
    assert main(["say", "--model", str(tmp_path / "missing"), "--conversation", str(path),
                 "--codes-out", str(tmp_path / "c.npy")]) == 2
    assert "holds 2 conversations" in capsys.readouterr().err


def test_tts_takes_a_conversation_as_json_or_as_its_file(tmp_path: Path) -> None:
    """`TTS.conversation_prompts`: the dict, or its file with a voice `.npy` named beside it."""
    data = conversation("stream_multiturn")
    np.save(tmp_path / "voice.npy", np.asarray(data["ref_audio_codes"]).T)  # a .npy is time first
    on_disk = {**data, "ref_audio_codes": "voice.npy"}
    with TTS.from_pretrained(REALTIME_DIR) as tts:
        [from_dict] = tts.conversation_prompts(data)
        [from_file] = tts.conversation_prompts(write(tmp_path, on_disk))
        assert np.array_equal(from_dict.rows, context("stream_multiturn"))
        assert np.array_equal(from_file.rows, from_dict.rows)
        with pytest.raises(InvalidRequestError, match="expected a conversation's JSON"):
            tts.conversation_prompts(3)


def test_a_prepared_record_is_read_by_its_codes(tmp_path: Path) -> None:
    """Upstream's prepare_data.py adds `ref_audio_codes` / `audio_codes` beside the audio paths and
    dataset.py reads only the codes: such a record runs without a codec, whatever the paths hold."""
    data = conversation("stream_multiturn")
    prepared = {"id": "000003", "ref_wav": "missing.wav", **data,
                "conversations": [{**m, "wav": "missing.wav"} if "audio_codes" in m else m
                                  for m in data["conversations"]]}
    [prompt] = realtime_family().conversation_prompts(prepared, tmp_path, None)
    assert np.array_equal(prompt.rows, context("stream_multiturn"))


@pytest.mark.parametrize("family", ["realtime", "fish"])
def test_text_utf8_cannot_hold_is_refused_by_name(family: str) -> None:
    """A lone surrogate (JSON "\\ud800") reached the tokenizer, whose TypeError was a CLI traceback."""
    from fish_cases import family as fish_family

    if family == "realtime":
        fam, data, name = realtime_family(), [{"role": "assistant", "text": ["Hello ", "\ud800 there."]}], "input"
    else:
        fam, data, name = fish_family(), [{"role": "user", "text": "Hello \ud800 there."}], r"conversations\[0\].text"
    with pytest.raises(InvalidRequestError, match=f"{name} is not valid UTF-8 text"):
        fam.conversation_prompts(data, None, None)
    if family == "realtime":
        script = SessionScript.from_dict({"turns": [{"user_text": "\ud800", "input": "Hi."}]})
        with pytest.raises(InvalidRequestError, match="user_text is not valid UTF-8 text"):
            fam.turn_prompt(script.turns[0], first=True)

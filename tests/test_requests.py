"""Bad requests are refused with a message that says what is wrong, before any model work."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mossserve.errors import InvalidRequestError
from mossserve.sampling import SamplingParams
from mossserve.speech_request import SpeechRequest

CODES = np.zeros((4, 32), dtype=np.int64)


@pytest.mark.parametrize("fields,message", [
    ({"input": ""}, "empty"),
    ({"input": "   \n"}, "empty"),
    ({"input": "Hi.", "voice": np.zeros((4, 16), dtype=np.int64)}, "32"),
    ({"input": "Hi.", "voice": np.full((4, 32), 1024)}, "0..1023"),
    ({"input": "Hi.", "voice": np.full((4, 32), -1)}, "0..1023"),
    ({"input": "Hi.", "voice": np.zeros((0, 32), dtype=np.int64)}, "zero frames"),
    ({"input": "Hi.", "voice": np.zeros((4,), dtype=np.int64)}, "2-D"),
    ({"input": "Hi.", "voice": [[0.5] * 32]}, "integers"),
    ({"input": "Hi.", "duration_seconds": -1.0}, r"duration_seconds must lie in \(0, 3600\], got -1.0"),
    ({"input": "Hi.", "duration_tokens": -5}, r"duration_tokens must lie in 1..45000 \(an hour\), got -5"),
    # an OverflowError (int of an infinite frame count) with a traceback, where the server capped it
    ({"input": "Hi.", "duration_seconds": 1e308}, r"duration_seconds must lie in \(0, 3600\], got 1e\+308"),
    ({"input": "Hi.", "duration_seconds": float("nan")}, r"duration_seconds must lie in \(0, 3600\], got nan"),
    ({"input": "Hi.", "duration_tokens": 10**30}, r"duration_tokens must lie in 1..45000"),
    ({"input": "Hi.", "duration_tokens": 5, "duration_seconds": 1.0}, "not both"),
    ({"input": "Hi.", "mode": "karaoke"}, "mode must be one of"),
    ({"input": "[S1] Hi.", "speakers": []}, "at least one"),
    ({"input": "a\udcffb"}, "input is not valid UTF-8"),
    ({"input": "[S1] Hi.", "speakers": [{"reference_text": "\ud800"}]}, r"speakers\[0\].reference_text is not valid UTF-8"),
    ({"input": "Hi.", "voice": "/no/such/voice.wav"}, "not found"),
    ({"input": "Hi.", "instructions": "whisper", "task": "sound_effect"}, "instructions"),
    ({"input": "Hi.", "task": "opera"}, "task must be one of"),
])
def test_bad_request(fields, message, delay_tts) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        delay_tts("tiny_nvq32").prompt(SpeechRequest(**fields))


@pytest.mark.parametrize("seconds, tokens", [
    (2.32, 29), (4.56, 57), (9.2, 115), (16.4, 205),  # whole frame counts the float product falls short of
    (np.float32(2.32), 29), (3, 37), (26.0, 325), (0.079, 1), (3600, 45000),
])
def test_duration_seconds_is_int_of_seconds_times_12_5(seconds, tokens) -> None:
    assert SpeechRequest(input="Hi.", duration_seconds=seconds).expected_frames == tokens


def test_unknown_json_field(tmp_path) -> None:
    (tmp_path / "r.json").write_text(json.dumps({"input": "Hi.", "speed": 2}))
    with pytest.raises(InvalidRequestError, match="unknown request field.*speed"):
        SpeechRequest.from_json(tmp_path / "r.json")


def test_voice_codes_from_npy_relative_to_the_json(tmp_path, delay_tts) -> None:
    np.save(tmp_path / "v.npy", CODES + 7)
    (tmp_path / "r.json").write_text(json.dumps({"input": "Hi.", "voice": "v.npy"}))
    request = SpeechRequest.from_json(tmp_path / "r.json")
    assert np.array_equal(request.voice, CODES + 7)
    assert delay_tts("tiny_nvq32").prompt(request).rows.shape[1] == 33


def test_good_request_still_runs_after_bad_ones(delay_tts) -> None:
    tts = delay_tts("tiny_nvq32")
    with pytest.raises(InvalidRequestError):
        tts.generate_codes(SpeechRequest(input=""))
    codes = tts.generate_codes(SpeechRequest(input="Hello."), SamplingParams.greedy(), max_new_frames=80)
    assert codes.shape == (6, 32)  # the fixture surgery: K = 5 gen slots give K + 1 frames

"""Reference audio -> voice codes the way the MOSS processor prepares it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import AUDIO_DIR
from mossserve.audio import load_audio
from mossserve.audio.loudness import normalize_loudness
from mossserve.errors import InvalidRequestError
from mossserve.speech_request import SpeechRequest


def test_loudness_moves_toward_minus_20_dbfs_by_at_most_3_db() -> None:
    t = np.arange(24000) / 24000
    quiet = (0.01 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # about -43 dBFS: +3 dB cap
    np.testing.assert_allclose(normalize_loudness(quiet), quiet * 10 ** (3 / 20), rtol=1e-6)
    near = (0.13 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # about -20.7 dBFS
    rms = np.sqrt(np.mean(normalize_loudness(near).astype(np.float64) ** 2))
    assert abs(20 * np.log10(rms) + 20) < 1e-3


def test_voice_path_is_encoded_with_the_codec(delay_tts) -> None:
    tts = delay_tts("tiny_nvq32")
    codes = tts.encode_voice(AUDIO_DIR / "reference_zh.wav")
    samples = normalize_loudness(load_audio(AUDIO_DIR / "reference_zh.wav", 24000))
    with torch.inference_mode():
        expected = tts.codec.encode(torch.from_numpy(samples), n_quantizers=32).T.numpy()
    assert codes.shape == (38, 32)  # 149376 samples at 48 kHz = 74688 at 24 kHz = 38 whole frames
    assert np.array_equal(codes, expected)
    request = SpeechRequest(input="你好。", voice=AUDIO_DIR / "reference_zh.wav")
    prompt = tts.prompt(request)
    assert (prompt.rows[:, 0] == 151654).sum() == len(codes) + 31  # user slots: T + n_vq - 1


def test_realtime_encodes_the_voice_as_it_is() -> None:
    """MOSS-TTS-Realtime's reference (inferencer.py, app.py, fast_api.py) encodes the loaded audio with
    no loudness step; only the Delay and Local processors bring a reference to -20 dBFS."""
    from contextlib import closing

    from conftest import CODEC_DIR
    from mossserve.api import TTS
    from realtime_cases import REALTIME_DIR

    with closing(TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny")) as tts:
        codes = tts.encode_voice(AUDIO_DIR / "reference_en_0.mp3")
        samples = load_audio(AUDIO_DIR / "reference_en_0.mp3", 24000)
        with torch.inference_mode():
            expected = tts.codec.encode(torch.from_numpy(samples), n_quantizers=16).T.numpy()
            normalized = tts.codec.encode(torch.from_numpy(normalize_loudness(samples)), n_quantizers=16).T.numpy()
    assert not np.array_equal(expected, normalized)  # the clip is not already at -20 dBFS
    assert np.array_equal(codes, expected)


def test_bad_voice_file_is_a_clear_error(delay_tts, tmp_path) -> None:
    (tmp_path / "bad.wav").write_bytes(b"not audio at all" * 10)
    with pytest.raises(InvalidRequestError, match="cannot decode"):
        delay_tts("tiny_nvq32").prompt(SpeechRequest(input="Hi.", voice=tmp_path / "bad.wav"))

"""`mossserve codec encode|decode --codec FISH_DIR` (docs/cli.md: codes time first, (F, n_q))."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from mossserve.cli import main

FISH_DIR = Path(__file__).parent / "fixtures" / "fish_s2_pro"
ENCODE = np.load(FISH_DIR / "codec_encode.npz")
DECODE = np.load(FISH_DIR / "codec_decode.npz")


def run(args: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_encode_writes_time_first_golden_codes(tmp_path: Path, capsys) -> None:
    soundfile.write(tmp_path / "speech.wav", ENCODE["wav"], 44100, subtype="FLOAT")
    code, err = run(["codec", "encode", tmp_path / "speech.wav", "--codec", FISH_DIR, "-o", tmp_path / "c.npy"], capsys)
    assert code == 0, err
    codes = np.load(tmp_path / "c.npy")
    assert codes.dtype == np.int64 and codes.shape == ENCODE["codes"].T.shape
    robust = ENCODE["vq_margin"].min(axis=0) >= 1e-4  # README 9.6: near ties aside
    assert np.array_equal(codes[robust], ENCODE["codes"].T[robust])


def test_encode_resamples_other_rates(tmp_path: Path, capsys) -> None:
    soundfile.write(tmp_path / "low.wav", ENCODE["wav"][::2][:22050], 22050, subtype="FLOAT")  # 1 s at 22.05 kHz
    code, err = run(["codec", "encode", tmp_path / "low.wav", "--codec", FISH_DIR, "-o", tmp_path / "c.npy",
                     "--n-quantizers", "4"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "c.npy").shape == (int(np.ceil(44100 / 2048)), 4)


@pytest.mark.parametrize("suffix", ["npy", "wav"])
def test_decode_generated_codes(tmp_path: Path, capsys, suffix) -> None:
    """LM codes as `say --codes-out` writes them (time first, residual codes up to 4095)."""
    np.save(tmp_path / "c.npy", DECODE["clone__codes"].T)
    out = tmp_path / f"out.{suffix}"
    code, err = run(["codec", "decode", tmp_path / "c.npy", "--codec", FISH_DIR, "-o", out], capsys)
    assert code == 0, err
    if suffix == "npy":
        np.testing.assert_allclose(np.load(out).reshape(-1), DECODE["clone__wav"], rtol=0, atol=2e-5)
    else:
        info = soundfile.info(out)
        assert (info.samplerate, info.frames) == (44100, DECODE["clone__wav"].shape[0])


@pytest.mark.parametrize("codes, message", [
    (np.zeros((3, 11), dtype=np.int64), "11 codebooks; the codec has 10"),
    (np.full((3, 10), 4096, dtype=np.int64), "0..4095"),
])
def test_bad_codes_are_clear_errors(tmp_path: Path, capsys, codes, message) -> None:
    np.save(tmp_path / "c.npy", codes)
    code, err = run(["codec", "decode", tmp_path / "c.npy", "--codec", FISH_DIR, "-o", tmp_path / "o.wav"], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_broken_codec_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "codec.pth").write_bytes(b"garbage")
    np.save(tmp_path / "c.npy", np.zeros((2, 10), dtype=np.int64))
    code, err = run(["codec", "decode", tmp_path / "c.npy", "--codec", tmp_path, "-o", tmp_path / "o.wav"], capsys)
    assert code == 2 and "cannot read codec weights" in err and "Traceback" not in err

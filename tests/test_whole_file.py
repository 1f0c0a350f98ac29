"""Output files are written whole or not at all: a failed write (a full disk, Ctrl-C) left a partial
file (an 8 KB wav, an empty flac) that looked like a result."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mossserve.audio import write_audio
from mossserve.whole_file import whole_file


def test_a_failed_write_leaves_no_file_and_an_old_one_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "out.wav"
    with pytest.raises(OSError, match="No space left"):
        with whole_file(target) as f:
            f.write(b"RIFF....")
            raise OSError(28, "No space left on device")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with whole_file(target) as f:
            f.write(b"new, half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]
    with whole_file(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]


def test_a_device_or_a_symlink_is_written_in_place(tmp_path: Path) -> None:
    with whole_file("/dev/null") as f:  # moving a file onto it would replace the device
        f.write(b"gone")
    assert Path("/dev/null").is_char_device()
    real = tmp_path / "real.wav"
    real.write_bytes(b"old")
    (tmp_path / "link.wav").symlink_to(real)
    write_audio(tmp_path / "link.wav", np.zeros(100, np.float32), 24000)
    assert (tmp_path / "link.wav").is_symlink() and real.read_bytes().startswith(b"RIFF")


def test_write_audio_is_whole_or_nothing(tmp_path: Path, monkeypatch) -> None:
    import mossserve.audio.write as write

    monkeypatch.setattr(write, "encode_audio", lambda *a, **k: b"x" * 10)
    write_audio(tmp_path / "a.mp3", np.zeros(100, np.float32), 24000)
    assert (tmp_path / "a.mp3").read_bytes() == b"x" * 10

    def fail(samples, sample_rate, format, wav_float=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", lambda f, x: (f.write(b"\x93NUMPY"), fail(x, 0, "npy"))[1])
    with pytest.raises(OSError):
        write_audio(tmp_path / "a.npy", np.zeros(100, np.float32), 24000)
    assert not (tmp_path / "a.npy").exists() and not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_an_output_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path, capsys, monkeypatch) -> None:
    """`-o` in a read-only place failed with "Permission denied" only after the whole synthesis. (The
    file system's answer is stood in for: this suite may run as root, whom modes do not stop.)"""
    import mossserve.cli as cli

    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.wav").write_bytes(b"old")
    access = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: access(p, mode) and locked not in (Path(p), Path(p).parent))
    for name in ("x.wav", "old.wav"):
        assert cli.main(["say", "Hi.", "--model", "/nonexistent/model", "-o", str(locked / name)]) == 2
        assert f"cannot write {locked / name}: permission denied" in capsys.readouterr().err


def test_a_file_that_cannot_be_made_is_named_as_asked(tmp_path: Path, monkeypatch) -> None:
    """A directory that the access check passes but that takes no new file (/proc) named the temporary
    `.x.wav.partial` in the error."""
    import mossserve.whole_file as module

    monkeypatch.setattr(module.os, "access", lambda path, mode: True)
    path = tmp_path / "missing" / "x.wav"
    with pytest.raises(FileNotFoundError) as caught:
        with whole_file(path):
            pass
    assert caught.value.filename == str(path)

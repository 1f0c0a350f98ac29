"""Persistent voice library: a reference voice is uploaded and encoded once, then used by name.

Metadata lives in SQLite (root/mossserve.db); codes and audio live as files
(root/voices/<name>/codes.npy and reference.wav) so they can be large and read without the
database. Every write runs inside one SQLite write transaction (BEGIN IMMEDIATE), which makes
the PRIMARY KEY the arbiter between concurrent adds of one name and makes the transaction's
lock (held across processes too) the owner of voices/<name> while files are moved. Files are
put in place before the row is committed, so a crash leaves at worst files without a row
(replaced by the next add of that name), never a row without files.

    store = VoiceStore("/var/lib/mossserve")
    store.add("alice", audio, 24000, codes, "Hello there.", codec="moss-audio-tokenizer", sha256=digest)
    codes = store.codes("alice")                        # (frames, codebooks) int64
"""
from __future__ import annotations

import os
import re
import reprlib
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass, fields, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

from ..errors import InvalidRequestError

VOICE_NAME_RULE = "1 to 64 characters: letters, digits, '-', '_' and '.', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # ASCII only, so also a safe directory name
_TMP_PREFIX = ".tmp-"  # no valid name starts with '.', so temp dirs never collide with voices


def validate_voice_name(name: str) -> str:
    """Returns `name` if it is a valid voice name; names become directory names, so be strict."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidRequestError(f"invalid voice name {reprlib.repr(name)}: use {VOICE_NAME_RULE}")
    return name


class VoiceExistsError(InvalidRequestError):
    """A voice of that name is already stored (HTTP 409): delete it first or pick another name."""


class VoiceNotFoundError(InvalidRequestError):
    """No voice of that name is stored (it may have been deleted a moment ago)."""


@dataclass(frozen=True)
class Voice:
    name: str
    transcript: str | None
    created_at: float  # unix seconds
    duration_s: float  # of the stored audio
    sample_rate: int  # of the stored audio
    frames: int  # codes.shape[0]
    codebooks: int  # codes.shape[1]
    codec: str  # identity of the codec the codes came from
    sha256: str  # of the uploaded file's bytes

    def to_json(self) -> dict:
        return asdict(self)


_COLUMNS = ", ".join(f.name for f in fields(Voice))
# NOCASE: "alice" and "Alice" would share one directory on case-insensitive file systems.
_SCHEMA = """CREATE TABLE IF NOT EXISTS voices (
    name TEXT PRIMARY KEY COLLATE NOCASE, transcript TEXT, created_at REAL NOT NULL,
    duration_s REAL NOT NULL, sample_rate INTEGER NOT NULL, frames INTEGER NOT NULL,
    codebooks INTEGER NOT NULL, codec TEXT NOT NULL, sha256 TEXT NOT NULL)"""


class VoiceStore:
    """Voices under `root`: metadata in SQLite (root/mossserve.db), codes and audio as files
    (root/voices/<name>/codes.npy and root/voices/<name>/reference.wav).

    Thread-safe: one connection guarded by a lock. Names are unique regardless of case, and
    lookups ignore case; paths always use the name as it was stored.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._voices = self.root / "voices"
        self._voices.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "mossserve.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        with self._lock, self._write():
            self._db.execute(_SCHEMA)
            # Temp dirs only exist inside a write transaction, so any seen here were left by a crash.
            for tmp in self._voices.glob(_TMP_PREFIX + "*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def add(self, name: str, audio: np.ndarray, sample_rate: int, codes: np.ndarray,
            transcript: str | None, codec: str, sha256: str) -> Voice:
        """Stores audio (float32, (channels, samples)) and codes (int, (frames, codebooks))."""
        name = validate_voice_name(name)
        audio = np.asarray(audio, dtype=np.float32)
        codes = _as_codes(codes)
        if audio.ndim != 2:
            raise ValueError(f"audio must be (channels, samples), got shape {audio.shape}")
        voice = Voice(name, transcript, time.time(), audio.shape[1] / sample_rate, int(sample_rate),
                      int(codes.shape[0]), int(codes.shape[1]), codec, sha256)
        with self._lock, self._write():
            try:
                self._db.execute(f"INSERT INTO voices ({_COLUMNS}) VALUES ({', '.join('?' * 9)})",
                                 astuple(voice))
            except sqlite3.IntegrityError:
                raise VoiceExistsError(f"voice {name!r} already exists: delete it first or choose "
                                       "another name") from None
            tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self._voices))
            try:
                _write_durably(tmp / "codes.npy", lambda f: np.save(f, codes, allow_pickle=False))
                _write_durably(tmp / "reference.wav",
                               lambda f: sf.write(f, audio.T, sample_rate, subtype="FLOAT", format="WAV"))
                target = self._voices / name
                if target.exists():  # no row owns it (the INSERT succeeded): left by a crash
                    shutil.rmtree(target)
                tmp.rename(target)
                _fsync_dir(self._voices)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return voice

    def get(self, name: str) -> Voice | None:
        name = validate_voice_name(name)
        with self._lock:
            return self._get(name)

    def list(self) -> list[Voice]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM voices ORDER BY name COLLATE BINARY").fetchall()
        return [Voice(*row) for row in rows]

    def codes(self, name: str) -> np.ndarray:
        """The stored codes, int64 (frames, codebooks)."""
        name = validate_voice_name(name)
        with self._lock:  # held while reading so a concurrent delete cannot remove the file midway
            return np.load(self._dir(self._require(name)) / "codes.npy", allow_pickle=False)

    def audio(self, name: str) -> bytes:
        """The stored reference audio, a wav file's bytes."""
        name = validate_voice_name(name)
        with self._lock:  # held while reading so a concurrent delete cannot remove the file midway
            return (self._dir(self._require(name)) / "reference.wav").read_bytes()

    def replace_codes(self, name: str, codes: np.ndarray, codec: str, sha256: str | None = None) -> Voice:
        """Swaps in codes re-encoded by another codec. With `sha256` (of the audio they were encoded
        from), a voice of that name whose audio is no longer that (deleted and uploaded again while
        the codes were made) is left as it is and returned.

        A crash between the file swap and the commit leaves the new codes under the old codec's
        name, which only makes the server re-encode once more.
        """
        name = validate_voice_name(name)
        codes = _as_codes(codes)
        with self._lock, self._write():
            current = self._require(name)
            if sha256 is not None and current.sha256 != sha256:
                return current
            voice = replace(current, frames=int(codes.shape[0]), codebooks=int(codes.shape[1]), codec=codec)
            self._db.execute("UPDATE voices SET frames = ?, codebooks = ?, codec = ? WHERE name = ?",
                             (voice.frames, voice.codebooks, codec, voice.name))
            tmp = self._dir(voice) / "codes.npy.tmp"
            _write_durably(tmp, lambda f: np.save(f, codes, allow_pickle=False))
            os.replace(tmp, self._dir(voice) / "codes.npy")
        return voice

    def delete(self, name: str) -> str | None:
        """Removes the row, then the files; returns the voice's name as stored (names match whatever
        their case), None when there was no such voice."""
        name = validate_voice_name(name)
        with self._lock:  # held over the file removal so an add of the same name cannot interleave
            with self._write():
                voice = self._get(name)
                if voice is None:
                    return None
                self._db.execute("DELETE FROM voices WHERE name = ?", (voice.name,))
            shutil.rmtree(self._dir(voice), ignore_errors=True)
        return voice.name

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction; the caller holds `_lock`. Commits on success, rolls back on error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _get(self, name: str) -> Voice | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM voices WHERE name = ?", (name,)).fetchone()
        return None if row is None else Voice(*row)

    def _require(self, name: str) -> Voice:
        voice = self._get(name)
        if voice is None:
            raise VoiceNotFoundError(f"voice {name!r} not found")
        return voice

    def _dir(self, voice: Voice) -> Path:
        return self._voices / voice.name


def _as_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integer (frames, codebooks), got {codes.dtype} {codes.shape}")
    return codes.astype(np.int64)


def _write_durably(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes and fsyncs, so a committed row never points at data still only in the page cache."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Persistent voice library: a reference voice is uploaded and encoded once, then used by name.

Metadata lives in SQLite (root/mossserve.db); codes and audio live as files
(root/voices/<name>/codes.npy, a codes-<hash>.npy per codec it was re-encoded for, and
reference.wav) so they can be large and read without the database. Every write runs inside one
SQLite write transaction (BEGIN IMMEDIATE), which makes the PRIMARY KEY the arbiter between
concurrent adds of one name and makes the transaction's lock (held across processes too) the
owner of voices/<name> while files are moved. Files are put in place (or, for a delete, moved
aside) before the row is committed, so a crash leaves at worst files without a row (replaced by
the next add of that name, or removed at the next start) or, mid-delete, a voice's directory
moved aside, which the next start puts back: never a row whose files are lost.

    store = VoiceStore("/var/lib/mossserve")
    store.add("alice", audio, 24000, codes, "Hello there.", codec="moss-audio-tokenizer", sha256=digest)
    codes = store.codes("alice")                        # (frames, codebooks) int64
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import reprlib
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass, fields, replace
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import soundfile as sf

from ..errors import InvalidRequestError, MossServeError

VOICE_NAME_RULE = "1 to 64 characters: letters, digits, '-', '_' and '.', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # ASCII only, so also a safe directory name
_TMP_PREFIX = ".tmp-"  # no valid name starts with '.', so temp dirs never collide with voices
_TRASH_PREFIX = ".trash-"  # .trash-<hex>-<name>: a deleted voice's directory until its files are removed
_CODES = "codes.npy"  # the codes of the codec the voice was added with
T = TypeVar("T")


def validate_voice_name(name: str) -> str:
    """Returns `name` if it is a valid voice name; names become directory names, so be strict."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidRequestError(f"invalid voice name {reprlib.repr(name)}: use {VOICE_NAME_RULE}")
    return name


def is_voice_name(value: object) -> bool:
    """Whether `value` could name a stored voice (not base64 audio, a path, a data URL)."""
    try:
        validate_voice_name(value)
    except InvalidRequestError:
        return False
    return True


class VoiceExistsError(InvalidRequestError):
    """A voice of that name is already stored (HTTP 409): delete it first or pick another name."""


class VoiceNotFoundError(InvalidRequestError):
    """No voice of that name is stored (it may have been deleted a moment ago)."""


class VoiceLibraryError(MossServeError):
    """The data directory's voice library cannot be opened (a damaged database, a file in the way):
    found at start-up, before the model loads, and reported without a traceback."""


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
    (root/voices/<name>/codes.npy, codes-<hash>.npy and reference.wav).

    Thread-safe: one connection guarded by a lock. Names are unique regardless of case, and
    lookups ignore case; paths always use the name as it was stored.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._voices = self.root / "voices"
        self._lock = threading.Lock()
        database = self.root / "mossserve.db"
        try:
            self._voices.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            with self._lock, self._write():
                self._db.execute(_SCHEMA)
                self._clean_up()
        except sqlite3.DatabaseError as e:
            raise VoiceLibraryError(f"cannot open the voice library {database}: {e} (if it is damaged, move it "
                                    "aside to start with no voices, or restore it from a backup)") from None
        except FileExistsError:  # mkdir: something other than a directory is there
            raise VoiceLibraryError(f"{self._voices} is not a directory: the voice library keeps its voices "
                                    "there; move it aside") from None
        except OSError as e:
            raise VoiceLibraryError(f"cannot open the voice library in {self.root}: {e.strerror or e}"
                                    + (f": {e.filename}" if e.filename else "")) from None

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
                _write_durably(tmp / _CODES, lambda f: np.save(f, codes, allow_pickle=False))
                _write_durably(tmp / "reference.wav",
                               lambda f: sf.write(f, audio.T, sample_rate, subtype="FLOAT", format="WAV"))
                _remove(self._voices / name)  # no row owns it (the INSERT succeeded): a crash's, or a stray file
                tmp.rename(self._voices / name)
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

    def codes(self, name: str, codec: str | None = None) -> np.ndarray | None:
        """The stored codes, int64 (frames, codebooks), of `codec` (default: the codec the voice
        records); None when the voice has no codes of `codec` (encode its audio: replace_codes).
        Each codec's codes are a file of their own, so another process's replace_codes meanwhile
        never hands `codec`'s reader another codec's codes."""
        name = validate_voice_name(name)
        with self._lock:
            voice = self._require(name)
            path = self._codes_path(voice, voice.codec if codec is None else codec)
            return None if path is None else self._files(voice, lambda: np.load(path, allow_pickle=False))

    def audio(self, name: str) -> bytes:
        """The stored reference audio, a wav file's bytes."""
        name = validate_voice_name(name)
        with self._lock:
            voice = self._require(name)
            return self._files(voice, (self._dir(voice) / "reference.wav").read_bytes)

    def replace_codes(self, name: str, codes: np.ndarray, codec: str, sha256: str | None = None) -> Voice:
        """Stores codes re-encoded by another codec and records that codec. With `sha256` (of the
        audio they were encoded from), a voice of that name whose audio is no longer that (deleted
        and uploaded again while the codes were made) is left as it is and returned.

        The codes go to a file named for `codec` before the row commits, and every other codec's
        file is kept: a crash before the commit leaves `codec`'s codes of this very audio where
        only a reader of `codec` looks, so nobody ever reads one codec's codes as another's.
        """
        name = validate_voice_name(name)
        codes = _as_codes(codes)
        with self._lock, self._write():
            current = self._require(name)
            if sha256 is not None and current.sha256 != sha256:
                return current
            voice = replace(current, frames=int(codes.shape[0]), codebooks=int(codes.shape[1]), codec=codec)
            tmp = self._dir(voice) / "codes.npy.tmp"
            self._files(voice, lambda: _write_durably(tmp, lambda f: np.save(f, codes, allow_pickle=False)))
            os.replace(tmp, self._dir(voice) / _codes_file(codec))
            self._db.execute("UPDATE voices SET frames = ?, codebooks = ?, codec = ? WHERE name = ?",
                             (voice.frames, voice.codebooks, codec, voice.name))
        return voice

    def delete(self, name: str) -> str | None:
        """Removes the row and the files; returns the voice's name as stored (names match whatever
        their case), None when there was no such voice. The directory is moved aside inside the
        transaction, so an add of the name in another process right after the commit keeps its files."""
        name = validate_voice_name(name)
        with self._lock:
            trash = None
            try:
                with self._write():
                    voice = self._get(name)
                    if voice is None:
                        return None
                    self._db.execute("DELETE FROM voices WHERE name = ?", (voice.name,))
                    trash = self._move_aside(voice)
            except BaseException:  # the commit failed: the row stays, and so do its files
                if trash is not None:
                    trash.rename(self._dir(voice))
                raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return voice.name

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction; the caller holds `_lock`. Commits on success, rolls back on error
        (the commit's own too, so the connection is never left inside a transaction)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _move_aside(self, voice: Voice) -> Path | None:
        """voices/<name> under a trash name, None if it was gone already (removed by hand)."""
        trash = self._voices / f"{_TRASH_PREFIX}{uuid.uuid4().hex}-{voice.name}"
        try:
            self._dir(voice).rename(trash)
        except FileNotFoundError:
            return None
        return trash

    def _clean_up(self) -> None:
        """What crashes left, seen inside a write transaction (so no other process is mid-write): temp
        dirs of adds, and moved-aside directories of deletes; one whose row is still there belongs to
        a delete that never committed, so it goes back."""
        for path in self._voices.glob(_TMP_PREFIX + "*"):
            _remove(path)
        for path in self._voices.glob(_TRASH_PREFIX + "*"):
            voice = self._get(path.name.removeprefix(_TRASH_PREFIX).partition("-")[2])
            if voice is not None and not os.path.lexists(self._dir(voice)):
                path.rename(self._dir(voice))
            else:  # a committed delete's, which its process may be removing this very moment
                with contextlib.suppress(FileNotFoundError):
                    _remove(path)

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

    def _codes_path(self, voice: Voice, codec: str) -> Path | None:
        """`codec`'s codes: the file replace_codes wrote for it, else codes.npy if the voice records
        `codec` (then no replace_codes ever did: it writes that file before the row names the codec)."""
        path = self._dir(voice) / _codes_file(codec)
        if path.exists():
            return path
        return self._dir(voice) / _CODES if codec == voice.codec else None

    def _files(self, voice: Voice, use: Callable[[], T]) -> T:
        """`use` the files of a voice whose row was just read: gone means deleted by another process
        meanwhile (the store's lock is this process's alone), or removed by hand."""
        try:
            return use()
        except FileNotFoundError:
            raise VoiceNotFoundError(f"voice {voice.name!r} has no files (deleted meanwhile, or removed from "
                                     "the data directory: then delete it and upload it again)") from None


def _codes_file(codec: str) -> str:
    """The file of a codec's codes, named by a hash: codec ids may be paths."""
    return f"codes-{hashlib.sha256(codec.encode()).hexdigest()[:16]}.npy"


def _as_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integer (frames, codebooks), got {codes.dtype} {codes.shape}")
    return codes.astype(np.int64)


def _remove(path: Path) -> None:
    """Whatever is at `path`: a directory tree, a file or a link (a stray file made add a 500)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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

"""`SpeechRequest`: what a caller asks for, with the fields the HTTP API carries.

A voice is either a path to an audio file (encoded by the codec when the request runs), a path
to a `.npy` file of codes, or codes themselves: an int array `(frames, codebooks)`, time first.
Family-specific checks (codebook count, code range, which fields a model supports) happen in
the family's prompt builder; this module checks what every family agrees on.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from .errors import InvalidRequestError
from .json_files import parse_json, read_json_file, read_text_file

FRAMES_PER_SECOND = 12.5
MAX_DURATION_SECONDS = 3600  # an hour: longer durations overflowed the frame count, or only filled the cache
MODES = ("generation", "continuation")

Voice = Union[str, Path, np.ndarray, None]
EncodeVoice = Callable[[Path], np.ndarray]  # an audio file -> codes (frames, codebooks), by the codec


@dataclass
class Speaker:
    """One dialogue speaker: a reference voice and, optionally, what it says."""

    voice: Voice = None
    reference_text: str | None = None


@dataclass
class SpeechRequest:
    input: str | None = None
    voice: Voice = None
    reference_text: str | None = None
    instructions: str | None = None
    duration_tokens: int | None = None
    duration_seconds: float | None = None
    speakers: list[Speaker] | None = None
    mode: str | None = None
    language: str | None = None
    task: str | None = None
    depth: int | None = None  # Local family: codebooks generated per frame (1..n_vq; None = all)
    chunk_length: int | None = None  # Fish S2 Pro: UTF-8 bytes of speaker turns per text batch (None = 300)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field and normalise the voices (codes to arrays, `.npy` paths loaded, speaker
        dicts to `Speaker`), so that fields set after construction mean what they mean in it."""
        self.voice = normalize_voice(self.voice, "voice")
        if self.speakers is not None:
            if not isinstance(self.speakers, (list, tuple)):
                raise InvalidRequestError("speakers must be a list of {voice, reference_text}")
            self.speakers = [_speaker(s, i) for i, s in enumerate(self.speakers)]
        for name in ("input", "reference_text", "instructions", "language", "task"):
            check_text(getattr(self, name), name)
        for name in ("instructions", "language"):  # a blank one asks for nothing (OpenAI clients send instructions: "")
            if getattr(self, name) is not None and not getattr(self, name).strip():
                setattr(self, name, None)
        if self.mode is not None and self.mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.duration_tokens is not None and self.duration_seconds is not None:
            raise InvalidRequestError("give duration_tokens or duration_seconds, not both")
        if self.duration_tokens is not None:
            if isinstance(self.duration_tokens, bool) or not isinstance(self.duration_tokens, (int, np.integer)):
                raise InvalidRequestError(f"duration_tokens must be an integer, got {self.duration_tokens!r}")
            if not 0 < self.duration_tokens <= MAX_DURATION_SECONDS * FRAMES_PER_SECOND:
                raise InvalidRequestError(f"duration_tokens must lie in 1..{int(MAX_DURATION_SECONDS * FRAMES_PER_SECOND)}"
                                          f" (an hour), got {self.duration_tokens}")
        if self.duration_seconds is not None:
            if isinstance(self.duration_seconds, bool) or not isinstance(self.duration_seconds,
                                                                         (int, float, np.integer, np.floating)):
                raise InvalidRequestError(f"duration_seconds must be a number, got {self.duration_seconds!r}")
            if not 0 < self.duration_seconds <= MAX_DURATION_SECONDS:
                raise InvalidRequestError(f"duration_seconds must lie in (0, {MAX_DURATION_SECONDS}], got "
                                          f"{self.duration_seconds}")
        if self.depth is not None and (isinstance(self.depth, bool) or not isinstance(self.depth, (int, np.integer))):
            raise InvalidRequestError(f"depth must be an integer, got {self.depth!r}")  # its range: the model's
        if self.chunk_length is not None and (isinstance(self.chunk_length, bool)
                                              or not isinstance(self.chunk_length, (int, np.integer))
                                              or self.chunk_length < 1):
            raise InvalidRequestError(f"chunk_length must be a positive integer (bytes), got {self.chunk_length!r}")
        if self.speakers is not None and not self.speakers:
            raise InvalidRequestError("speakers must hold at least one entry")

    @property
    def typed_texts(self) -> list[tuple[str, str]]:
        """(field, text) of each text field that a prompt spells out as the user typed it."""
        texts = [(name, getattr(self, name)) for name in ("input", "reference_text", "instructions", "language")]
        texts += [(f"speakers[{k}].reference_text", s.reference_text) for k, s in enumerate(self.speakers or [])]
        return [(name, text) for name, text in texts if text]

    @property
    def expected_frames(self) -> int | None:
        """The requested duration in codec frames (12.5 per second), if any."""
        if self.duration_tokens is not None:
            return int(self.duration_tokens)
        if self.duration_seconds is not None:  # truncated, as the upstream apps convert seconds
            # in decimal: the float product is a hair under the whole frame count at 2.32 s (29 frames)
            return max(1, int(Fraction(str(self.duration_seconds)) * Fraction(FRAMES_PER_SECOND)))
        return None

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> "SpeechRequest":
        if not isinstance(data, dict):
            raise InvalidRequestError("a request must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequestError(f"unknown request field(s): {', '.join(unknown)}")
        values = dict(data)
        if "voice" in values:
            values["voice"] = resolve_path_or_codes(values["voice"], base_dir)
        if values.get("speakers") is not None and isinstance(values["speakers"], list):
            values["speakers"] = [
                {**s, "voice": resolve_path_or_codes(s.get("voice"), base_dir)} if isinstance(s, dict) else s
                for s in values["speakers"]
            ]
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "SpeechRequest":
        path = Path(path)
        return cls.from_dict(read_json_file(path, "request file"), base_dir=path.parent)


def _speaker(value: Any, index: int) -> Speaker:
    if isinstance(value, Speaker):
        speaker = value
    elif isinstance(value, dict):
        unknown = sorted(set(value) - {"voice", "reference_text"})
        if unknown:
            raise InvalidRequestError(f"speakers[{index}]: unknown field(s) {', '.join(unknown)}")
        speaker = Speaker(**value)
    else:
        raise InvalidRequestError(f"speakers[{index}] must be an object with voice and reference_text")
    speaker.voice = normalize_voice(speaker.voice, f"speakers[{index}].voice")
    check_text(speaker.reference_text, f"speakers[{index}].reference_text")
    return speaker


def check_text(value: Any, name: str) -> None:
    """None or a string that UTF-8 can hold: a lone surrogate (bytes a terminal or file gave that are
    not UTF-8, a JSON "\\ud800") is refused here rather than deep in a tokenizer."""
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{name} is not valid UTF-8 text (character {e.start}: "
                                  f"{value[e.start]!r})") from None


def resolve_path_or_codes(value: Any, base_dir: Path | None) -> Any:
    """In JSON a voice is a path (relative to the working directory, else to the JSON file) or codes."""
    if isinstance(value, str) and base_dir is not None:
        path = Path(value)
        if not path.is_absolute() and not path.exists() and (base_dir / path).exists():
            return str(base_dir / path)
    return value


def normalize_voice(value: Voice | list, name: str) -> Voice:
    """Codes become an int64 array (frames, codebooks); a `.npy` path is loaded; audio paths stay paths."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        if not str(value).strip():
            raise InvalidRequestError(f"{name} is an empty path")
        path = Path(value)
        if path.suffix.lower() == ".npy":
            return load_codes(path, name)
        try:
            found, exists = path.is_file(), path.exists()
        except OSError as e:  # a name too long for the file system (pasted base64, say)
            raise InvalidRequestError(f"{name}: not a usable path ({e.strerror}): {str(path)[:60]}...") from None
        if not found:
            what = "is not a regular file (a directory, device or pipe)" if exists else "not found"
            raise InvalidRequestError(f"{name}: audio file {what}: {path}")
        return path
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)
        except ValueError:
            raise InvalidRequestError(f"{name}: codes must be a rectangular list of integer lists") from None
    if isinstance(value, np.ndarray) or hasattr(value, "numpy"):
        return check_codes(np.asarray(value), name)
    raise InvalidRequestError(f"{name} must be an audio path, a .npy path or codes, got {type(value).__name__}")


def load_codes(path: Path, name: str = "codes") -> np.ndarray:
    return check_codes(read_npy(path, f"{name}: ", "integer codes"), name)


def read_npy(path: str | Path, label: str = "", holds: str = "integers") -> np.ndarray:
    """A .npy file's array, never unpickled, its header checked against the file before any memory
    is taken (a header claiming 10**12 rows asked for terabytes); InvalidRequestError otherwise.
    `label` prefixes messages; `holds` says what the file should hold."""
    not_npy = f"{label}{path} is not a .npy file of {holds}"
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
            except (ValueError, EOFError):  # another format (a .npz is a zip), an empty or cut header
                raise InvalidRequestError(not_npy) from None
            if dtype.hasobject:
                raise InvalidRequestError(f"{not_npy} (it holds Python objects)")
            if size - f.tell() < int(np.prod(shape, dtype=object)) * dtype.itemsize:
                raise InvalidRequestError(f"{label}{path} is cut short: its header says {tuple(shape)} of {dtype}, "
                                          f"more than the file holds")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except InvalidRequestError:
        raise
    except FileNotFoundError:
        raise InvalidRequestError(f"{label}file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"{label}{path} is a directory, not a .npy file") from None
    except (ValueError, EOFError):
        raise InvalidRequestError(not_npy) from None
    except OSError as e:
        raise InvalidRequestError(f"{label}cannot read {path}: {e.strerror or e}") from None


def check_codes(array: np.ndarray, name: str = "codes") -> np.ndarray:
    """Shape (frames, codebooks), integers, at least one frame; range is checked by the family."""
    if array.dtype == object or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        if (np.issubdtype(array.dtype, np.floating) and array.size and np.all(np.isfinite(array))
                and np.all(array == np.round(array))):
            if (largest := np.abs(array).max()) >= 2**62:  # past int64: the cast would warn and wrap
                raise InvalidRequestError(f"{name}: a code of {largest:g} lies far outside any codebook")
            array = array.astype(np.int64)
        else:
            raise InvalidRequestError(f"{name}: codes must be integers, got dtype {array.dtype}")
    if array.ndim != 2:
        raise InvalidRequestError(f"{name}: codes must be 2-D (frames, codebooks), got shape {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise InvalidRequestError(f"{name}: codes have zero frames")
    if array.shape[1] == 0:
        raise InvalidRequestError(f"{name}: codes have zero codebooks")
    return array.astype(np.int64, copy=False)


def load_requests_jsonl(path: str | Path) -> list[tuple[int, SpeechRequest]]:
    """(line number, SpeechRequest) of every non-empty line; an error names the line."""
    path = Path(path)
    lines = read_text_file(path, "batch file", "JSON lines").splitlines()
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        data = parse_json(line, f"{path}:{number}")
        try:
            requests.append((number, SpeechRequest.from_dict(data, base_dir=path.parent)))
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{path}:{number}: {e}") from None
    if not requests:
        raise InvalidRequestError(f"{path} holds no requests")
    return requests

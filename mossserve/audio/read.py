"""Decode audio files: libsndfile (soundfile) first, FFmpeg (PyAV) for everything else."""

import io
import mmap
from os import PathLike
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import soundfile as sf

from mossserve.audio.resampler import resample
from mossserve.errors import AudioError

AudioSource = str | PathLike | bytes | bytearray | memoryview | BinaryIO

# libsndfile reports this many frames when a stream does not say its length (a streamed FLAC).
_UNKNOWN_LENGTH = 2**62
# An Ogg page that begins a logical stream: capture pattern, version 0, the "first page" flag.
_OGG_FIRST_PAGE = b"OggS\x00\x02"
_BLOCK_SAMPLES = 1 << 20  # read at most this many samples (over all channels) at a time
# An mp3's packets may last this much longer than mpg123's decode before FFmpeg reads it again:
# mpg123 trims the encoder's delay and padding (0.21 s at 8 kHz, less at higher rates), FFmpeg's
# packet durations do not.
_MP3_SLACK_SECONDS = 0.5
# The share of an mp3's packets FFmpeg may fail to decode on that second reading (joined files fail
# at the seam, a damaged stretch at a few packets; bytes that are not audio at most of them).
_MP3_MAX_FAILED = 0.05


class _NotForLibsndfile(Exception):
    """libsndfile cannot read this stream; FFmpeg should."""


class _NoAudioStream(Exception):
    """FFmpeg opened the file, and it holds no audio (a picture, subtitles)."""


class _Damaged(Exception):
    """FFmpeg could not decode most of the file's packets."""


def read_audio(
    source: AudioSource, max_seconds: float | None = None, channels: int | None = None
) -> tuple[np.ndarray, int]:
    """Decode a whole file to float32 `(channels, n)` and its sample rate, as stored (the channels,
    unless `channels` is given).

    `source` is a path, the file's bytes, or a binary file object. wav, flac, ogg (vorbis, opus)
    and mp3 go through libsndfile (so mp3 sample counts are mpg123's); m4a/aac and anything else
    FFmpeg knows go through PyAV, and so does an mp3 that mpg123 stops short of (see
    `_mpg123_stopped_early`). FFmpeg skips a packet it cannot decode, as its command line does, so
    a damaged stretch costs that stretch, not the file. `max_seconds` stops decoding as soon as the
    audio is known to be longer, so a long file costs no more than the limit; with it, more samples
    per channel than the limit holds at `_MAX_RATE` are refused too (a file at 655 kHz).
    `channels` maps the audio to that many (several → mono averages them, mono → several
    duplicates it) block by block as it decodes, so memory follows the result, not the file's
    channel count; None keeps the channels as stored.
    """
    label, data = _open(source)
    heard = None  # mpg123's reading of an mp3 that FFmpeg is asked to read again
    try:
        if _several_ogg_streams(data):
            raise _NotForLibsndfile
        file = data if isinstance(data, str) else io.BytesIO(data)
        x, rate, container = _read_soundfile(file, max_seconds, channels)
        if container != "MP3" or not _mpg123_stopped_early(data, x.shape[1] / rate):
            return _map_channels(x, channels), rate
        heard = _map_channels(x, channels), rate
    except (sf.LibsndfileError, _NotForLibsndfile):
        pass
    try:
        # Bytes after an mp3's end that are not audio hold false frame headers; as the second
        # reading, FFmpeg's must decode nearly every packet, else mpg123's stands.
        x, rate = _read_av(_ffmpeg_input(data), max_seconds, _MP3_MAX_FAILED if heard else 0.5, channels)
        return _map_channels(x, channels), rate
    except (_NoAudioStream, _Damaged, av.FFmpegError) as e:
        if heard is not None:
            return heard
        raise _refusal(label, e) from None


def _refusal(label: str, e: Exception) -> AudioError:
    if isinstance(e, _NoAudioStream):
        return AudioError(f"{label} holds no audio stream")
    if isinstance(e, _Damaged):
        return AudioError(f"cannot decode {label}: the file is damaged ({e})")
    reason = getattr(e, "strerror", None) or str(e)
    return AudioError(f"cannot decode {label}: not a supported audio format, or the file is damaged ({reason})")


def _open(source: AudioSource) -> tuple[str, str | bytes]:
    """A label for messages and either a path string or the bytes."""
    if isinstance(source, (str, PathLike)):
        path = Path(source)
        if not path.exists():
            raise AudioError(f"audio file not found: {str(source)!r}")
        if not path.is_file():
            raise AudioError(f"{str(source)!r} is not a regular file (a directory, device or pipe)")
        if path.stat().st_size == 0:
            raise AudioError(f"audio file {str(source)!r} is empty (0 bytes)")
        return f"audio file {str(source)!r}", str(path)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, bytes):
            raise TypeError("read_audio needs a binary file object (opened with 'rb')")
    else:
        raise TypeError(f"read_audio takes a path, bytes or a binary file object, not {type(source).__name__}")
    if not data:
        raise AudioError("audio data is empty (0 bytes)")
    return "the audio data", data


def _ffmpeg_input(data: str | bytes) -> str | BinaryIO:
    """A path as FFmpeg's file protocol (a name like "take:1.mp3" is not a protocol), or the bytes."""
    return f"file:{data}" if isinstance(data, str) else io.BytesIO(data)


def _open_av(file: str | BinaryIO):
    return av.open(file, mode="r", metadata_errors="ignore")  # a tag in the wrong encoding is no reason to refuse


def _several_ogg_streams(data: str | bytes) -> bool:
    """Whether an Ogg file begins more than one logical stream (a chained file: internet radio, files
    joined end to end), of which libsndfile reads only the first; FFmpeg reads them all."""
    if isinstance(data, bytes):
        return data.startswith(_OGG_FIRST_PAGE) and data.find(_OGG_FIRST_PAGE, 1) >= 0
    with open(data, "rb") as f:
        if f.read(len(_OGG_FIRST_PAGE)) != _OGG_FIRST_PAGE:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return view.find(_OGG_FIRST_PAGE, 1) >= 0


# What an encoder may add to a recording: AAC's priming and last frame (ADTS keeps them: 1 s of audio
# reads back as 1.067 s), so that a recording of exactly the limit is not refused for them.
ENCODER_PADDING_S = 0.1
# The highest rate of real recordings (studio masters). A file's memory is its rate times its length,
# so a 655 kHz file of the allowed seconds would cost 3.4 times a 192 kHz one: past `max_seconds` at
# this rate, the samples per channel are refused whatever the seconds.
_MAX_RATE = 192_000


def _check_length(seconds: float, frames: int, max_seconds: float | None) -> None:
    """Refuse audio past `max_seconds`, or with more samples per channel than they hold at `_MAX_RATE`."""
    if max_seconds is None:
        return
    if seconds > max_seconds + ENCODER_PADDING_S:
        raise AudioError(f"audio is too long: {seconds:.2f} s or more, the limit is {max_seconds:g} s")
    if frames / _MAX_RATE > max_seconds + ENCODER_PADDING_S:  # as the seconds are compared: no rounding apart
        raise AudioError(f"audio has too many samples: {frames} or more per channel, the limit is "
                         f"{max_seconds:g} s at {_MAX_RATE} Hz (a higher rate allows fewer seconds)")


def _check_channels(have: int, channels: int | None) -> None:
    """Refuse, before decoding it, audio that `_map_channels` could not map."""
    if channels not in (None, 1, have) and have != 1:
        raise AudioError(f"cannot turn {have}-channel audio into {channels} channels")


def _shrink(x: np.ndarray, channels: int | None) -> np.ndarray:
    """A decoded block (c, n), mixed to mono at once where mono is wanted: memory then follows the
    result. The mean over channels is per sample, so block by block equals the whole."""
    return _map_channels(x, 1) if channels == 1 else x


def _mono(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)


def _map_channels(x: np.ndarray, channels: int | None) -> np.ndarray:
    """`x` (c, n) as `channels` channels (None: as it is)."""
    _check_channels(x.shape[0], channels)
    if channels is None or x.shape[0] == channels:
        return x
    if channels == 1:
        return _mono(x)
    return np.repeat(x, channels, axis=0)


def _mpg123_stopped_early(data: str | bytes, decoded_seconds: float) -> bool:
    """Whether an mp3's packets last longer than what mpg123 decoded. mpg123 ends at the length
    its first frame's Xing/LAME header gives, so it keeps only the first of several files joined
    end to end, and it stops at a damaged stretch without an error. FFmpeg's demuxer lists the
    packets to the end of the file without decoding them (a few ms for a minute of audio); where
    FFmpeg cannot even do that, mpg123's reading stands."""
    try:
        with _open_av(_ffmpeg_input(data)) as container:
            if not container.streams.audio:
                return False
            stream = container.streams.audio[0]
            ticks = sum(packet.duration or 0 for packet in container.demux(stream))
    except av.FFmpegError:
        return False
    return float(ticks * stream.time_base) > decoded_seconds + _MP3_SLACK_SECONDS


def _read_soundfile(
    file: str | BinaryIO, max_seconds: float | None, channels: int | None
) -> tuple[np.ndarray, int, str]:
    """Read in blocks, so that memory and the length check follow the samples actually decoded, not
    the header's claim (a damaged FLAC can say 2**36 samples for one second of audio; libsndfile then
    fails at the data's end, and FFmpeg reads the file). A short read ends the file: an MP3's header
    may promise more frames than decode (a cut file, an encoder's estimate), and soundfile's
    `blocks()` would hand out the rest of its buffer (uninitialised memory, or the previous block).
    Each block is mixed down as read (`_shrink`). Returns the samples, the rate and libsndfile's name of the container ("WAV", "MP3", ...)."""
    with sf.SoundFile(file) as f:
        if f.frames >= _UNKNOWN_LENGTH:
            raise _NotForLibsndfile
        _check_channels(f.channels, channels)
        block_frames = max(1, _BLOCK_SAMPLES // f.channels)
        blocks, frames = [_shrink(np.zeros((f.channels, 0), np.float32), channels)], 0
        while len(block := f.read(block_frames, dtype="float32", always_2d=True)):
            blocks.append(_shrink(block.T, channels))
            frames += len(block)
            _check_length(frames / f.samplerate, frames, max_seconds)
            if len(block) < block_frames:
                break
        return np.concatenate(blocks, axis=1), f.samplerate, f.format


def _read_av(
    file: str | BinaryIO, max_seconds: float | None, max_failed: float, channels: int | None
) -> tuple[np.ndarray, int]:
    """Decode with FFmpeg, packet by packet: a packet that does not decode (a damaged stretch, the
    seam of joined files) is skipped, unless `max_failed` of them or more fail. A stream may change
    its rate or channel layout midway (an AAC broadcast capture, concatenated files): each run of
    alike frames is kept at its rate, then brought to the first run's channels and rate."""
    with _open_av(file) as container:
        if not container.streams.audio:
            raise _NoAudioStream
        stream = container.streams.audio[0]
        runs = _Runs(channels)
        decoded, failed = 0, 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.InvalidDataError:
                failed += 1
                continue
            decoded += packet.size > 0  # the last packet, empty, only flushes the decoder
            for frame in frames:
                runs.add(frame)
            _check_length(runs.seconds, runs.frames, max_seconds)
        if failed and failed >= max_failed * (failed + decoded):
            raise _Damaged(f"{failed} of its {failed + decoded} packets do not decode")
        runs.flush()
    if not runs.runs:
        return np.zeros((stream.channels, 0), np.float32), stream.rate
    return runs.joined()


class _Runs:
    """Decoded frames as planar float32, in runs of one rate and channel layout. FFmpeg's resampler
    locks onto its first frame's format, layout and rate, so a change gets a new one. A frame with
    other channels than the first run's is mixed to mono at once (`joined` spreads it), and
    every frame is where mono is wanted, so memory follows what is kept."""

    def __init__(self, channels: int | None) -> None:
        self.channels = channels
        self.runs: list[tuple[int, int, list[np.ndarray]]] = []  # (rate, channels as decoded, [(c, n)])
        self.seconds, self.frames = 0.0, 0
        self._key: tuple | None = None
        self._to_float: av.AudioResampler | None = None

    def add(self, frame: av.AudioFrame) -> None:
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if key != self._key:
            self.flush()
            self._key, self._to_float = key, av.AudioResampler(format="fltp")  # rate and layout kept
        for out in self._to_float.resample(frame):
            self._keep(out)

    def flush(self) -> None:
        if self._to_float is not None:
            for out in self._to_float.resample(None):
                self._keep(out)

    def _keep(self, frame: av.AudioFrame) -> None:
        x = frame.to_ndarray()
        if not self.runs:
            _check_channels(x.shape[0], self.channels)
        if not self.runs or self.runs[-1][:2] != (frame.sample_rate, x.shape[0]):
            self.runs.append((frame.sample_rate, x.shape[0], []))
        if x.shape[0] != self.runs[0][1]:
            x = _mono(x)
        self.runs[-1][2].append(_shrink(x, self.channels))
        self.seconds += frame.samples / frame.sample_rate
        self.frames += frame.samples

    def joined(self) -> tuple[np.ndarray, int]:
        """All runs at the first one's rate and channels."""
        rate, channels = self.runs[0][0], self.runs[0][2][0].shape[0]
        pieces = [resample(_map_channels(np.concatenate(chunks, axis=1), channels), r, rate)
                  for r, _, chunks in self.runs]
        return np.concatenate(pieces, axis=1).astype(np.float32, copy=False), rate

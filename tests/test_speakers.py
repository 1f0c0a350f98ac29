"""SpeakerCache: reference audio -> codes once per distinct content, batched, shared, bounded."""
from __future__ import annotations

import asyncio
import io
import shutil
import threading

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import AUDIO_DIR

from mossserve.audio import load_audio
from mossserve.audio.loudness import normalize_loudness
from mossserve.engine.speakers import SpeakerCache
from mossserve.errors import AudioError, EngineClosedError, InvalidRequestError

K = 16
# Different lengths at 24 kHz: 38, 82, 97 and 82 whole frames; wav, mp3, wav and m4a.
FILES = ["reference_zh.wav", "reference_en_0.mp3", "reference_02_s1.wav", "reference_en.m4a"]


def direct(codec, path, k: int = K) -> np.ndarray:
    """The path TTS.encode_voice takes: one clip, codec.encode."""
    samples = normalize_loudness(load_audio(path, codec.sample_rate, channels=codec.channels))
    with torch.inference_mode():
        return codec.encode(torch.from_numpy(samples), n_quantizers=k).T.numpy().astype(np.int64)


@pytest.fixture
def codec(codec_models):
    return codec_models["tiny"]


def test_cached_encode_equals_the_direct_path(codec) -> None:
    cache = SpeakerCache(codec, K, start_worker=False)
    future = cache.request(AUDIO_DIR / "reference_zh.wav")
    assert cache.run_pending() == 1
    codes = future.result()
    expected = direct(codec, AUDIO_DIR / "reference_zh.wav")
    assert codes.dtype == np.int64 and codes.shape == (38, K)
    assert np.array_equal(codes, expected)
    assert np.array_equal(cache.encode(str(AUDIO_DIR / "reference_zh.wav")), expected)  # str path, a hit
    assert cache.stats() == {"entries": 1, "hits": 1, "misses": 1, "encodes": 1, "batches": 1}


@pytest.mark.parametrize("variant", ["tiny", "tiny_ctx"])  # 10 s and 0.3 s attention windows
def test_one_batch_of_different_lengths_equals_single_encodes(codec_models, variant) -> None:
    codec = codec_models[variant]
    cache = SpeakerCache(codec, K, start_worker=False)
    futures = [cache.request(AUDIO_DIR / f) for f in FILES]
    assert not any(f.done() for f in futures)
    assert cache.run_pending() == len(FILES)
    assert cache.stats() == {"entries": 4, "hits": 0, "misses": 4, "encodes": 4, "batches": 1}
    frames = []
    for name, future in zip(FILES, futures):
        codes = future.result()
        assert np.array_equal(codes, direct(codec, AUDIO_DIR / name)), name
        frames.append(len(codes))
    assert frames == [38, 82, 97, 82]
    assert cache.run_pending() == 0


def test_a_round_takes_voices_up_to_max_round_seconds_of_padded_audio(codec, monkeypatch) -> None:
    """Every queued voice went into one encode_batch (47 clips, 141 s of audio, on the device at once);
    then a round's last clip went in whatever its length (59 short clips and a minute-long one: an hour
    of padded audio). A clip longer than the cap goes alone."""
    monkeypatch.setattr("mossserve.engine.speakers.MAX_ROUND_SECONDS", 16.0)
    cache = SpeakerCache(codec, K, start_worker=False)
    batches = []
    encode = cache._encode
    monkeypatch.setattr(cache, "_encode", lambda clips: batches.append([c.shape[-1] for c in clips]) or encode(clips))
    futures = [cache.request(AUDIO_DIR / f) for f in FILES]  # 3.0, 6.6, 7.8 and 6.6 s
    assert cache.run_pending() == 2  # 2 x 6.6 s padded; a third clip would make 3 x 7.8 s
    assert [f.done() for f in futures] == [True, True, False, False]
    assert cache.run_pending() == 2  # 2 x 7.8 s
    assert cache.run_pending() == 0
    rate = codec.sample_rate
    assert all(len(b) * max(b) <= 16.0 * rate for b in batches) and [len(b) for b in batches] == [2, 2]
    for name, future in zip(FILES, futures):
        assert np.array_equal(future.result(), direct(codec, AUDIO_DIR / name)), name
    assert cache.stats() == {"entries": 4, "hits": 0, "misses": 4, "encodes": 4, "batches": 2}
    monkeypatch.setattr("mossserve.engine.speakers.MAX_ROUND_SECONDS", 5.0)
    alone = SpeakerCache(codec, K, start_worker=False)
    futures = [alone.request(AUDIO_DIR / f) for f in (FILES[2], FILES[0])]  # 7.8 s, past the cap; 3.0 s
    assert alone.run_pending() == 1 and futures[0].done() and not futures[1].done()
    assert alone.run_pending() == 1 and futures[1].done()


def test_same_content_under_another_name_or_as_bytes_is_a_hit(codec, tmp_path) -> None:
    copy = tmp_path / "someone_else.wav"
    shutil.copyfile(AUDIO_DIR / "reference_en_3.mp3", copy)  # an mp3 named .wav: content decides
    cache = SpeakerCache(codec, K, start_worker=False)
    first = cache.request(AUDIO_DIR / "reference_en_3.mp3")
    cache.run_pending()
    second = cache.request(copy)
    third = cache.request((AUDIO_DIR / "reference_en_3.mp3").read_bytes())
    assert second.done() and third.done()
    assert np.array_equal(first.result(), second.result())
    assert np.array_equal(first.result(), third.result())
    assert cache.stats() == {"entries": 1, "hits": 2, "misses": 1, "encodes": 1, "batches": 1}


def test_a_different_quantizer_count_is_a_different_key(codec) -> None:
    path = AUDIO_DIR / "reference_zh.wav"
    a, b = SpeakerCache(codec, 8, start_worker=False), SpeakerCache(codec, 32, start_worker=False)
    fa, fb = a.request(path), b.request(path)
    a.run_pending(), b.run_pending()
    assert fa.result().shape == (38, 8) and fb.result().shape == (38, 32)
    assert np.array_equal(fa.result(), fb.result()[:, :8])  # residual quantizer: a prefix


def test_requests_for_one_voice_in_flight_share_one_future_and_one_encode(codec, tmp_path) -> None:
    path = AUDIO_DIR / "reference_zh.wav"
    copy = tmp_path / "copy.wav"
    shutil.copyfile(path, copy)
    cache = SpeakerCache(codec, K, start_worker=False)
    futures = [cache.request(path), cache.request(copy), cache.request(path.read_bytes()), cache.request(str(path))]
    assert all(f is futures[0] for f in futures)
    assert not futures[0].done()
    assert not futures[0].cancel()  # shared: one waiter cannot cancel it for the others
    assert cache.run_pending() == 1
    assert np.array_equal(futures[0].result(), direct(codec, path))
    assert cache.stats() == {"entries": 1, "hits": 3, "misses": 1, "encodes": 1, "batches": 1}


def test_returned_codes_cannot_corrupt_the_cache(codec) -> None:
    cache = SpeakerCache(codec, K, start_worker=False)
    future = cache.request(AUDIO_DIR / "reference_zh.wav")
    cache.run_pending()
    for codes in (future.result(), cache.encode(AUDIO_DIR / "reference_zh.wav")):
        with pytest.raises(ValueError):
            codes[0, 0] = -1
        with pytest.raises(ValueError):
            codes.flags.writeable = True
    assert np.array_equal(cache.encode(AUDIO_DIR / "reference_zh.wav"), direct(codec, AUDIO_DIR / "reference_zh.wav"))


def test_least_recently_used_voice_is_evicted(codec) -> None:
    a, b, c = (AUDIO_DIR / f for f in ("reference_zh.wav", "reference_en_0.mp3", "reference_02_s1.wav"))
    cache = SpeakerCache(codec, K, max_entries=2, start_worker=False)
    for path in (a, b):
        cache.request(path)
    cache.run_pending()
    assert cache.request(a).done()  # a hit: a is now the most recent
    cache.request(c)
    cache.run_pending()  # c in, b (least recent) out
    assert cache.stats()["entries"] == 2
    assert cache.request(a).done() and cache.request(c).done()
    again = cache.request(b)
    assert not again.done()  # evicted: encoded again
    cache.run_pending()
    assert np.array_equal(again.result(), direct(codec, b))
    assert cache.stats() == {"entries": 2, "hits": 3, "misses": 4, "encodes": 4, "batches": 3}


def test_bad_voices_fail_alone_and_are_not_cached(codec, tmp_path) -> None:
    text = tmp_path / "notes.wav"
    text.write_bytes(b"not audio at all\n" * 20)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    silent = io.BytesIO()
    sf.write(silent, np.zeros(24000, np.float32), 24000, format="WAV")
    too_short = io.BytesIO()
    sf.write(too_short, 0.5 * np.ones(1000, np.float32), 24000, format="WAV")  # < one 1920-sample frame

    cache = SpeakerCache(codec, K, start_worker=False)
    missing = cache.request(tmp_path / "missing.wav")
    nothing = cache.request(empty)
    assert missing.done() and nothing.done()  # nothing to read: failed at once
    bad = cache.request(text)
    good = cache.request(AUDIO_DIR / "reference_zh.wav")
    quiet = cache.request(silent.getvalue())
    short = cache.request(too_short.getvalue())
    good2 = cache.request(AUDIO_DIR / "reference_en_0.mp3")
    assert cache.run_pending() == 2

    with pytest.raises(AudioError, match=r"missing\.wav.*not found"):
        missing.result()
    with pytest.raises(AudioError, match=r"empty\.wav.*empty"):
        nothing.result()
    with pytest.raises(InvalidRequestError, match=r"notes\.wav.*cannot decode"):
        bad.result()
    with pytest.raises(AudioError, match=r"voice audio \(sha256 [0-9a-f]{12}\): audio is silent"):
        quiet.result()
    with pytest.raises(AudioError, match="shorter than one codec frame"):
        short.result()
    assert np.array_equal(good.result(), direct(codec, AUDIO_DIR / "reference_zh.wav"))
    assert np.array_equal(good2.result(), direct(codec, AUDIO_DIR / "reference_en_0.mp3"))
    # missing and empty never reached the cache (no content to key): not misses
    assert cache.stats() == {"entries": 2, "hits": 0, "misses": 5, "encodes": 2, "batches": 1}

    retry = cache.request(text)  # failures are not cached: a retry is tried again
    assert not retry.done()
    assert cache.run_pending() == 0
    assert isinstance(retry.exception(), AudioError)
    assert cache.stats()["misses"] == 6


class BreaksOnLongClips:
    """The tiny codec, except that an encode_batch holding a clip over `limit` samples fails."""

    def __init__(self, codec, limit: int) -> None:
        self.codec, self.limit = codec, limit

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def encode_batch(self, waves, n_quantizers=None):
        if any(w.shape[-1] > self.limit for w in waves):
            raise RuntimeError("out of memory (simulated)")
        return self.codec.encode_batch(waves, n_quantizers)


def test_a_failing_batch_falls_back_to_one_clip_at_a_time(codec) -> None:
    cache = SpeakerCache(BreaksOnLongClips(codec, limit=100_000), K, start_worker=False)
    short, long_ = cache.request(AUDIO_DIR / "reference_zh.wav"), cache.request(AUDIO_DIR / "reference_02_s1.wav")
    assert cache.run_pending() == 1
    assert np.array_equal(short.result(), direct(codec, AUDIO_DIR / "reference_zh.wav"))
    with pytest.raises(RuntimeError, match="simulated"):
        long_.result()
    assert cache.stats() == {"entries": 1, "hits": 0, "misses": 2, "encodes": 1, "batches": 3}


def test_many_threads_asking_for_one_voice_get_one_encode(codec) -> None:
    path = AUDIO_DIR / "reference_en.m4a"
    n = 16
    start = threading.Barrier(n)
    results: list[np.ndarray | None] = [None] * n

    def ask(i: int) -> None:
        start.wait()
        results[i] = cache.encode(path)

    cache = SpeakerCache(codec, K)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    expected = direct(codec, path)
    assert all(r is not None and np.array_equal(r, expected) for r in results)
    assert cache.stats() == {"entries": 1, "hits": n - 1, "misses": 1, "encodes": 1, "batches": 1}


def test_worker_serves_asyncio_callers(codec) -> None:
    paths = [AUDIO_DIR / f for f in FILES[:3]] * 2

    async def main(cache: SpeakerCache) -> list[np.ndarray]:
        return await asyncio.gather(*(asyncio.wrap_future(cache.request(p)) for p in paths))

    cache = SpeakerCache(codec, K)
    results = asyncio.run(main(cache))
    cache.close()
    for path, codes in zip(paths, results):
        assert np.array_equal(codes, direct(codec, path))
    stats = cache.stats()
    assert stats["encodes"] == 3 and stats["hits"] == 3 and stats["batches"] <= 3


def test_close_fails_queued_voices_and_refuses_new_ones(codec) -> None:
    cache = SpeakerCache(codec, K, start_worker=False)
    queued = cache.request(AUDIO_DIR / "reference_zh.wav")
    cache.close()
    with pytest.raises(EngineClosedError, match="closed"):
        queued.result()
    with pytest.raises(EngineClosedError, match="closed"):
        cache.request(AUDIO_DIR / "reference_zh.wav")


def test_arguments_are_checked(codec) -> None:
    with pytest.raises(ValueError, match="n_quantizers"):
        SpeakerCache(codec, 0, start_worker=False)
    with pytest.raises(ValueError, match="max_entries"):
        SpeakerCache(codec, K, max_entries=0, start_worker=False)
    with pytest.raises(TypeError, match="path or the file's bytes"):
        SpeakerCache(codec, K, start_worker=False).request(123)

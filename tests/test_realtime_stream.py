"""The streaming-session goldens (README §5.6-5.7) replayed over the model, prompts and sampling pieces.

`SessionDriver` is test-only: a B=1 reference-order replay of `MossTTSRealtimeStreamingSession` with a
one-slot KV cache that keeps growing across turns. It proves that the pieces the streaming path will
use (turn layouts, prefill rule, segmentation, the family's depth loop, history and RNG order) give
the reference's frames; it is not the engine's streaming-session implementation.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from realtime_cases import golden, golden_json, realtime_family

from mossserve.engine.kv_cache import SlotKVCache
from mossserve.layers.batch_context import BatchContext
from mossserve.models.family import Prompt
from mossserve.sampling import SamplingParams
from mossserve.text.realtime_prompt import orient_codes, prefill_length
from mossserve.text.realtime_segment import TextSegmentStream

SLOT = torch.tensor([0])


class SessionDriver:
    def __init__(self, sampling: SamplingParams) -> None:
        self.fam = fam = realtime_family()
        c = fam.backbone_config
        self.cache = SlotKVCache(c.num_hidden_layers, 1, 1024, c.num_key_value_heads, c.head_dim, torch.float32, "cpu")
        self.cache.allocate()
        self.state = fam.new_state(1, torch.device("cpu"))
        fam.admit(self.state, 0, Prompt(rows=np.zeros((1, 17), dtype=np.int64)), sampling)
        self.seen: list[np.ndarray] = []  # every row the backbone has taken since the cache was last reset
        self.fed_steps: list[np.ndarray] = []

    # ---- the session's API ----------------------------------------------------------------
    def reset_turn(self, turn_rows: np.ndarray, reset_cache: bool) -> None:
        if reset_cache:
            self.cache.lengths[0], self.seen = 0, []
        self.fam.restart(self.state, 0)
        self.turn_rows, self.pending, self.frames, self.fed_steps = turn_rows, [], [], []
        self.text = TextSegmentStream(self.fam.tokenizer.encode)
        self.prefilled = self.ended = self.stopped = False

    def push_text(self, delta: str) -> int:
        self.pending += self.text.push(delta)
        return self._drain_pending()

    def push_text_tokens(self, ids: list[int]) -> int:
        self.pending += list(ids)
        return self._drain_pending()

    def end_text(self) -> int:
        self.ended = True
        self.pending += self.text.end()
        return self._drain_pending()

    def drain_loop(self) -> int:
        """The servers' `drain(max_steps=1)` loop: text pads until EOS."""
        count = 0
        while self.prefilled and not self.stopped:
            self._step(self.fam.config.text_pad_id)
            count += 1
        return count

    # ---- inside ----------------------------------------------------------------------------
    def _drain_pending(self) -> int:
        before = len(self.frames)
        if not self.prefilled and self.pending and (len(self.pending) >= 12 or self.ended):
            count = prefill_length(len(self.pending), self.ended)
            ids, self.pending = self.pending[:count], self.pending[count:]
            self.prefill_rows = np.concatenate([self.turn_rows, self.fam.builder.prefill(ids)])
            self._frame(self.prefill_rows)
            self.prefilled = True
        while self.prefilled and self.pending and not self.stopped:
            self._step(self.pending.pop(0))
        return len(self.frames) - before

    def _step(self, token: int) -> None:
        row = np.concatenate([[token], self.frames[-1]])[None]
        self.fed_steps.append(row[0])
        self._frame(row)

    def _frame(self, rows: np.ndarray) -> None:
        start = self.cache.lengths[0]
        ctx = BatchContext.build([start], len(rows), [0], torch.device("cpu"))
        with torch.inference_mode():
            hidden = self.fam.model(torch.from_numpy(rows)[None], ctx, self.cache.k, self.cache.v)[:, -1]
            out = self.fam.step(self.state, hidden, SLOT)
        self.cache.lengths[0] += len(rows)
        self.seen.append(rows)
        self.frames.append(out.frames[0].numpy())
        self.stopped = bool(out.finished[0])


def sampling_of(run: dict, seed: int | None = None) -> SamplingParams:
    s = run["sampling"]
    return SamplingParams(audio_temperature=s["temperature"] if s["do_sample"] else 0.0, audio_top_p=s["top_p"],
                          audio_top_k=s["top_k"], audio_repetition_penalty=s["repetition_penalty"],
                          audio_repetition_window=s["repetition_window"], seed=seed)


def play(driver: SessionDriver, ops: list[dict]) -> None:
    for op in ops:
        name = op["op"]
        if name == "push_text":
            assert driver.push_text(op["arg"]) == op["frames"]
        elif name == "push_text_tokens":
            assert driver.push_text_tokens(op["arg"]) == op["frames"]
        elif name == "end_text":
            assert driver.end_text() == op["frames"]
        else:
            assert name == "drain(max_steps=1) loop"
            assert driver.drain_loop() == op["frames_total"]


def check_turn(driver: SessionDriver, key: str) -> None:
    g = golden("generation")
    assert np.array_equal(np.stack(driver.frames), g[f"{key}.frames"].numpy())
    assert np.array_equal(driver.prefill_rows, g[f"{key}.prefill_input_ids"].numpy())
    assert np.array_equal(np.stack(driver.fed_steps), g[f"{key}.step_input_rows"].numpy())


def codes(name: str) -> np.ndarray:
    return golden("prompts")[f"codes.{name}"].numpy()


def test_stream_multiturn() -> None:
    run = golden_json("generation")["runs"]["stream_multiturn"]
    g = golden("generation")
    driver = SessionDriver(sampling_of(run))
    builder = driver.fam.builder
    voice = orient_codes(codes("voice").T)  # passed as [16, 7]
    audio = [codes("user1"), codes("user2")]
    for turn, (spec, user_audio) in enumerate(zip(run["turns"], audio)):
        reset = spec["reset_turn"]
        rows = builder.user_turn(reset["user_text"], orient_codes(user_audio))
        if reset["include_system_prompt"]:
            rows = np.concatenate([builder.system(voice), rows])
        assert np.array_equal(rows, g[f"stream_multiturn.turn{turn}.turn_input_ids"].numpy())
        driver.reset_turn(rows, reset["reset_cache"])
        play(driver, spec["ops"])
        check_turn(driver, f"stream_multiturn.turn{turn}")
        if turn == 1:  # everything the backbone has seen when turn 1's prefill ran, EOS frame never fed
            context = np.concatenate(driver.seen[: len(driver.seen) - len(driver.frames) + 1])
            assert np.array_equal(context, g["stream_multiturn.turn1.context_input_ids"].numpy())


def test_stream_text_only_short() -> None:
    run = golden_json("generation")["runs"]["stream_text_only_short"]
    driver = SessionDriver(sampling_of(run))
    builder = driver.fam.builder
    rows = np.concatenate([builder.system(), builder.text_only_turn(golden_json("prompts")["cases"]["text_only_turn"]["args"]["text"])])
    assert np.array_equal(rows, golden("generation")["stream_text_only_short.turn0.turn_input_ids"].numpy())
    driver.reset_turn(rows, reset_cache=True)
    play(driver, run["turns"][0]["ops"])
    check_turn(driver, "stream_text_only_short.turn0")


def test_stream_zh_user_short_text() -> None:
    run = golden_json("generation")["runs"]["stream_zh_user_short_text"]
    driver = SessionDriver(sampling_of(run))
    builder = driver.fam.builder
    reset = run["turns"][0]["reset_turn"]
    voice = orient_codes(codes("voice"))  # passed as [7, 16]
    rows = np.concatenate([builder.system(voice), builder.user_turn(reset["user_text"], orient_codes(codes("user_zh")))])
    assert np.array_equal(rows, golden("generation")["stream_zh_user_short_text.turn0.turn_input_ids"].numpy())
    driver.reset_turn(rows, reset_cache=True)
    play(driver, run["turns"][0]["ops"])
    check_turn(driver, "stream_zh_user_short_text.turn0")


@pytest.mark.parametrize("seed_offset", [0, 1])
def test_stream_sampled_replays_the_seeded_run(seed_offset: int) -> None:
    """The reference's `torch.manual_seed(seed)` stream, replayed by the request's own generator."""
    run = golden_json("generation")["runs"]["stream_sampled"]
    driver = SessionDriver(sampling_of(run, seed=run["seed"] + seed_offset))
    builder = driver.fam.builder
    rows = np.concatenate([builder.system(orient_codes(codes("voice").T)),
                           builder.user_turn(run["user_text"], orient_codes(codes("user_short")))])
    driver.reset_turn(rows, reset_cache=True)
    expected = golden("generation")["stream_sampled.turn0.frames"].numpy()
    if seed_offset:  # another seed draws other codes: the match above is not luck
        for delta in run["push"]:
            driver.push_text(delta)
        driver.end_text()
        driver.drain_loop()
        assert not np.array_equal(np.stack(driver.frames)[: len(expected)], expected[: len(driver.frames)])
        return
    play(driver, run["ops"])
    assert np.array_equal(np.stack(driver.frames), expected)


@pytest.mark.parametrize("piece, good", [
    ("text", True), (None, True), ([1, 2], True), (np.array([3, 151935]), True),
    ([151936], False), ([-1], False), ([True], False), ([1.5], False), (b"ab", False), (5, False),
    ("a\udcffb", False),
])
def test_pushed_pieces_are_checked_before_they_reach_the_engine(piece, good: bool) -> None:
    from mossserve.errors import InvalidRequestError

    fam = realtime_family()
    if good:
        fam.check_input(piece)
    else:
        with pytest.raises(InvalidRequestError, match="text ids must be integers|text is not valid UTF-8"):
            fam.check_input(piece)

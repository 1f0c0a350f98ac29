"""Shared prompt prefixes and the decode step's cache reads (docs/performance.md, "First audio at 16").

New prompts that begin with rows another request already holds in the cache, or that an ended
request left in a free slot, start from those rows' keys and values instead of prefilling them;
the codes stay the reference's. Attention reads a run of
consecutive slots as a view of the cache and other slot lists with `index_select`: the same
values, and the same attention output bit for bit, as gathering by advanced indexing.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from test_engine import Outbox, check_against_golden, family, golden_requests

from mossserve.config import EngineConfig
from mossserve.engine.engine import Engine
from mossserve.engine.prefixes import common_prefix
from mossserve.engine.kv_cache import SlotKVCache
from mossserve.layers.attention import cached_keys
from mossserve.layers.batch_context import BatchContext, run_start
from mossserve.sampling import SamplingParams


def _counting_engine(shared_prefix_rows: int = 16, max_running: int = 16) -> tuple[Engine, list[int]]:
    """An unthreaded tiny_nvq32 engine and the list its prefill appends each piece's row count to."""
    engine = Engine(family("tiny_nvq32"), None, EngineConfig(threaded=False, max_running=max_running,
                                                              shared_prefix_rows=shared_prefix_rows))
    prefilled: list[int] = []
    prefill = engine.runner.prefill

    def counting(slots, pieces):
        prefilled.extend(len(p) for p in pieces)
        return prefill(slots, pieces)

    engine.runner.prefill = counting
    return engine, prefilled


def _run(shared_prefix_rows: int, copies: int = 3):
    """Every greedy golden request of tiny_nvq32, each submitted `copies` times at once."""
    engine, prefilled = _counting_engine(shared_prefix_rows)
    fam = engine.family
    outbox = Outbox()
    requests = golden_requests("tiny_nvq32")
    for name, rows, _, cap, *_ in requests:
        for copy in range(copies):
            engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink,
                               request_id=f"{name}#{copy}", max_new_frames=cap, decode_audio=False)
    engine.run_until_idle()
    return fam, requests, outbox, sum(prefilled), engine


def test_requests_sharing_a_prefix_copy_it_and_still_give_the_goldens() -> None:
    fam, requests, outbox, rows_with, engine = _run(shared_prefix_rows=16)
    for name, _, _, _, rows, frames, lengths in requests:
        for copy in range(3):
            check_against_golden(outbox.final(f"{name}#{copy}").generation, rows, frames, lengths, fam.columns)
    assert engine.stats()["cache_slots_used"] == 0
    *_, rows_without, _ = _run(shared_prefix_rows=0)
    assert rows_without == 3 * sum(len(r) for _, r, *_ in requests)
    # Identical prompts prefill only their last row; different ones share the chat template.
    assert rows_with < rows_without / 2


def test_a_copied_prefix_holds_the_values_its_own_prefill_would() -> None:
    """A second request with the same prompt waits one step for the first's prefill, then copies every
    row's keys and values but the last (whose hidden state it needs) and decodes the same rows."""
    fam = family("tiny_nvq32")
    rows = golden_requests("tiny_nvq32")[0][1]
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=4))
    outbox = Outbox()
    first = engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink, max_new_frames=8,
                               decode_audio=False)
    second = engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink, max_new_frames=8,
                                decode_audio=False)
    engine.step()  # the first is prefilled, the second waits for its prefix
    assert first.prefilled == len(rows) and second.prefilled == 0
    engine.step()  # the second copies all but its last row
    assert second.prefilled == len(rows)
    cache, n = engine.runner.cache, len(rows) - 1
    assert torch.equal(cache.k[:, second.slot, :, :n], cache.k[:, first.slot, :, :n])
    assert torch.equal(cache.v[:, second.slot, :, :n], cache.v[:, first.slot, :, :n])
    engine.run_until_idle()
    assert np.array_equal(outbox.final(first.id).generation.rows, outbox.final(second.id).generation.rows)


def _one_at_a_time(engine: Engine, requests, outbox: Outbox, tag: str) -> None:
    for name, rows, sampling, cap, *_ in requests:
        engine.add_request(engine.family.prompt_from_rows(rows), sampling, outbox.sink, request_id=f"{name}#{tag}",
                           max_new_frames=cap, decode_audio=False)
        engine.run_until_idle()


def test_a_prompt_seen_before_starts_from_the_slot_its_last_request_left() -> None:
    """Requests one after another (an idle server, a saved voice used again): the second time, each
    prompt finds its rows kept in a free slot and prefills only its last row; greedy and seeded
    codes are the goldens both times, and nothing is kept with sharing off."""
    requests = golden_requests("tiny_nvq32") + golden_requests("tiny_nvq32", seeded=True)
    engine, prefilled = _counting_engine(max_running=len(requests))
    outbox = Outbox()
    _one_at_a_time(engine, requests, outbox, "first")
    first = sum(prefilled)
    prefilled.clear()
    _one_at_a_time(engine, requests, outbox, "again")
    assert prefilled == [1] * len(requests)
    stats, total = engine.stats(), sum(len(rows) for _, rows, *_ in requests)
    assert stats["prompt_rows_prefilled"] == first + len(requests)
    assert stats["prompt_rows_reused"] == 2 * total - first - len(requests)
    assert stats["cache_slots_kept"] == len(requests) and stats["cache_slots_used"] == 0
    for name, _, _, _, rows, frames, lengths in requests:
        for tag in ("first", "again"):
            check_against_golden(outbox.final(f"{name}#{tag}").generation, rows, frames, lengths, engine.family.columns)
    assert first < sum(len(rows) for _, rows, *_ in requests)  # one at a time, the first round already shares templates
    off, prefilled_off = _counting_engine(shared_prefix_rows=0, max_running=len(requests))
    _one_at_a_time(off, requests, Outbox(), "first")
    _one_at_a_time(off, requests, Outbox(), "again")
    assert not off.runner.cache.kept and sum(prefilled_off) == 2 * sum(len(rows) for _, rows, *_ in requests)


def test_a_prompt_that_continues_an_ended_request_reuses_its_generated_rows_too() -> None:
    """An ended request's slot keeps its prompt and every row it fed back; a prompt that continues
    those rows prefills only what is new, and decodes what a fresh engine decodes for it."""
    fam = family("tiny_nvq32")
    name, rows, sampling, cap, *_ = golden_requests("tiny_nvq32")[0]
    engine, prefilled = _counting_engine(max_running=2)
    outbox = Outbox()
    engine.add_request(fam.prompt_from_rows(rows), sampling, outbox.sink, request_id="first", max_new_frames=cap,
                       decode_audio=False)
    engine.run_until_idle()
    emitted = outbox.final("first").generation.rows
    longer = np.concatenate([rows, emitted[:10]])
    prefilled.clear()
    engine.add_request(fam.prompt_from_rows(longer), sampling, outbox.sink, request_id="next", max_new_frames=12,
                       decode_audio=False)
    engine.run_until_idle()
    assert prefilled == [1]
    fresh, _ = _counting_engine(shared_prefix_rows=0, max_running=1)
    fresh_out = Outbox()
    fresh.add_request(fam.prompt_from_rows(longer), sampling, fresh_out.sink, request_id="next", max_new_frames=12,
                      decode_audio=False)
    fresh.run_until_idle()
    assert np.array_equal(outbox.final("next").generation.rows, fresh_out.final("next").generation.rows)


def test_new_prompts_copy_a_prefix_kept_in_a_free_slot() -> None:
    """Two new prompts that share the template with an ended request: the first takes the free
    slot that holds nothing and copies the template from the kept one, the second is handed the
    kept slot itself (the longest unused) and starts from it in place; both decode their goldens."""
    requests = [r for r in golden_requests("tiny_nvq32") if r[0] in ("tts/0", "continuation/0", "batch_generation/1")]
    engine, prefilled = _counting_engine(max_running=2)
    outbox = Outbox()
    _one_at_a_time(engine, requests[:1], outbox, "first")
    (kept_slot, kept_rows), = engine.runner.cache.kept.items()
    prefilled.clear()
    handles = [engine.add_request(engine.family.prompt_from_rows(rows), sampling, outbox.sink, request_id=f"{name}#next",
                                  max_new_frames=cap, decode_audio=False)
               for name, rows, sampling, cap, *_ in requests[1:3]]
    engine.step()
    shared = [min(common_prefix(kept_rows, rows), len(rows) - 1) for _, rows, *_ in requests[1:3]]
    assert shared == [48, 48] and handles[0].slot != kept_slot and handles[1].slot == kept_slot
    assert prefilled == [len(rows) - n for (_, rows, *_), n in zip(requests[1:3], shared)]
    engine.run_until_idle()
    for name, _, _, _, rows, frames, lengths in requests[1:3]:
        check_against_golden(outbox.final(f"{name}#next").generation, rows, frames, lengths, engine.family.columns)


def test_an_aborted_request_keeps_what_it_fed_and_a_failed_one_keeps_nothing(monkeypatch) -> None:
    name, rows, sampling, cap, *_ = golden_requests("tiny_nvq32")[0]
    engine, _ = _counting_engine(max_running=1)
    outbox = Outbox()
    handle = engine.add_request(engine.family.prompt_from_rows(rows), sampling, outbox.sink, max_new_frames=cap,
                                decode_audio=False)
    for _ in range(5):
        engine.step()
    slot = handle.slot
    engine.abort(handle.id)
    engine.run_until_idle()
    emitted = outbox.final(handle.id).generation.rows
    assert len(emitted) == 5 and np.array_equal(engine.runner.cache.kept[slot], np.concatenate([rows, emitted[:-1]]))

    def broken(slots):
        raise RuntimeError("boom in decode")

    monkeypatch.setattr(engine.runner, "decode", broken)
    failing = engine.add_request(engine.family.prompt_from_rows(rows), sampling, outbox.sink, max_new_frames=cap,
                                 decode_audio=False)
    engine.run_until_idle()
    assert outbox.final(failing.id).finish_reason == "error" and not engine.runner.cache.kept


def test_the_cache_hands_out_unlabelled_slots_first_then_the_longest_unused() -> None:
    cache = SlotKVCache(1, 4, 8, 1, 2, torch.float32, "cpu")
    slots = [cache.allocate() for _ in range(4)]
    assert slots == [0, 1, 2, 3]
    rows = np.ones((3, 2), dtype=np.int64)
    cache.release(2, rows)
    cache.release(0, rows * 2)
    cache.release(1)
    cache.release(3, rows[:0])  # nothing kept
    assert list(cache.kept) == [2, 0]
    assert cache.allocate() == 3 and cache.allocate() == 1  # unlabelled, most recently freed first
    assert cache.allocate() == 2 and list(cache.kept) == [0]  # then the longest unused label, dropped
    cache.release(2, rows)
    assert cache.allocate(2) == 2 and list(cache.kept) == [0] and cache.lengths[2] == 0


def test_common_prefix_counts_equal_leading_rows() -> None:
    a = np.arange(12).reshape(6, 2)
    b = a.copy()
    b[4, 1] = -1
    assert common_prefix(a, b) == 4
    assert common_prefix(a, a[:3]) == 3
    assert common_prefix(a, b[:0]) == 0


def test_slot_runs() -> None:
    assert run_start([3, 4, 5]) == 3 and run_start([7]) == 7
    assert run_start([0, 2]) is None and run_start([1, 0]) is None and run_start(None) is None and run_start([]) is None


def test_cache_reads_give_the_same_attention_as_advanced_indexing() -> None:
    """A view of consecutive slots and an index_select of any slots give the values advanced indexing
    gathers, and scaled_dot_product_attention returns the same bits over them."""
    g = torch.Generator().manual_seed(0)
    cache_k, cache_v = torch.randn(9, 4, 300, 64, generator=g), torch.randn(9, 4, 300, 64, generator=g)
    q = torch.randn(5, 8, 1, 64, generator=g)
    for slots in ([2, 3, 4, 5, 6], [6, 1, 3, 0, 8]):
        starts = [120, 7, 99, 0, 118]
        ctx = BatchContext.build(starts, 1, slots, torch.device("cpu"))
        assert (ctx.slot_run_start is not None) == (slots == [2, 3, 4, 5, 6])
        k, v = cached_keys(cache_k, ctx), cached_keys(cache_v, ctx)
        k_ref, v_ref = cache_k[ctx.slots, :, : ctx.kv_len], cache_v[ctx.slots, :, : ctx.kv_len]
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=True)
        ref = F.scaled_dot_product_attention(q, k_ref, v_ref, attn_mask=ctx.mask, enable_gqa=True)
        assert torch.equal(out, ref)

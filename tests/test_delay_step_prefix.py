"""Shared prompt prefixes and the decode step's cache reads (docs/performance.md, "First audio at 16").

New prompts that begin with rows another request already holds in the cache copy those rows' keys
and values instead of prefilling them; the codes stay the reference's. Attention reads a run of
consecutive slots as a view of the cache and other slot lists with `index_select`: the same
values, and the same attention output bit for bit, as gathering by advanced indexing.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from test_engine import Outbox, check_against_golden, family, golden_requests

from mossserve.config import EngineConfig
from mossserve.engine.engine import Engine, _common_prefix
from mossserve.layers.attention import cached_keys
from mossserve.layers.batch_context import BatchContext, run_start
from mossserve.sampling import SamplingParams


def _run(shared_prefix_rows: int, copies: int = 3):
    """Every greedy golden request of tiny_nvq32, each submitted `copies` times at once."""
    fam = family("tiny_nvq32")
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=16, shared_prefix_rows=shared_prefix_rows))
    prefilled: list[int] = []
    prefill = engine.runner.prefill

    def counting(slots, pieces):
        prefilled.extend(len(p) for p in pieces)
        return prefill(slots, pieces)

    engine.runner.prefill = counting
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


def test_common_prefix_counts_equal_leading_rows() -> None:
    a = np.arange(12).reshape(6, 2)
    b = a.copy()
    b[4, 1] = -1
    assert _common_prefix(a, b) == 4
    assert _common_prefix(a, a[:3]) == 3
    assert _common_prefix(a, b[:0]) == 0


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

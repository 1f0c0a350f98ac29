"""HF's top-k then top-p (layers/hf_warpers.py) without the whole sort: the same logits as the two
warpers one after the other, and the whole sort wherever equal values could make them differ."""
from __future__ import annotations

import pytest
import torch
from conftest import needs_cpu_kernels

from mossserve.layers import cpu_select
from mossserve.layers.hf_warpers import apply_top_k_hf, apply_top_k_top_p_hf, apply_top_p_hf


def counted_sorts(monkeypatch) -> list[int]:
    sorts, real = [], torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or real(*a, **k))
    return sorts


def case(seed: int, rows: int = 48, vocab: int = 1025) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * torch.tensor([0.2, 1.0, 5.0]).repeat(rows // 3)[:, None]
    top_k = torch.randint(1, 60, (rows,), generator=generator)
    top_p = torch.rand(rows, generator=generator, dtype=torch.float64).clamp(0.05, 1.0)
    top_p[::4] = 1.0  # rows without top-p among them
    return logits, top_k, top_p


@pytest.mark.parametrize("path", [pytest.param("kernel", marks=needs_cpu_kernels), "torch"])
@pytest.mark.parametrize("seed", range(4))
def test_distinct_logits_need_no_sort(seed: int, path: str, monkeypatch) -> None:
    """By our kernel's top k, or (a CPU without AVX-512, which always sorted) torch's top k + 1."""
    if path == "torch":
        monkeypatch.setattr(cpu_select, "_kernels_for", lambda x: None)
    logits, top_k, top_p = case(seed)
    expected = apply_top_p_hf(apply_top_k_hf(logits, top_k), top_p)
    sorts = counted_sorts(monkeypatch)
    assert torch.equal(apply_top_k_top_p_hf(logits, top_k, top_p), expected)
    assert not sorts, "distinct logits need no sort"


@pytest.mark.parametrize("path", [pytest.param("kernel", marks=needs_cpu_kernels), "torch"])
@pytest.mark.parametrize("change", ["tie at the k-th", "tie inside", "k off", "k past the vocabulary", "no top-p", "nan"])
def test_elsewhere_the_two_warpers_run(change: str, path: str, monkeypatch) -> None:
    if path == "torch":
        monkeypatch.setattr(cpu_select, "_kernels_for", lambda x: None)
    logits, top_k, top_p = case(7)
    order = torch.argsort(logits[2], descending=True)
    if change == "tie at the k-th":  # which of two equal values HF keeps is the sort's choice
        logits[2, order[top_k[2]]] = logits[2, order[top_k[2] - 1]]
    elif change == "tie inside":
        logits[2, order[1]] = logits[2, order[0]]
    elif change == "k off":
        top_k[5] = 0
    elif change == "k past the vocabulary":
        top_k[5] = logits.shape[-1]
    elif change == "nan":
        logits[4, order[0]] = float("nan")
    else:
        top_p[:] = 1.0
    expected = apply_top_p_hf(apply_top_k_hf(logits, top_k), top_p)
    sorts = counted_sorts(monkeypatch)
    torch.testing.assert_close(apply_top_k_top_p_hf(logits, top_k, top_p), expected, rtol=0, atol=0, equal_nan=True)
    assert sorts or change == "no top-p", "the whole sort decides here"


def test_other_dtypes_give_the_two_warpers_logits() -> None:
    logits, top_k, top_p = case(3)
    logits = logits.bfloat16()
    assert torch.equal(apply_top_k_top_p_hf(logits, top_k, top_p), apply_top_p_hf(apply_top_k_hf(logits, top_k), top_p))

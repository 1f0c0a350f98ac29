"""Hugging Face's top-k and top-p warpers, batched with per-row settings.

The Local and Realtime references sample through HF's logits processors, which differ from the
Delay reference's own sampler (layers/sampler.py): top-k keeps every logit tied with the k-th
value, and top-p sorts ascending and removes tokens whose cumulative probability is <= 1 - p
(never the most probable one). One implementation serves both families.
"""
from __future__ import annotations

import torch

from .cpu_select import distinct_top_k, top_k_rows


def apply_top_k_hf(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Remove each row's logits below its k-th largest, ties kept (k <= 0 or >= vocab: keep all)."""
    vocab = logits.shape[-1]
    active = (top_k > 0) & (top_k < vocab)
    if not bool(active.any()):
        return logits
    k = torch.where(active, top_k, 1)
    kth = top_k_rows(logits, int(k.max()))[0].gather(-1, (k - 1)[:, None])
    return logits.masked_fill(active[:, None] & (logits < kth), float("-inf"))


def apply_top_p_hf(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sort ascending, softmax, cumulative sum; remove tokens at or below 1 - p, keeping the most
    probable. 1 - p is taken in double and compared in the logits' dtype, as HF compares a tensor
    with a Python float."""
    active = top_p < 1.0
    if not bool(active.any()):
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p.double()).to(cumulative.dtype)[:, None]
    remove[:, -1] = False
    remove &= active[:, None]
    return logits.masked_fill(remove.scatter(1, sorted_indices, remove), float("-inf"))


def apply_top_k_top_p_hf(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`apply_top_p_hf(apply_top_k_hf(logits, top_k), top_p)` without sorting the whole vector where
    that gives the same bits: every row keeps a top-k smaller than the vocabulary, and no two of a
    row's k_max + 1 largest logits are equal (`distinct_top_k`). Then a row's ascending sort is its
    vocab - k entries at -inf (in an order that changes nothing) followed by its k kept logits in
    ascending order, which is laid out directly, and the same softmax and cumulative sum run over the
    same values in the same places. Elsewhere the two warpers run as they are."""
    vocab = logits.shape[-1]
    k_active = (top_k > 0) & (top_k < vocab)
    found = None
    if logits.dim() == 2 and bool(k_active.all()) and bool((top_p < 1.0).any()):
        found = distinct_top_k(logits, int(top_k.max()))
    if found is None:
        return apply_top_p_hf(apply_top_k_hf(logits, top_k), top_p)
    values, indices = found
    k_max = values.shape[-1]
    dropped = torch.arange(k_max, device=logits.device) >= top_k[:, None]  # past a row's own k
    places = (vocab - 1 - torch.arange(k_max, device=logits.device)).expand_as(indices)  # largest last
    ascending = torch.full_like(logits, float("-inf")).scatter_(1, places, values.masked_fill(dropped, float("-inf")))
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p.double()).to(cumulative.dtype)[:, None]
    remove[:, -1] = False
    remove &= (top_p < 1.0)[:, None]
    removed = remove.gather(1, places) | dropped
    return torch.full_like(logits, float("-inf")).scatter_(1, indices, values.masked_fill(removed, float("-inf")))

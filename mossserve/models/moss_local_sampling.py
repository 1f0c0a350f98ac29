"""The Local family's logits processors: Hugging Face's, in upstream's order, batched over rows.

Order per channel (only when the channel is sampled): repetition penalty (audio only) ->
temperature -> top-k (ties at the k-th value kept) -> top-p (HF's ascending rule) -> softmax ->
one draw. This differs from the Delay sampler (layers/sampler.py: temperature before penalty,
exactly k kept, descending top-p); the HF warpers are shared with Realtime (layers/hf_warpers.py).
Every setting is a per-row tensor: one call serves a channel of many requests. Greedy rows (temperature <= 0) take the
argmax of the raw logits: upstream applies no processor at all in greedy mode.
"""
from __future__ import annotations

import torch

from ..layers.cpu_select import argmax_rows
from ..layers.hf_warpers import apply_top_k_top_p_hf
from ..layers.sampler import apply_repetition_penalty, draw


def choose(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    noise: torch.Tensor | None,
    penalty: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of logits (R, V). Rows with temperature <= 0: argmax. Sampled rows draw
    argmax(probs / noise), which is torch's CPU `multinomial(probs, 1)` given its exponential noise."""
    return draw(argmax_rows(logits), temperature <= 0, noise,
                lambda: torch.softmax(processed_logits(logits, temperature, top_k, top_p, penalty, seen), dim=-1))


def processed_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    penalty: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits a sampled row draws from (before the softmax)."""
    if penalty is not None and seen is not None:
        logits = apply_repetition_penalty(logits, seen, penalty)
    safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logits = logits / safe[:, None].to(logits.dtype)
    return apply_top_k_top_p_hf(logits, top_k, top_p)

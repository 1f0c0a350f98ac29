"""Realtime sampling of one codebook for a batch of rows, in the reference's order (README §6).

Order: repetition penalty (also for greedy rows) -> argmax for greedy rows; the others:
/ temperature -> top-k (ties with the k-th value kept) -> top-p (ascending sort, tokens whose
cumulative probability is <= 1 - p removed, the most probable kept) -> softmax -> one draw.
These differ from the Delay sampler (which divides by the temperature first and keeps exactly k
and sorts descending); the HF warpers are shared with Local (layers/hf_warpers.py). Every setting is a per-row tensor; the
draw is `argmax(probs / noise)` with exponential noise, which is what torch's CPU
`multinomial(probs, 1)` computes, so a row's noise from its own generator replays the reference.
"""
from __future__ import annotations

import torch

from ..layers.cpu_select import argmax_rows
from ..layers.hf_warpers import apply_top_k_top_p_hf
from ..layers.sampler import draw


def window_seen(history: torch.Tensor, window: int | None, vocab: int) -> torch.Tensor:
    """history (B, T) token ids, oldest first -> (B, vocab) bool: ids among the last `window` (all if None or <= 0)."""
    if window is not None and window > 0:
        history = history[:, -window:]
    seen = torch.zeros(history.shape[0], vocab, dtype=torch.bool, device=history.device)
    return seen.scatter_(1, history, True)


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(filtered logits, probabilities) of the sampled path, for rows with temperature > 0."""
    filtered = apply_top_k_top_p_hf(logits / temperature[:, None], top_k, top_p)
    return filtered, torch.softmax(filtered, dim=-1)


def sample_codes(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 noise: torch.Tensor | None) -> torch.Tensor:
    """One code per row from (already penalized) logits (B, V). Rows with temperature <= 0 take the first
    maximum; the others draw with `noise` (B, V) (any values in greedy rows; None if every row is greedy)."""
    greedy = temperature <= 0
    safe_temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
    return draw(argmax_rows(logits), greedy, noise,
                lambda: filtered_probs(logits, safe_temperature, top_k, top_p)[1])

"""Fish S2 Pro sampling (fixtures/fish_s2_pro/README.md section 7), batched over rows.

Per row: sort descending; top-p on the *untempered* softmax (remove cum > p) and top-k by rank,
never rank 0; removed -> -inf; divide by max(temperature, 1e-5); softmax. The draw is
argmax(probs / -log(u)) with u = torch.rand over the whole vocabulary (the reference's
`rand_like`). Greedy is top_k = 1. Settings are float32 tensors, as the reference holds them.
"""
from __future__ import annotations

import torch

HIGH_TEMPERATURE, HIGH_TOP_P = 1.0, 0.9  # the repetition-aware re-sample (section 7.2)
RAS_WINDOW = 10  # decode steps whose slow tokens the repetition check looks at


def fish_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
               top_k: torch.Tensor) -> torch.Tensor:
    """logits (R, V) float32; temperature, top_p (R,) float32; top_k (R,) int64 (<= 0: off) -> probs (R, V)."""
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    k = torch.where(top_k > 0, top_k, vocab)
    remove = (cumulative > top_p[:, None]) | (torch.arange(vocab, device=logits.device) >= k[:, None])
    remove[:, 0] = False
    remove = torch.zeros_like(remove).scatter(-1, order, remove)
    logits = logits.masked_fill(remove, float("-inf")) / torch.clamp(temperature, min=1e-5)[:, None]
    return torch.softmax(logits, dim=-1)


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The reference's exponential race: argmax(probs / -log(u)) per row."""
    return torch.argmax(probs / -torch.log(uniform), dim=-1)


def choose(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           uniform: torch.Tensor | None) -> torch.Tensor:
    """One token per row: greedy rows (top_k == 1) take the argmax; the others draw with `uniform` (R, V)."""
    greedy = top_k == 1
    argmax = torch.argmax(logits, dim=-1)
    if bool(greedy.all()):
        return argmax
    return torch.where(greedy, argmax, draw(fish_probs(logits, temperature, top_p, top_k), uniform))


def repeated(tokens: torch.Tensor, window: torch.Tensor, semantic_start: int, semantic_end: int) -> torch.Tensor:
    """Rows whose semantic token occurs in their window (R, W) of recent decode-step tokens."""
    semantic = (tokens >= semantic_start) & (tokens <= semantic_end)
    return semantic & (window == tokens[:, None]).any(dim=-1)

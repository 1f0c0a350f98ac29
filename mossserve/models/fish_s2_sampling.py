"""Fish S2 Pro sampling (fixtures/fish_s2_pro/README.md section 7), batched over rows.

Per row: sort descending; top-p on the *untempered* softmax (remove cum > p) and top-k by rank,
never rank 0; removed -> -inf; divide by max(temperature, 1e-5); softmax. The draw is
argmax(probs / -log(u)) with u = torch.rand over the whole vocabulary (the reference's
`rand_like`). Greedy is top_k = 1. Settings are float32 tensors, as the reference holds them.
"""
from __future__ import annotations

import torch

from ..layers.cpu_select import argmax_rows

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
    return argmax_rows(probs / -torch.log(uniform))


def choose(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           uniform: torch.Tensor | None) -> torch.Tensor:
    """One token per row: greedy rows (top_k == 1) take the argmax; the others draw with `uniform` (R, V)."""
    greedy = top_k == 1
    argmax = argmax_rows(logits)
    if bool(greedy.all()):
        return argmax
    return torch.where(greedy, argmax, draw(fish_probs(logits, temperature, top_p, top_k), uniform))


def repeated(tokens: torch.Tensor, window: torch.Tensor, semantic_start: int, semantic_end: int) -> torch.Tensor:
    """Rows whose semantic token occurs in their window (R, W) of recent decode-step tokens."""
    semantic = (tokens >= semantic_start) & (tokens <= semantic_end)
    return semantic & (window == tokens[:, None]).any(dim=-1)


# ---- the same choices over the allowed ids only (docs/fish.md, "The slow head: allowed rows only") ----
#
# The slow logits are masked to the semantic ids and <|im_end|>, so every decision above is made
# among those A ids; the others score exactly 0 in the draw. Computing only those rows of the head
# rounds them differently from the whole head, and the sampler's sums over A terms may group their
# additions differently too. So a narrow choice comes with a certificate: it holds for *any* logits
# within `bound` of the narrow ones and *any* fp32 rounding of the sampler's softmax, cumsum, exp,
# log and divisions. A row without one is recomputed over the whole head (the caller's job).

U = 2.0 ** -24  # float32 unit roundoff
MATH_ERROR = 8 * U  # exp and log of any float32 library, relative (4 ulp; Sleef's are within 1 or 2)
SMALL = -60.0  # log(e_i) below which a float32 softmax term might leave the normal range
SLACK = 1e-9  # the certificate itself is evaluated in float64


def certified_argmax(logits: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy choice over the allowed ids (ascending: ties go to the lower id, as over the whole
    vocabulary) and whether it is certain: it beats every other id by more than both bounds."""
    index = argmax_rows(logits)
    best = logits.gather(1, index[:, None])[:, 0].double()
    rivals = (logits.double() + bound.double()).scatter(1, index[:, None], float("-inf")).amax(-1)
    low = best - bound.gather(1, index[:, None])[:, 0].double()
    return index, torch.isfinite(logits).all(-1) & (low - SLACK > rivals)


def certified_draw(logits: torch.Tensor, bound: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                   top_k: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`choose` for sampled rows over the allowed ids only: logits, bound, uniform (R, A). Returns the
    index into the allowed ids and whether the whole vocabulary's draw certainly picks the same id.

    The whole vector's top-k/top-p keep the first K of its sorted logits, K = max(1, min(k, f)),
    f = how many leading cumulative probabilities are <= p; its draw is the best probs/noise among
    them. Sorting moves each sorted value by at most the largest bound (D), so the cumulative sums
    are bracketed (`_cut_range`) and so is K: K_lo <= K <= K_hi. The narrow winner must be surely
    among the first K_lo and beat, with margin, every id that may be among the first K_hi."""
    values, order = torch.sort(logits.double(), dim=-1, descending=True)
    delta = bound.double().amax(-1)  # D (R,)
    k_lo, k_hi = _cut_range(values, delta, top_p, top_k)
    top = values.gather(1, (k_hi - 1)[:, None])
    may_keep = values >= top - 2 * delta[:, None]  # ids that may be among the whole vector's first K_hi

    t = torch.clamp(temperature, min=1e-5).double()[:, None]  # the float32 divisor, exactly
    tempered = values / t
    shift = tempered - tempered[:, :1]
    noise = -torch.log(uniform.gather(1, order).double())  # inf where u = 0: that id scores 0 exactly
    sorted_bound = bound.double().gather(1, order)
    spread = delta[:, None] / t + 1.02 * U * tempered[:, :1].abs()  # how far the whole vector's max may sit
    width_of = sorted_bound / t + 1.02 * (U * (tempered.abs() + shift.abs() + 1) + 2 * MATH_ERROR + 3 * U)
    score = tempered - torch.log(noise)
    low = score - width_of
    high = torch.maximum(shift + width_of, torch.full_like(shift, SMALL) + spread) + tempered[:, :1] - torch.log(noise)

    winner = argmax_rows(torch.where(may_keep, score, float("-inf")))[:, None]
    rivals = torch.where(may_keep, high, float("-inf")).scatter(1, winner, float("-inf")).amax(-1)
    win_value = values.gather(1, winner)
    rank = (values >= win_value - 2 * delta[:, None]).sum(-1) - 1  # ids that may sort before the winner
    exact = (torch.isfinite(logits).all(-1) & (rank < k_lo)
             & torch.isfinite(low.gather(1, winner)[:, 0]) & (low.gather(1, winner)[:, 0] - SLACK > rivals)
             & ((shift - width_of).gather(1, winner)[:, 0] - spread[:, 0] > SMALL))
    return order.gather(1, winner)[:, 0], exact


def _cut_range(values: torch.Tensor, delta: torch.Tensor, top_p: torch.Tensor,
               top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds (K_lo, K_hi) (R,) on how many sorted ids the whole vector's top-k/top-p keep.

    Exact arithmetic: the cumulative probability of the first j + 1 is 1 / (1 + B/A) (A: their
    exp-sum, B: the rest's); moving every sorted logit by at most D moves B/A by at most e^{2D}.
    Rounding, any order: each term's exp and its argument (exp error + u |s - max|), the total
    (one u per added non-zero term), 1/Z and the product (2u), the cumsum (one u per term)."""
    width = values.shape[-1]
    e = torch.exp(values - values[:, :1])
    head = torch.cumsum(e, dim=-1)
    rest = torch.flip(torch.cumsum(torch.flip(e, [-1]), dim=-1), [-1])[:, 1:]
    rest = torch.cat([rest, torch.zeros_like(rest[:, :1])], dim=-1)
    ratio = rest / head
    grow = torch.exp(2 * delta)[:, None]
    reach = values - values[:, :1] > -104.0 - 2 * delta[:, None]  # terms that may not be exactly 0
    terms = reach.sum(-1, keepdim=True)
    spread = torch.where(reach, values[:, :1] - values, torch.zeros_like(values)).amax(-1, keepdim=True)
    j = torch.arange(width, device=values.device, dtype=values.dtype)
    rho = 1.02 * (MATH_ERROR + U * (spread + 2 * delta[:, None] + 1) + U * (terms + j + 3))
    high = (1 + rho) / (1 + ratio / grow) + SLACK
    low = (1 - rho) / (1 + ratio * grow) - SLACK
    p = top_p.double()[:, None]
    f_lo = _leading(high < p)  # surely kept by top-p
    f_hi = _leading(~(low > p))  # not surely removed
    k = torch.where(top_k > 0, top_k, width).clamp(max=width)
    k_lo = torch.clamp(torch.minimum(k, f_lo), min=1)
    k_hi = torch.maximum(torch.clamp(torch.minimum(k, f_hi), min=1), k_lo)
    return k_lo, k_hi


def _leading(flags: torch.Tensor) -> torch.Tensor:
    """How many leading entries of each row are True (R,)."""
    return torch.cumprod(flags.to(torch.int64), dim=-1).sum(-1)

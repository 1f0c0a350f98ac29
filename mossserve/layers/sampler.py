"""Batched logits processing and sampling, in the reference's order.

Order per row: temperature -> repetition penalty -> top-k -> top-p -> softmax -> one draw.
Every setting is a per-row tensor, so one call serves rows of different requests and
codebooks. Randomness comes in from outside as exponential noise: a draw is
`argmax(probs / noise)`, which is exactly what torch's CPU `multinomial(probs, 1)` computes
from `noise = empty_like(probs).exponential_(1)`. The caller decides which generator fills
which rows (per-request streams, or the reference's one shared stream).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .cpu_random import BITS, random53
from .cpu_select import argmax_rows, top_k_rows


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; rows with temperature <= 0 are greedy and stay as they are."""
    return logits / torch.where(temperature > 0, temperature, torch.ones_like(temperature)).unsqueeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Logits of ids seen in the history: positive ones divided by the penalty, the rest multiplied."""
    penalty = penalty.unsqueeze(-1)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen & (penalty != 1.0), penalized, logits)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (k <= 0: keep all)."""
    return top_k_candidates(logits, top_k)[0]


def top_k_candidates(logits: torch.Tensor, top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`apply_top_k`, and the entries it may keep: (rows, k_max) indices in descending order of
    logit (a row of smaller k keeps the first k), None when every row keeps everything."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if bool((k >= vocab).all()):
        return logits, None
    k_max = int(k.max())
    values, indices = top_k_rows(logits, k_max)
    keep = torch.arange(k_max, device=logits.device) < k.unsqueeze(-1)
    filtered = torch.full_like(logits, float("-inf"))
    return filtered.scatter_(-1, indices, torch.where(keep, values, filtered[:, :k_max])), indices


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the smallest prefix of the sorted distribution whose mass before each token is <= p.

    `candidates` (from `top_k_candidates`) hold every entry of nonzero probability, in descending
    order of logit. Where their probabilities strictly decrease along it (no two equal), that is
    the sorted order, and the other entries are zeros that add nothing to the cumulative sums: the
    cut is computed over the candidates alone, the same as over the whole sorted vector (sorting
    512 x 1,025 values took 17 ms, more than the rest of a bf16 step of 16 requests). Equal ones keep
    the whole sort, whose order among equal values (torch's sort is not stable) decides which of
    them a cut removes."""
    active = top_p < 1.0
    if not bool(active.any()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    if candidates is not None:
        kept = probs.gather(-1, candidates)
        if bool(((kept[:, :-1] > kept[:, 1:]) | (kept[:, 1:] == 0)).all()):
            remove = _cut(kept, top_p, active)
            return logits.scatter(-1, candidates, logits.gather(-1, candidates).masked_fill(remove, float("-inf")))
    sorted_probs, sorted_indices = torch.sort(probs, descending=True, dim=-1)
    remove = torch.zeros_like(sorted_probs, dtype=torch.bool).scatter_(-1, sorted_indices,
                                                                       _cut(sorted_probs, top_p, active))
    return logits.masked_fill(remove, float("-inf"))


def _cut(sorted_probs: torch.Tensor, top_p: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Which entries of each descending row top-p removes: those after the mass before them passes p."""
    remove = torch.cumsum(sorted_probs, dim=-1) > top_p.unsqueeze(-1)
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return remove & active.unsqueeze(-1)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    penalty: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row. Rows with temperature <= 0 take the argmax after the penalty.

    `noise` (rows, vocab) holds exponential draws for the sampled rows (any values for greedy
    rows); it may be None when every row is greedy.
    """
    greedy = temperature <= 0
    all_greedy = bool(greedy.all())
    # Greedy rows are divided by 1, which changes nothing: an all-greedy batch skips the division.
    logits = logits.float() if all_greedy else apply_temperature(logits.float(), temperature)
    if penalty is not None and seen is not None:
        logits = apply_repetition_penalty(logits, seen, penalty)

    def probs() -> tuple[torch.Tensor, torch.Tensor | None]:
        filtered, candidates = top_k_candidates(logits, top_k)
        return torch.softmax(apply_top_p(filtered, top_p, candidates), dim=-1), candidates

    return draw(argmax_rows(logits), greedy, noise, probs)


def draw(greedy_tokens: torch.Tensor, greedy: torch.Tensor, noise: torch.Tensor | None,
         probs: Callable[[], torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """Greedy rows keep `greedy_tokens`; the others take argmax(probs / noise), which is what torch's
    CPU `multinomial(probs, 1)` computes from that exponential noise (`race`). `probs` is only
    computed (and `noise` only needed) when some row samples; it may also give the candidates that
    hold every nonzero probability (`top_k_candidates`)."""
    if bool(greedy.all()):
        return greedy_tokens
    if noise is None:
        raise ValueError("sampled rows need noise")
    made = probs()
    probabilities, candidates = made if isinstance(made, tuple) else (made, None)
    return torch.where(greedy, greedy_tokens, race(probabilities, noise, candidates))


def race(probs: torch.Tensor, noise: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """argmax(probs / noise) per row. `noise` is exponential noise, or the random bits it is made of
    (int64 on CPU, `exponential_draws`): then, where `candidates` hold every entry of nonzero probability
    and no bits are 0, only the candidates' noise is made and only they race (the other quotients
    are 0; ties go to the smaller index, as argmax's do). Zero bits make a noise of -0.0, whose
    quotients (NaN, -inf) the whole race decides. At 16 streams a step's audio draw made 524,800
    noise values for its 16 x 32 x 25 candidates."""
    if noise.dtype == torch.int64:
        if candidates is not None and int(noise.numpy().min()) > 0:  # numpy's min: 4x torch's reduction here
            quotients = probs.gather(-1, candidates) / noise_from_bits(noise.gather(-1, candidates), probs.device)
            best = quotients.amax(dim=-1, keepdim=True)
            winners = torch.where(quotients == best, candidates, probs.shape[-1]).amin(dim=-1)
            # None equals the best only in a row of NaN (its logits were not finite): that row takes its top
            # candidate, an id inside the vocabulary, so that it cannot break the rest of the batch.
            return torch.where(winners < probs.shape[-1], winners, candidates[..., 0])
        noise = noise_from_bits(noise, probs.device)
    return argmax_rows(probs / noise)


def exponential_noise(rows: int, vocab: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The draws torch's CPU multinomial makes for `rows` one-sample calls batched in one call.

    From a CPU generator they are made of the same random bits at a third of the cost where this
    torch build draws them that way (`bits_match_noise`): `exponential_` takes ~35 ns a value, one
    after another, the bits ~7 and the logarithm, vectorized, ~1."""
    return as_noise(exponential_draws(rows, vocab, generator, device), device)


def noise_by_request(drawing: torch.Tensor, generators: list[torch.Generator | None], vocab: int,
                     device: torch.device) -> torch.Tensor:
    """Exponential noise (B, n, vocab) for the drawing (row, position)s of `drawing` (B, n): each row's
    in one call to its request's generator, which draws them in position order as one call per
    position would (the numbers, and the generator left where those calls leave it); ones elsewhere.
    The Local and Realtime families' frames (their codebooks one after another) take it."""
    noise = torch.ones(*drawing.shape, vocab, device=device)
    for row, count in enumerate(drawing.sum(dim=1).tolist()):
        if count:
            noise[row][drawing[row]] = exponential_noise(count, vocab, generators[row], device)
    return noise


def exponential_draws(rows: int, vocab: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """`exponential_noise`'s draws for CPU sampling as the random bits they are made of (int64), where
    they make it exactly (`bits_match_noise`), so that `race` makes only the noise it needs; else
    the noise."""
    if (generator is None or generator.device.type == "cpu") and bits_match_noise(vocab):
        bits = exponential_bits(rows, vocab, generator)
        return bits if torch.device(device).type == "cpu" else noise_from_bits(bits, device)
    return _torch_exponential(rows, vocab, generator, device)


def _torch_exponential(rows: int, vocab: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    noise = torch.empty(rows, vocab, dtype=torch.float32, device=generator.device if generator is not None else device)
    noise.exponential_(1, generator=generator)
    return noise.to(device)


# A draw's uniform is (random64 & (2**53 - 1)) * 2**-BITS, its noise -log1p(-uniform).


def exponential_bits(rows: int, vocab: int, generator: torch.Generator | None) -> torch.Tensor:
    """The 53 random bits behind each draw of torch's `exponential_` over (rows, vocab), as int64.

    It takes exactly the generator's numbers that `exponential_` takes (one 64-bit draw per element,
    in the same order) without the logarithm, so a caller that needs the noise of a few columns only
    can turn just those into noise (`noise_from_bits`) and leave the stream where the full draw
    would. `bits_match_noise` checks that this torch build draws this way. torch's `random_` takes a
    third of `exponential_`'s time; our draw of the same numbers (layers/cpu_random.py) a fraction
    of that."""
    if generator is not None:
        bits = random53(rows, vocab, generator)  # the same numbers, drawn faster (layers/cpu_random.py)
        if bits is not None:
            return bits
    bits = torch.empty(rows, vocab, dtype=torch.int64, device=generator.device if generator is not None else "cpu")
    return bits.random_(0, 1 << BITS, generator=generator)


def as_noise(draws: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`exponential_draws`' draws as noise values."""
    return noise_from_bits(draws, device) if draws.dtype == torch.int64 else draws


def noise_from_bits(bits: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The exponential noise torch's `exponential_` makes of these bits (bit-exact: see `bits_match_noise`)."""
    uniform = bits.double() * 2.0 ** -BITS
    return (-torch.log1p(-uniform)).float().to(device)


_BITS_MATCH: dict[int, bool] = {}


def bits_match_noise(vocab: int) -> bool:
    """Whether `exponential_bits` + `noise_from_bits` reproduce torch's `exponential_` exactly, values
    and the generator's state after, on this torch build (checked once per width, on a few seeds)."""
    if vocab not in _BITS_MATCH:
        ok = True
        for seed in (0, 1, 12345):
            full, fast = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            noise = _torch_exponential(2, vocab, full, torch.device("cpu"))
            bits = exponential_bits(2, vocab, fast)
            ok = ok and torch.equal(noise_from_bits(bits, torch.device("cpu")), noise)
            for width in (1, 2, 3):  # a few columns alone (another kernel path than the whole row)
                ok = ok and torch.equal(noise_from_bits(bits[:, -width:], torch.device("cpu")), noise[:, -width:])
            ok = ok and torch.equal(full.get_state(), fast.get_state())
        _BITS_MATCH[vocab] = ok
    return _BITS_MATCH[vocab]

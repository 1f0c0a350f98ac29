"""The Fish slow head over the allowed ids only (docs/fish.md, "The slow head: allowed rows only"),
against the whole computation written out here: the whole head for one row at a time, the
reference's mask, the reference's sampler (fixtures/fish_s2_pro/README.md section 7) and the same
uniform draws. Same tokens, greedy and sampled; near-ties built on purpose take the whole head (and
are checked to); a row gives the same token alone and in a batch; a whole step leaves every
request's generator where the whole computation leaves it."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fish_cases import FISH_DIR, family, gen_case

from mossserve.layers.batch_context import BatchContext
from mossserve.layers.heads import project
from mossserve.models.fish_s2_family import BOUND_SAFETY
from mossserve.models.fish_s2_sampling import (
    RAS_WINDOW,
    certified_argmax,
    certified_draw,
)
from mossserve.sampling import SamplingParams

SETTINGS = [(0.8, 0.8, 30), (1.0, 1.0, 0), (0.7, 0.95, 0), (1.0, 0.9, 5), (0.5, 0.3, 100), (1.3, 0.99, 2)]


# ---- the whole computation, written out ----------------------------------------------------------
def reference_mask() -> torch.Tensor:
    c = family().config
    every = torch.arange(c.slow.vocab_size)
    allowed = ((every >= c.semantic_start) & (every <= c.semantic_end)) | (every == c.eos_token_id)
    return torch.where(allowed, 0.0, float("-inf"))


def whole_logits(hidden: torch.Tensor) -> torch.Tensor:
    """The whole head for each row alone (the shape the fallback uses), masked."""
    weight = family().model.slow.embed_tokens.weight
    return torch.cat([project(hidden[i : i + 1], weight).float() for i in range(len(hidden))]) + reference_mask()


def reference_choice(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                     uniform: torch.Tensor | None) -> int:
    """README section 7 for one row: greedy is top_k = 1; else top-p on the untempered softmax and
    top-k by rank (never rank 0), divide by the temperature, softmax, argmax(probs / -log u)."""
    if top_k == 1:
        return int(torch.argmax(logits))
    values, order = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(torch.softmax(values, dim=-1), dim=-1)
    remove = cumulative > torch.tensor(top_p, dtype=torch.float32)
    if top_k > 0:
        remove |= torch.arange(len(values)) >= top_k
    remove[0] = False
    kept = logits.clone()
    kept[order[remove]] = float("-inf")
    probs = torch.softmax(kept / max(torch.tensor(temperature, dtype=torch.float32), torch.tensor(1e-5)), dim=-1)
    return int(torch.argmax(probs / -torch.log(uniform)))


def reference_tokens(hidden, settings, u_normal, u_high, window, first) -> list[int]:
    c = family().config
    logits = whole_logits(hidden)
    tokens = []
    for i, (t, p, k) in enumerate(settings):
        normal = reference_choice(logits[i], t, p, k, None if u_normal is None else u_normal[i])
        repeated = c.semantic_start <= normal <= c.semantic_end and normal in window[i].tolist() and not first[i]
        if repeated:
            tokens.append(reference_choice(logits[i], 1.0, 0.9, k, None if u_high is None else u_high[i]))
        else:
            tokens.append(normal)
    return tokens


# ---- inputs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hidden() -> torch.Tensor:
    """Real slow states: every position of three fixture prompts (final-normed), and a few scaled."""
    fam, states = family(), []
    with torch.no_grad():
        for name in ("plain", "clone", "emotion"):
            rows = torch.from_numpy(gen_case(name).prompts[0])
            states.append(fam.model(rows[None], BatchContext.build([0], len(rows), None, rows.device))[0])
    states = torch.cat(states)
    return torch.cat([states, 3 * states[:16], 0.2 * states[16:32]]).contiguous()


def run(hidden, settings, u_normal=None, u_high=None, window=None, first=None):
    fam, rows = family(), len(hidden)
    t = torch.tensor([s[0] for s in settings], dtype=torch.float32)
    p = torch.tensor([s[1] for s in settings], dtype=torch.float32)
    k = torch.tensor([s[2] for s in settings], dtype=torch.int64)
    window = torch.zeros(rows, RAS_WINDOW, dtype=torch.int64) if window is None else window
    first = torch.zeros(rows, dtype=torch.bool) if first is None else first
    with torch.no_grad():
        tokens, wide = fam.slow_tokens(hidden, t, p, k, u_normal, u_high, window, first)
    expected = reference_tokens(hidden, settings, u_normal, u_high, window, first)
    return tokens.tolist(), wide, expected


def uniforms(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = family().config.slow.vocab_size
    return torch.rand(rows, vocab, generator=g), torch.rand(rows, vocab, generator=g)


def allowed_ids() -> torch.Tensor:
    return torch.nonzero(reference_mask() == 0).flatten()


# ---- greedy and sampled rows --------------------------------------------------------------------
def test_greedy_rows(hidden) -> None:
    tokens, wide, expected = run(hidden, [(1.0, 0.9, 1)] * len(hidden))
    assert tokens == expected
    assert wide.float().mean() < 0.1  # the narrow head decides nearly every row


@pytest.mark.parametrize("setting", SETTINGS)
def test_sampled_rows(hidden, setting) -> None:
    u_normal, u_high = uniforms(len(hidden), 11)
    tokens, wide, expected = run(hidden, [setting] * len(hidden), u_normal, u_high)
    assert tokens == expected
    assert wide.float().mean() < 0.25


def test_mixed_rows_and_the_repetition_aware_resample(hidden) -> None:
    """Settings differ per row; half the rows have their normal token in the window (so the high
    sample is taken), some of those are a batch's first step (no repetition check)."""
    rows = len(hidden)
    settings = [SETTINGS[i % len(SETTINGS)] if i % 7 else (1.0, 0.9, 1) for i in range(rows)]
    u_normal, u_high = uniforms(rows, 12)
    plain, _, _ = run(hidden, settings, u_normal, u_high)
    window = torch.zeros(rows, RAS_WINDOW, dtype=torch.int64)
    window[::2, 3] = torch.tensor(plain)[::2]
    first = torch.zeros(rows, dtype=torch.bool)
    first[::6] = True
    tokens, _, expected = run(hidden, settings, u_normal, u_high, window, first)
    assert tokens == expected
    hit = torch.zeros(rows, dtype=torch.bool)
    hit[::2] = True
    assert (torch.tensor(tokens) != torch.tensor(plain))[hit & ~first].any()  # the high sample was taken


def test_a_row_gives_the_same_token_alone_and_in_a_batch(hidden) -> None:
    rows = len(hidden)
    settings = [SETTINGS[i % len(SETTINGS)] if i % 5 else (1.0, 0.9, 1) for i in range(rows)]
    u_normal, u_high = uniforms(rows, 13)
    batch, _, _ = run(hidden, settings, u_normal, u_high)
    for i in range(0, rows, 7):
        alone, _, _ = run(hidden[i : i + 1], settings[i : i + 1], u_normal[i : i + 1], u_high[i : i + 1])
        assert alone == batch[i : i + 1]


# ---- near-ties: the whole head, alone -----------------------------------------------------------
def logits_bound(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The narrow logits and bound the family computes (allowed ids ascending)."""
    from mossserve.layers.head_bound import head_rounding_bound

    head = family()._narrow_head()
    logits = project(hidden, head.weight).float()
    return logits, BOUND_SAFETY * head_rounding_bound(head.weight_abs, hidden, logits, head.weight)


def tie_ranks(h: torch.Tensor, first: int, second: int) -> torch.Tensor:
    """A state near `h` whose allowed logits of ranks `first` and `second` are equal up to float32
    (moved along the difference of their two weight rows, until the ranks hold still)."""
    weight = family().model.slow.embed_tokens.weight.double()
    ids = allowed_ids()
    for _ in range(8):
        order = torch.sort(logits_bound(h[None])[0][0], descending=True).indices
        a, b = int(ids[order[first]]), int(ids[order[second]])
        v = weight[a] - weight[b]
        h = (h.double() - (h.double() @ v) / (v @ v) * v).float()
    return h


def test_a_greedy_near_tie_takes_the_whole_head(hidden) -> None:
    states = torch.stack([tie_ranks(hidden[i], 0, 1) for i in range(6)])
    logits, bound = logits_bound(states)
    ranked = torch.sort(logits, descending=True).values
    assert ((ranked[:, 0] - ranked[:, 1]) < bound.amax(-1)).all()  # inside the margin: a real near-tie
    tokens, wide, expected = run(states, [(1.0, 0.9, 1)] * len(states))
    assert tokens == expected and wide.all()
    mixed = torch.cat([hidden[:10], states])
    tokens, wide, expected = run(mixed, [(1.0, 0.9, 1)] * len(mixed))
    assert tokens == expected and wide[10:].all()


def draw_inputs(hidden: torch.Tensor, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    states = hidden[:rows].clone()
    u_normal, u_high = uniforms(rows, seed)
    return states, u_normal, u_high


def test_a_near_tie_in_the_draw_takes_the_whole_head(hidden) -> None:
    """Two kept ids whose probs / noise are equal up to float32: u_b = u_a ** (p_b / p_a)."""
    rows, (t, p, k) = 8, (0.8, 0.8, 30)
    states, u_normal, u_high = draw_inputs(hidden, rows, 14)
    logits, _ = logits_bound(states)
    ids = allowed_ids()
    order = torch.sort(logits, descending=True).indices
    for i in range(rows):
        a, b = ids[order[i, 0]], ids[order[i, 1]]
        u_normal[i, ids] = 1e-30  # everything else scores about nothing
        u_normal[i, a] = 0.5
        ratio = torch.exp((logits[i, order[i, 1]].double() - logits[i, order[i, 0]].double()) / t)
        u_normal[i, b] = float(torch.tensor(0.5, dtype=torch.float64) ** ratio)
    tokens, wide, expected = run(states, [(t, p, k)] * rows, u_normal, u_high)
    assert tokens == expected and wide.all()


def test_a_top_k_boundary_near_tie_takes_the_whole_head_when_it_matters(hidden) -> None:
    """The k-th and (k+1)-th logits nearly equal. When either would win the draw the row takes the
    whole head; when a clear winner sits well inside the kept set, the narrow head decides."""
    ids = allowed_ids()
    k = 2
    top = torch.stack([tie_ranks(hidden[i], 1, 2) for i in range(6)])
    logits, bound = logits_bound(top)
    ranked, order = torch.sort(logits, descending=True)
    assert ((ranked[:, 1] - ranked[:, 2]) < 2 * bound.amax(-1)).all()
    u_normal, u_high = uniforms(len(top), 15)
    tied = u_normal.clone()
    for i in range(len(top)):  # the tied pair draws the smallest noise: one of them would win
        tied[i, ids[order[i, 1]]] = tied[i, ids[order[i, 2]]] = 1 - 2 ** -24
    tokens, wide, expected = run(top, [(1.0, 1.0, k)] * len(top), tied, u_high)
    assert tokens == expected and wide.all()
    clear = u_normal.clone()
    for i in range(len(top)):  # the clear leader draws the smallest noise, the pair a large one
        clear[i, ids[order[i, 0]]] = 1 - 2 ** -24
        clear[i, ids[order[i, 1]]] = clear[i, ids[order[i, 2]]] = 1e-6
    tokens, wide, expected = run(top, [(1.0, 1.0, k)] * len(top), clear, u_high)
    assert tokens == expected and not wide.any()


def test_a_top_p_cut_near_tie_takes_the_whole_head(hidden) -> None:
    """top_p equal to a cumulative probability of the whole vector: the id at the cut wins the draw."""
    rows = 6
    states, u_normal, u_high = draw_inputs(hidden, rows, 16)
    logits = whole_logits(states)
    ids = allowed_ids()
    settings = []
    for i in range(rows):
        values, order = torch.sort(logits[i], descending=True)
        cumulative = torch.cumsum(torch.softmax(values, dim=-1), dim=-1)
        j = 3 + i
        settings.append((1.0, float(cumulative[j]), 0))
        u_normal[i, ids] = 1e-6
        u_normal[i, order[j]] = 1 - 2 ** -24  # the last kept id wins if it is kept
        u_normal[i, order[j + 1]] = 1 - 2 ** -24  # and the first removed one if it is not
    tokens, wide, expected = run(states, settings, u_normal, u_high)
    assert tokens == expected and wide.all()


def test_a_near_tie_in_the_high_sample_matters_only_when_it_is_taken(hidden) -> None:
    rows = 6
    states, u_normal, u_high = draw_inputs(hidden, rows, 17)
    logits, _ = logits_bound(states)
    ids = allowed_ids()
    order = torch.sort(logits, descending=True).indices
    for i in range(rows):  # the high sample (T 1.0) is a near-tie in every row
        a, b = ids[order[i, 0]], ids[order[i, 1]]
        u_high[i, ids] = 1e-30
        u_high[i, a] = 0.5
        ratio = torch.exp(logits[i, order[i, 1]].double() - logits[i, order[i, 0]].double())
        u_high[i, b] = float(torch.tensor(0.5, dtype=torch.float64) ** ratio)
    setting = [(0.8, 0.8, 30)] * rows
    plain, wide_plain, expected = run(states, setting, u_normal, u_high)
    assert plain == expected and not wide_plain.any()  # the high sample is not taken: no need for it
    window = torch.zeros(rows, RAS_WINDOW, dtype=torch.int64)
    window[:, 0] = torch.tensor(plain)
    tokens, wide, expected = run(states, setting, u_normal, u_high, window)
    assert tokens == expected and wide.all()


def test_all_kept_ids_drawing_zero_take_the_whole_vector(hidden) -> None:
    """u = 0 gives infinite noise and a zero score; when every kept id draws it, the whole vector's
    argmax is id 0 (a masked id), which only the whole head reproduces."""
    states, u_normal, u_high = draw_inputs(hidden, 3, 18)
    u_normal[:, allowed_ids()] = 0.0
    tokens, wide, expected = run(states, [(0.8, 0.8, 30)] * 3, u_normal, u_high)
    assert tokens == expected == [0, 0, 0] and wide.all()


def test_a_state_that_could_overflow_the_head_takes_the_whole_head(hidden) -> None:
    states = hidden[:3] * 1e36
    tokens, wide, expected = run(states, [(1.0, 0.9, 1)] * 3)
    assert tokens == expected and wide.all()


def test_the_certificates_refuse_exact_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5]])
    bound = torch.full_like(logits, 1e-7)
    index, exact = certified_argmax(logits, bound)
    assert index.item() == 1 and not exact.item()
    uniform = torch.full_like(logits, 0.5)
    one = torch.ones(1)
    _, exact = certified_draw(logits, bound, one, one, torch.tensor([1]), uniform)  # top-k 1 on a tie
    assert not exact.item()
    _, exact = certified_draw(logits, bound, one, one, torch.tensor([0]), uniform)  # equal scores
    assert not exact.item()
    index, exact = certified_draw(logits, bound, one, one, torch.tensor([0]), torch.tensor([[0.5, 0.9, 0.1, 0.5]]))
    assert index.item() == 1 and exact.item()


# ---- a whole step -------------------------------------------------------------------------------
def test_a_step_matches_the_whole_computation_and_leaves_the_generators_alike(hidden) -> None:
    """Seeded and greedy requests in one batch: the step's rows equal a step written out from copies
    of their generators (whole-vocabulary draws, the whole head), and the generators end alike."""
    fam = family()
    c = fam.config
    rows = 8
    state = fam.new_state(rows, torch.device("cpu"))
    settings = [SETTINGS[i % len(SETTINGS)] if i % 4 else (1.0, 0.9, 1) for i in range(rows)]
    for slot, (t, p, k) in enumerate(settings):
        sampling = SamplingParams(audio_temperature=t, audio_top_p=p, audio_top_k=k, seed=100 + slot)
        fam.admit(state, slot, fam.prompt_from_rows(np.zeros((1, fam.columns), dtype=np.int64)), sampling)
    state.first[:] = False
    slots = torch.arange(rows)
    for step in range(3):
        h = hidden[step * rows : (step + 1) * rows]
        copies = [copy.deepcopy(g) for g in state.generators]
        width = 2 * c.slow.vocab_size + (c.num_codebooks - 1) * c.codebook_size
        drawn = torch.stack([torch.rand(width, generator=g) if g is not None else torch.full((width,), 0.5)
                             for g in copies])
        u_normal, u_high, u_fast = drawn.split([c.slow.vocab_size, c.slow.vocab_size, width - 2 * c.slow.vocab_size], 1)
        window = state.window[slots].clone()
        expected = reference_tokens(h, settings, u_normal, u_high, window, state.first[slots])
        t, p, k = (torch.tensor([s[j] for s in settings]) for j in range(3))
        with torch.no_grad():
            codes = fam._fast(h, torch.tensor(expected), t.float(), p.float(), k.long(),
                              u_fast if any(g is not None for g in copies) else None)
            out = fam.step(state, h, slots)
        assert out.rows[:, 0].tolist() == expected
        assert torch.equal(out.rows[:, 1:], codes)
        for g, mine in zip(copies, state.generators):
            assert (g is None) == (mine is None)
            if g is not None:
                assert torch.equal(g.get_state(), mine.get_state())


# ---- bfloat16 -----------------------------------------------------------------------------------
def test_bfloat16_rows_are_decided_by_the_narrow_head(hidden) -> None:
    """With bf16 weights the narrow head still decides nearly every row: its logits are float32
    products of the bf16 values, like the whole head's (`FishS2Model.logits`), so the rounding bound
    is float32's. (Rounded to bf16 they took the whole head for about 40 % of the bench's rows.)
    Tokens equal the whole bf16 head's for each row alone, greedy and sampled."""
    from mossserve.models.registry import load_talker

    fam = load_talker(FISH_DIR, dtype="bfloat16")
    states = hidden.to(torch.bfloat16)
    rows = len(states)
    mask = reference_mask()
    whole = torch.cat([fam.model.logits(states[i : i + 1]) for i in range(rows)]) + mask
    window = torch.zeros(rows, RAS_WINDOW, dtype=torch.int64)
    first = torch.zeros(rows, dtype=torch.bool)
    for setting, seed in (((1.0, 0.9, 1), None), ((0.8, 0.8, 30), 14)):
        u_normal, u_high = (None, None) if seed is None else uniforms(rows, seed)
        t, p, k = (torch.tensor([setting[j]] * rows) for j in range(3))
        with torch.no_grad():
            tokens, wide = fam.slow_tokens(states, t.float(), p.float(), k.long(), u_normal, u_high, window, first)
        expected = [reference_choice(whole[i], *setting, None if u_normal is None else u_normal[i]) for i in range(rows)]
        assert tokens.tolist() == expected
        assert wide.float().mean() < 0.1

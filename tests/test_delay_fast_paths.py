"""The Delay family's decode-step fast paths against the full computation on the same states.

The fast step computes two columns of the text head for rows in audio mode, no head at all for
rows whose outputs are forced, and turns only two columns of a seeded request's text draw into
noise. The reference here is written out row by row, the slow way: the whole text head and the
whole audio head for every row, the reference's masks, and the noise of every sampled row drawn
over the whole vocabulary from a copy of the row's generator. Tokens, forced outputs and the
generators' states after the step (the same draws, in the same order) must all agree.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import DELAY_DIR, load_delay_model
from delay_cases import generation_cases

import mossserve.models.moss_delay_family as delay_family
from mossserve.layers.sampler import (
    apply_repetition_penalty,
    apply_temperature,
    bits_match_noise,
    exponential_bits,
    exponential_noise,
    noise_from_bits,
    sample,
)
from mossserve.models.moss_delay_family import INACTIVE, DelayState, MossDelayFamily
from mossserve.sampling import SamplingParams

CPU = torch.device("cpu")
CHECKPOINTS = ["tiny_nvq32", "tiny_nvq16"]


def family(checkpoint: str) -> MossDelayFamily:
    return MossDelayFamily(load_delay_model(DELAY_DIR / checkpoint), tokenizer=None)


def torch_noise(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """torch's own exponential draws, which the reference's multinomial makes (ours take a faster road)."""
    return torch.empty(rows, vocab).exponential_(1, generator=generator)


def copy_generator(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None:
        return None
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    return copy


def copy_state(state: DelayState) -> DelayState:
    values = {}
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        if isinstance(value, torch.Tensor):
            value = value.clone()
        elif field.name == "generators":
            value = [copy_generator(g) for g in value]
        elif field.name == "shared_generator":
            value = copy_generator(value)
        values[field.name] = value
    return DelayState(**values)


def allowed_text(fam: MossDelayFamily, audio_mode: bool, step: int) -> torch.Tensor:
    """The reference's text mask for one row, written out: True where an id may be chosen."""
    cfg, vocab = fam.config, fam.config.language.vocab_size
    if audio_mode:
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[[cfg.audio_assistant_gen_slot_token_id, cfg.audio_assistant_delay_slot_token_id]] = True
    else:
        allowed = torch.ones(vocab, dtype=torch.bool)
        allowed[[cfg.pad_token_id, cfg.audio_assistant_gen_slot_token_id, cfg.audio_assistant_delay_slot_token_id,
                 cfg.audio_end_token_id]] = False
    if step == 0:
        allowed[151662] = False
    if step <= cfg.n_vq:
        allowed[cfg.im_end_token_id] = False
    return allowed


def reference_text_token(fam, state, logits: torch.Tensor, slot: int, audio_mode: bool, step: int,
                         generator: torch.Generator, noise_patch=None) -> int:
    """One row's text token from the whole head's logits, drawing over the whole vocabulary."""
    vocab = fam.config.language.vocab_size
    masked = logits.masked_fill(~allowed_text(fam, audio_mode, step), float("-inf"))[None]
    temperature = state.text_temperature[slot : slot + 1]
    noise = None
    if float(temperature) > 0:
        noise = torch_noise(1, vocab, generator)
        if noise_patch is not None:
            noise = noise_patch(noise)
    return int(sample(masked, temperature, state.text_top_k[slot : slot + 1], state.text_top_p[slot : slot + 1],
                      noise=noise)[0])


def reference_step(fam: MossDelayFamily, state: DelayState, hidden: torch.Tensor, slots: list[int]):
    """(text tokens, codes (B, n)) of one step, row by row with the full heads; per-request generators."""
    cfg, n = fam.config, fam.config.n_vq
    codes_per_head = cfg.audio_vocab_size + 1
    # The whole heads. The rows that sample text in text mode, and those that sample any audio code,
    # go through each head together, as the family does (the tiny fixtures' logits carry near-ties
    # that a matmul of another row count settles differently; the audio-mode text rows are the
    # point of this test: each goes through the whole head alone, which defines the answer of a
    # near-tie independently of the batch).
    text_mode = [i for i, s in enumerate(slots) if not state.stopping[s] and state.delayed[s] == INACTIVE
                 and not state.is_audio[s]]
    text_logits = fam.model.text_logits(hidden)
    if text_mode:
        text_logits[text_mode] = fam.model.text_logits(hidden[text_mode])
    audio_rows = [i for i, s in enumerate(slots) if state.audio_len[s] > max(int(state.delayed[s]), 0)]
    audio_logits = fam.model.audio_logits(hidden)
    if audio_rows:
        audio_logits[audio_rows] = fam.model.audio_logits(hidden[audio_rows])
    texts, codes = [], torch.full((len(slots), n), cfg.audio_pad_code, dtype=torch.int64)
    for i, slot in enumerate(slots):
        generator = state.generators[slot]
        delayed, stopping = int(state.delayed[slot]), bool(state.stopping[slot])
        audio_len, step = int(state.audio_len[slot]), int(state.steps[slot])
        if stopping:
            text = cfg.pad_token_id
        elif delayed == n:
            text = cfg.audio_end_token_id
        elif delayed != INACTIVE:
            text = cfg.audio_assistant_delay_slot_token_id
        else:
            audio_mode = bool(state.is_audio[slot])
            logits = fam.model.text_logits(hidden[i : i + 1])[0] if audio_mode else text_logits[i]
            text = reference_text_token(fam, state, logits, slot, audio_mode, step, generator)
        texts.append(text)
        for c in range(n):
            if not (audio_len > c and (delayed == INACTIVE or c >= delayed)):
                continue  # forced to pad
            temperature = state.audio_temperature[slot, c : c + 1]
            seen = (state.seen_first if c == 0 else state.seen_rest)[slot : slot + 1]
            noise = torch_noise(1, codes_per_head, generator) if float(temperature) > 0 else None
            codes[i, c] = sample(audio_logits[i, c][None], temperature, state.audio_top_k[slot, c : c + 1],
                                 state.audio_top_p[slot, c : c + 1], penalty=state.audio_penalty[slot, c : c + 1],
                                 seen=seen, noise=noise)[0]
    return torch.tensor(texts), codes


SAMPLINGS = [
    SamplingParams.greedy(),
    SamplingParams(seed=11),
    SamplingParams(text_temperature=0.0, seed=12),  # greedy text, sampled audio
    SamplingParams(audio_temperature=0.0, seed=13),  # sampled text, greedy audio
    SamplingParams(text_top_k=1, seed=14),
    SamplingParams(text_top_k=0, text_top_p=0.3, seed=15),
    SamplingParams(text_temperature=0.05, text_top_k=2, text_top_p=0.6, seed=16),
    SamplingParams(text_temperature=1.0, text_top_k=0, text_top_p=1.0, audio_repetition_penalty=1.3,
                   audio_top_k=[0, 25, 40, 0] * 8, seed=17),  # not 1: top-k ties are the sampler's (unchanged)
    SamplingParams.greedy(audio_repetition_penalty=1.2),
    # Codebook 0 greedy, others sampled: a step whose only sampled codebook is greedy draws nothing.
    SamplingParams(audio_temperature=[0.0, 1.0, 0.8, 1.2] * 8, seed=18),
]


def for_codebooks(sampling: SamplingParams, n: int) -> SamplingParams:
    """SAMPLINGS' per-codebook lists cut to a checkpoint's n_vq."""
    lists = [name for name in ("audio_top_k", "audio_temperature") if isinstance(getattr(sampling, name), list)]
    return dataclasses.replace(sampling, **{name: getattr(sampling, name)[:n] for name in lists})


def mixed_batch(fam: MossDelayFamily, rows: int, seed: int,
                zeros: bool = False) -> tuple[DelayState, torch.Tensor, list[int]]:
    """`rows` slots, each admitted with a fixture prompt and one of SAMPLINGS, then put at a chosen
    point of a generation: text mode, audio mode at its first codebooks, steady audio, the delay
    tail, the audio end, stopping; steps 0, 1, n_vq, n_vq + 1 or later. Hidden states are random,
    made so the two slot tokens' logits tie up to rounding (audio mode), or with `zeros` zero (the
    two tie exactly; for text only: the audio head's codes would all tie too, and top-k's order
    among equal values depends on the largest k of the batch, the unchanged sampler's matter)."""
    cfg, n = fam.config, fam.config.n_vq
    generator = torch.Generator().manual_seed(seed)
    pick = lambda m: int(torch.randint(m, (1,), generator=generator))
    prompts = [fam.prompt_from_rows(p) for case in generation_cases(DELAY_DIR / f"tiny_nvq{n}") for p in case.prompts]
    state = fam.new_state(rows, CPU)
    hidden = torch.randn(rows, fam.backbone_config.hidden_size, generator=generator) * 3
    ids = sorted([cfg.audio_assistant_gen_slot_token_id, cfg.audio_assistant_delay_slot_token_id])
    weight = fam.model.text_head.weight
    delta = weight[ids[0]] - weight[ids[1]]
    for slot in range(rows):
        sampling = SAMPLINGS[pick(len(SAMPLINGS))]
        sampling = for_codebooks(sampling, n)
        fam.admit(state, slot, prompts[pick(len(prompts))], sampling)
        mode = pick(6)
        state.stopping[slot] = mode == 5
        state.is_audio[slot] = mode in (1, 2, 3, 4)
        state.audio_len[slot] = [0, pick(n + 2), 100, 100, 100, 0][mode]
        state.delayed[slot] = [INACTIVE, INACTIVE, INACTIVE, 1 + pick(n - 1), n, INACTIVE][mode]
        state.steps[slot] = [0, 1, n, n + 1, 50][pick(5)]
        # Ties only in audio mode: a text-mode row of equal logits would meet top-k's tie order, which
        # depends on the largest k of the batch's rows (the sampler's, unchanged by the fast paths).
        shape = pick(4) if mode in (1, 2) else 0
        if shape == 1 and zeros:
            hidden[slot] = 0
        elif shape == 2:
            hidden[slot] -= (delta @ hidden[slot]) / (delta @ delta) * delta
    return state, hidden, list(range(rows))


def assert_steps_match(fam: MossDelayFamily, state: DelayState, hidden: torch.Tensor, slots: list[int],
                       steps: int = 3) -> None:
    """`steps` family steps against reference_step: tokens, codes and the generators' states after."""
    for _ in range(steps):
        reference = copy_state(state)
        texts, codes = reference_step(fam, reference, hidden, slots)
        out = fam.step(state, hidden, torch.tensor(slots))
        assert torch.equal(out.rows[:, 0], texts), (out.rows[:, 0], texts)
        assert torch.equal(out.rows[:, 1:], codes)
        for ours, theirs in zip(state.generators, reference.generators):
            assert torch.equal(ours.get_state(), theirs.get_state()), "a different number of draws"
        hidden = torch.roll(hidden, 1, dims=0)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("seed", range(6))
def test_step_equals_the_full_computation(checkpoint: str, seed: int) -> None:
    fam = family(checkpoint)
    state, hidden, slots = mixed_batch(fam, 12, seed)
    assert_steps_match(fam, state, hidden, slots)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("sampling", range(len(SAMPLINGS)))
def test_batches_of_one_kind_equal_the_full_computation(checkpoint: str, sampling: int) -> None:
    """Batches whose every row chooses its text and codes (the usual step, which selects no rows):
    one request alone and four together, at the first codebook, in steady audio, in the delay tail."""
    fam = family(checkpoint)
    n = fam.config.n_vq
    prompt = fam.prompt_from_rows(generation_cases(DELAY_DIR / f"tiny_nvq{n}")[0].prompts[0])
    params = for_codebooks(SAMPLINGS[sampling], n)
    generator = torch.Generator().manual_seed(sampling)
    for rows in (1, 4):
        for audio_len, delayed in ((1, INACTIVE), (100, INACTIVE), (100, 1 + n // 2)):
            state = fam.new_state(rows, CPU)
            for slot in range(rows):
                fam.admit(state, slot, prompt, params)
            state.is_audio[:], state.audio_len[:], state.delayed[:], state.steps[:] = True, audio_len, delayed, n + 1
            hidden = torch.randn(rows, fam.backbone_config.hidden_size, generator=generator) * 3
            assert_steps_match(fam, state, hidden, list(range(rows)), steps=2)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_text_rows_with_a_shared_generator(checkpoint: str) -> None:
    """The reference's static batch: every row draws from one generator, in batch order, text and
    audio mode mixed (full-width draws and two-column draws interleaved)."""
    fam = family(checkpoint)
    for seed in range(3):
        state, hidden, slots = mixed_batch(fam, 10, 100 + seed, zeros=True)
        state.shared_generator = torch.Generator().manual_seed(seed)
        state.replay[:] = True
        state.text_temperature[:] = torch.tensor([1.5, 0.7, 1.0, 0.0, 2.0] * 2)
        is_audio = state.is_audio.clone()
        steps = state.steps.clone()
        shared = copy_generator(state.shared_generator)
        text_mode = [i for i in slots if not is_audio[i]]
        logits = fam.model.text_logits(hidden)
        logits[text_mode] = fam.model.text_logits(hidden[text_mode])
        expected = [reference_text_token(fam, state, fam.model.text_logits(hidden[i : i + 1])[0] if is_audio[i]
                                         else logits[i], i, bool(is_audio[i]), int(steps[i]), shared)
                    for i in slots]
        tokens = fam._sample_text(state, hidden, torch.tensor(slots), is_audio, steps)
        assert tokens.tolist() == expected
        assert torch.equal(state.shared_generator.get_state(), shared.get_state())


def test_ties_and_near_ties_take_the_full_head() -> None:
    """The certificate refuses the rows whose choice the last bits of the logits could change."""
    fam = family("tiny_nvq32")
    cfg = fam.config
    ids = fam._slot_ids(CPU)
    weight = fam.model.text_head.weight
    delta = weight[ids[0]] - weight[ids[1]]
    h = torch.randn(4, fam.backbone_config.hidden_size, generator=torch.Generator().manual_seed(0))
    h[1] -= (delta @ h[1]) / (delta @ delta) * delta  # a near-tie
    h[2] = 0  # an exact tie
    logits, bound = fam._narrow_text_logits(h, ids, torch.full((4,), 5))
    greedy = torch.zeros(4)
    exact = fam._narrow_is_exact(logits, bound, greedy, torch.zeros(4, dtype=torch.int64), torch.ones(4),
                                 torch.ones(4, 2))
    assert exact.tolist() == [True, False, False, True]
    # Step 0 masks the delay slot: the gen slot wins whatever its logit, tie or not.
    logits0, bound0 = fam._narrow_text_logits(h, ids, torch.zeros(4, dtype=torch.int64))
    assert fam._narrow_is_exact(logits0, bound0, greedy, torch.zeros(4, dtype=torch.int64), torch.ones(4),
                                torch.ones(4, 2)).all()
    assert cfg.audio_assistant_delay_slot_token_id == 151662


def test_a_zero_draw_gives_the_full_vectors_answer(monkeypatch) -> None:
    """A draw of exactly zero noise (1 in 2**53) makes 0 / -0 = NaN in the full vector, which its
    argmax picks; the two-column path must not hide it."""
    fam = family("tiny_nvq32")
    state, hidden, _ = mixed_batch(fam, 1, 0)
    state.is_audio[0], state.delayed[0], state.stopping[0], state.steps[0] = True, INACTIVE, False, 7
    state.replay[0], state.text_temperature[0] = True, 1.5
    real = exponential_bits

    def with_a_zero(rows, vocab, generator):
        bits = real(rows, vocab, generator)
        bits[0, 5] = 0
        return bits

    monkeypatch.setattr(delay_family, "exponential_bits", with_a_zero)
    reference = copy_generator(state.generators[0])

    def patch(noise):
        noise[0, 5] = noise_from_bits(torch.zeros(1, 1, dtype=torch.int64), CPU)[0, 0]
        return noise

    expected = reference_text_token(fam, state, fam.model.text_logits(hidden[:1])[0], 0, True, 7, reference, patch)
    tokens = fam._sample_text(state, hidden, torch.tensor([0]), torch.tensor([True]), torch.tensor([7]))
    assert tokens.tolist() == [expected] == [5]
    assert torch.equal(state.generators[0].get_state(), reference.get_state())


@pytest.mark.parametrize("vocab", [151936, 1025, 7])
def test_bits_are_the_noise_and_take_the_same_draws(vocab: int) -> None:
    assert bits_match_noise(vocab)
    full, fast = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise = torch_noise(3, vocab, full)
    bits = exponential_bits(3, vocab, fast)
    assert torch.equal(noise_from_bits(bits, CPU), noise)
    for columns in ([vocab - 1], [0, vocab - 1], list(range(0, vocab, 3))):  # columns alone, as the fast path takes them
        assert torch.equal(noise_from_bits(bits[:, columns], CPU), noise[:, columns])
    assert torch.equal(full.get_state(), fast.get_state())
    # and the stream goes on identically
    assert torch.equal(torch_noise(1, 11, full), exponential_noise(1, 11, fast, CPU))


def test_all_greedy_sampling_skips_only_a_division_by_one() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1025, generator=generator) * 5
    logits[:, 7] = float("-inf")
    logits[3, 9] = float("nan")
    seen = torch.rand(64, 1025, generator=generator) < 0.3
    penalty = torch.full((64,), 1.3)
    temperature = torch.zeros(64)
    expected = torch.argmax(apply_repetition_penalty(apply_temperature(logits, temperature), seen, penalty), dim=-1)
    got = sample(logits, temperature, torch.zeros(64, dtype=torch.int64), torch.ones(64), penalty=penalty, seen=seen)
    assert torch.equal(got, expected)

"""Generation parity of the Local family with upstream `generate` (every greedy golden, reduced
depth, batch, continuation, max length, the seeded sampled run), its sampling ops, and batch
invariance with mixed depths, all through the family seam."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from local_cases import (
    AUDIO_END,
    PAD_CODE,
    generation_runs,
    get_run,
    goldens,
    local_family,
    meta,
)

from mossserve.engine.static_batch import generate_static
from mossserve.models.moss_local import SKIPPED
from mossserve.models.moss_local_sampling import processed_logits
from mossserve.sampling import SamplingParams

RUNS = [r.name for r in generation_runs()]


def run_prompts(fam, run):
    return [fam.with_depth(fam.prompt_from_rows(p), run.depth) for p in run.prompts]


def upstream_rows(rows: np.ndarray) -> np.ndarray:
    """Our rows hold SKIPPED above a request's depth where upstream writes 0 (both: not embedded)."""
    return np.where(rows == SKIPPED, 0, rows)


@pytest.mark.parametrize("name", RUNS)
def test_generation_matches_upstream(name: str) -> None:
    fam = local_family()
    run = get_run(name)
    prompts = run_prompts(fam, run)
    results = generate_static(fam, prompts, [run.sampling] * len(prompts), run.max_new_frames)
    for b, (prompt, result) in enumerate(zip(prompts, results)):
        rows, stop = result.rows, run.stop_frames[b]
        assert len(rows) == (stop if stop is not None else run.max_new_frames)
        assert result.stopped == (stop is not None)
        assert (rows[:, 1 + run.depth :] == SKIPPED).all()
        assert np.array_equal(upstream_rows(rows), run.frames[b, : len(rows)]), f"sequence {b}"
        # A sequence that stopped before the batch did got [<|audio_end|>, pad...] rows from upstream.
        tail = run.frames[b, len(rows) :]
        assert (tail[:, 0] == AUDIO_END).all() and (tail[:, 1:] == PAD_CODE).all()
        # Upstream's returned slice: from the last <|audio_start|> of the whole sequence.
        matrix = prompt.info["matrix"]
        start = int(np.flatnonzero(matrix[:, 0] == 151652)[-1])
        output = np.concatenate([matrix[start:], upstream_rows(rows)])
        assert np.array_equal(output, run.outputs[b][: len(output)])
        assert prompt.start_length == len(matrix) - start - 1 == result.start_length
        # What upstream hands its codec, at the request's depth (upstream sends all 32: README 8.3).
        frames = result.frames[:, : run.depth]
        if run.codec_inputs:
            assert np.array_equal(frames, run.codec_inputs[b][: run.depth, 0].T)
            assert result.segment_lengths == [len(frames)]


def test_reduced_depth_writes_zeros_upstream() -> None:
    run = get_run("greedy_clone_depth8")
    assert run.depth == 8 and (run.frames[0, :, 9:] == 0).all() and (run.codec_inputs[0][8:] == 0).all()


def test_sampled_run_replays_upstream_seed() -> None:
    """`torch.manual_seed(seed)` then upstream defaults (README 6.6): our per-request generator
    draws the same noise in the same order, so the tokens agree exactly."""
    fam = local_family()
    run = get_run("sampled_tts_en_defaults")
    assert run.sampling.seed == meta("generation")["runs"][run.name]["seed"]
    assert run.sampling == fam.default_sampling().with_overrides(seed=run.sampling.seed)
    result = generate_static(fam, run_prompts(fam, run), [run.sampling], run.max_new_frames)[0]
    assert np.array_equal(result.rows, run.frames[0])
    other = generate_static(fam, run_prompts(fam, run), [run.sampling.with_overrides(seed=1)], run.max_new_frames)[0]
    assert not np.array_equal(other.rows[: len(result.rows)], result.rows[: len(other.rows)])


@pytest.mark.parametrize("case", [c["name"] for c in meta("sampling_ops")["cases"]])
def test_sampling_ops(case: str) -> None:
    g = goldens("sampling_ops")
    info = next(c for c in meta("sampling_ops")["cases"] if c["name"] == case)
    audio = case.startswith("audio")
    logits = torch.from_numpy(g["audio.logits" if audio else "text.logits"])
    rows = logits.shape[0]
    penalty = seen = None
    if audio:
        history = torch.from_numpy(g["audio.history"])
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, history, True)
        penalty = torch.full((rows,), info["repetition_penalty"], dtype=torch.float32)
    ours = processed_logits(logits, torch.full((rows,), info["temperature"], dtype=torch.float32),
                            torch.full((rows,), info["top_k"]), torch.full((rows,), info["top_p"], dtype=torch.float64),
                            penalty, seen).numpy()
    ref = g[f"{case}.processed"]
    assert np.array_equal(np.isneginf(ours), np.isneginf(ref))
    finite = ~np.isneginf(ref)
    assert np.allclose(ours[finite], ref[finite], rtol=1e-5, atol=1e-5)
    assert np.abs(torch.softmax(torch.from_numpy(ours), -1).numpy() - g[f"{case}.probs"]).max() <= 1e-6


def test_greedy_ignores_the_repetition_penalty() -> None:
    """Upstream applies no processor in greedy mode (README 6.2)."""
    fam = local_family()
    run = get_run("greedy_clone")
    prompt = fam.prompt_from_rows(run.prompts[0])
    penalised = SamplingParams.greedy(audio_repetition_penalty=5.0)
    assert np.array_equal(generate_static(fam, [prompt], [penalised], 100)[0].rows, run.frames[0])


def _all_requests(fam, depths: list[int] | None = None):
    prompts, samplings, caps = [], [], []
    for run in generation_runs():
        for rows in run.prompts:
            depth = run.depth if depths is None else depths[len(prompts) % len(depths)]
            prompts.append(fam.with_depth(fam.prompt_from_rows(rows), depth))
            samplings.append(run.sampling)
            caps.append(run.max_new_frames)
    return prompts, samplings, caps


@pytest.mark.parametrize("depths", [None, [32, 8, 1, 17, 3]])
def test_batch_invariance_with_mixed_depths(depths) -> None:
    """Every fixture request (greedy and seeded) in one batch, at the goldens' depths or at mixed
    depths, equals its one-at-a-time result."""
    fam = local_family()
    prompts, samplings, caps = _all_requests(fam, depths)
    alone = [generate_static(fam, [p], [s], cap)[0] for p, s, cap in zip(prompts, samplings, caps)]
    together = generate_static(fam, prompts, samplings, caps)
    assert len(together) == len(prompts) == 10
    for a, t in zip(alone, together):
        assert np.array_equal(a.rows, t.rows) and np.array_equal(a.frames, t.frames) and a.stopped == t.stopped
    assert len({len(t.rows) for t in together}) > 1
    if depths is not None:
        for prompt, result in zip(prompts, together):
            k = prompt.info["depth"]
            assert (result.rows[:, 1 + k :] == SKIPPED).all() and (result.rows[:, 1 : 1 + k] >= 0).all()


def test_depth_changes_what_the_backbone_sees() -> None:
    """At depth K the backbone ignores channels above K, prompt included: a prompt whose codes above
    K differ generates the same frames."""
    fam = local_family()
    run = get_run("greedy_clone_depth8")
    matrix = run.prompts[0].copy()
    shuffled = matrix.copy()
    audio_rows = (matrix[:, 1:] != PAD_CODE).any(1)
    shuffled[audio_rows, 9:] = (shuffled[audio_rows, 9:] + 7) % PAD_CODE
    a = generate_static(fam, [fam.with_depth(fam.prompt_from_rows(matrix), 8)], [SamplingParams.greedy()], 100)[0]
    b = generate_static(fam, [fam.with_depth(fam.prompt_from_rows(shuffled), 8)], [SamplingParams.greedy()], 100)[0]
    assert np.array_equal(a.rows, b.rows) and np.array_equal(upstream_rows(a.rows), run.frames[0])
    full = generate_static(fam, [fam.prompt_from_rows(shuffled)], [SamplingParams.greedy()], 100)[0]
    assert not np.array_equal(full.rows[:, :9], a.rows[: len(full.rows), :9])



def test_a_frames_noise_is_each_channels_own_draw() -> None:
    """The frame's noise, drawn before its first channel, equals one draw per drawing channel in
    channel order (the text channel's over the text vocabulary first) from the request's generator,
    and leaves it where those draws do; channels past a request's depth and greedy channels take no
    numbers. With a shared generator, each channel's drawing rows draw in batch order, channel after
    channel."""
    from types import SimpleNamespace

    from mossserve.models.moss_local_family import MossLocalFamily

    text_vocab, audio_vocab, seeds, n_vq = 300, 1025, (5, 9), 6
    family = SimpleNamespace(config=SimpleNamespace(language=SimpleNamespace(vocab_size=text_vocab),
                                                    audio_vocab_size=audio_vocab - 1))
    drawing = torch.ones(2, 1 + n_vq, dtype=torch.bool)
    drawing[0, 3] = False  # a greedy channel
    drawing[1, 0] = False  # a greedy text channel
    drawing[1, 5:] = False  # the second request stops at depth 4
    vocabs = [text_vocab] + [audio_vocab] * n_vq
    state = SimpleNamespace(generators=[torch.Generator().manual_seed(s) for s in seeds], shared_generator=None)
    noise = MossLocalFamily._frame_noise(family, state, torch.tensor([0, 1]), drawing, torch.device("cpu"))
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        for channel, vocab in enumerate(vocabs):
            if drawing[row, channel]:
                expected = torch.empty(1, vocab).exponential_(1, generator=generator)[0]
                assert torch.equal(noise[channel][row], expected)
            else:
                assert torch.equal(noise[channel][row], torch.ones(vocab))
        assert torch.equal(generator.get_state(), state.generators[row].get_state())

    drawing[:, 6] = False  # no row draws on the last channel: it gets no noise
    state = SimpleNamespace(generators=[None, None], shared_generator=torch.Generator().manual_seed(3))
    noise = MossLocalFamily._frame_noise(family, state, torch.tensor([0, 1]), drawing, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    assert noise[6] is None
    for channel, vocab in enumerate(vocabs[:6]):
        rows = int(drawing[:, channel].sum())
        expected = torch.empty(rows, vocab).exponential_(1, generator=generator)
        assert torch.equal(noise[channel][drawing[:, channel]], expected)
        assert torch.equal(noise[channel][~drawing[:, channel]], torch.ones(2 - rows, vocab))
    assert torch.equal(generator.get_state(), state.shared_generator.get_state())

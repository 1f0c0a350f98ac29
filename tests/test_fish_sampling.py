"""Fish S2 Pro sampling, bit-exact with the reference (fixtures/fish_s2_pro/README.md section 7):
top-p on the untempered distribution, top-k by rank, the exponential race on torch.rand draws,
the draw order of one column, and the repetition-aware re-sample (ras.npz)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fish_cases import family, npz

from mossserve.layers.batch_context import BatchContext
from mossserve.models.fish_s2_family import fish_settings
from mossserve.models.fish_s2_sampling import choose, draw, fish_probs, repeated
from mossserve.sampling import SamplingParams

SEEDS = {"slow": 20251133, "fast": 20251143}


def settings() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = npz("sampling")["settings"]
    return (torch.tensor(s[:, 0], dtype=torch.float32), torch.tensor(s[:, 1], dtype=torch.float32),
            torch.tensor(s[:, 2]).long())


@pytest.mark.parametrize("side", ["slow", "fast"])
def test_probs_and_draws_all_settings_in_one_batch(side: str) -> None:
    g = npz("sampling")
    temperature, top_p, top_k = settings()
    logits = torch.from_numpy(g[f"{side}__logits"]).repeat(len(top_k), 1)
    probs = fish_probs(logits, temperature, top_p, top_k)
    assert np.abs(probs.numpy() - g[f"{side}__probs"]).max() <= 1e-6
    uniform = torch.stack([torch.rand(logits.shape[1], generator=torch.Generator().manual_seed(SEEDS[side] + j))
                           for j in range(len(top_k))])
    assert torch.equal(uniform, torch.from_numpy(g[f"{side}__uniform"]))
    assert draw(probs, uniform).tolist() == g[f"{side}__index"].tolist()
    assert choose(logits, temperature, top_p, top_k, uniform).tolist() == g[f"{side}__index"].tolist()


def test_greedy_rows_take_the_argmax_without_draws() -> None:
    g = npz("sampling")
    logits = torch.from_numpy(g["slow__logits"])[None]
    one = torch.ones(1)
    assert choose(logits, one, one, torch.ones(1, dtype=torch.int64), None).item() == int(torch.argmax(logits))


def test_one_draw_per_column_equals_the_references_separate_draws() -> None:
    """The family draws a column's randomness in one torch.rand call: normal slow, high slow, then
    codebooks 1..N-1; on torch's CPU generator that is the same stream as the reference's calls."""
    cfg = family().config
    vocab, size, n = cfg.slow.vocab_size, cfg.codebook_size, cfg.num_codebooks
    for seed in (0, 20251123):
        g = torch.Generator().manual_seed(seed)
        separate = [torch.rand(vocab, generator=g), torch.rand(vocab, generator=g)]
        separate += [torch.rand(size, generator=g) for _ in range(n - 1)]
        one = torch.rand(2 * vocab + (n - 1) * size, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(torch.cat(separate), one)


def test_repeated_checks_only_semantic_tokens() -> None:
    window = torch.tensor([[0, 5, 7], [0, 0, 0], [3, 3, 3]])
    tokens = torch.tensor([5, 0, 3])
    assert repeated(tokens, window, semantic_start=4, semantic_end=9).tolist() == [True, False, False]


def test_fish_settings() -> None:
    assert fish_settings(SamplingParams.greedy())[2] == 1
    assert fish_settings(SamplingParams(audio_temperature=0.8, audio_top_p=0.8, audio_top_k=30)) == (0.8, 0.8, 30)
    with pytest.raises(Exception, match="one value for all codebooks"):
        fish_settings(SamplingParams(audio_temperature=[0.8] * 10))


def test_settings_fish_cannot_use_are_refused_before_anything_is_queued() -> None:
    """Per-codebook lists passed the engine's checks and failed in `admit` on the engine's thread: the request
    came back failed (counted as an engine failure) instead of the call raising. A repetition penalty
    was accepted and ignored (the reference's S2 sampling has none)."""
    from mossserve.config import EngineConfig
    from mossserve.engine.engine import Engine
    from mossserve.errors import InvalidRequestError

    engine = Engine(family(), None, EngineConfig(threaded=False))
    for sampling, message in [(SamplingParams(audio_top_k=[30] * 10), "one value for all codebooks"),
                              (SamplingParams(audio_temperature=[0.8] * 10), "one value for all codebooks"),
                              (SamplingParams(audio_repetition_penalty=1.3), "Fish S2 Pro applies no repetition penalty"),
                              (SamplingParams(audio_repetition_window=8), "audio_repetition_window is not a setting")]:
        with pytest.raises(InvalidRequestError, match=message):
            engine.check_settings(sampling, decode_audio=False)
    assert not engine.has_work() and engine.stats()["failed"] == 0


@pytest.mark.parametrize("which", ["plain", "hit"])
def test_repetition_aware_step(which: str) -> None:
    """One decode step on plain__b0's prompt (ras.npz): with the window hit, the normal sample repeats
    and the high-temperature sample is taken instead."""
    fam, r = family(), npz("ras")
    rows = torch.from_numpy(r["prompt"].T.copy())
    with torch.no_grad():
        hidden = fam.model(rows[None], BatchContext.build([0], len(rows), None, rows.device))[:, -1]
        t, p, k = r["settings"]
        sampling = SamplingParams(audio_temperature=float(t), audio_top_p=float(p), audio_top_k=int(k),
                                  seed=int(r["seed"][0]))
        state = fam.new_state(2, torch.device("cpu"))
        fam.admit(state, 1, fam.prompt_from_rows(r["prompt"].T), sampling)
        state.first[1] = False  # a decode step: the repetition window applies
        state.window[1] = torch.from_numpy(r[f"window_{which}"][0])
        out = fam.step(state, hidden, torch.tensor([1]))
    assert out.rows[0].tolist() == r[f"out_{which}"].tolist()
    if which == "hit":
        assert r["out_hit"][0] != r["out_plain"][0]

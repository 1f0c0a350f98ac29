"""The sampler's building blocks against the reference's `sample_token` pieces (no randomness),
and the draw rule against torch's own multinomial."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DELAY_DIR
from mossserve.layers.sampler import (
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    exponential_noise,
    sample,
)

OPS = np.load(DELAY_DIR / "sampling_ops.npz")
CASES = json.loads((DELAY_DIR / "sampling_ops.json").read_text())["cases"]


def history_mask(rows: int, vocab: int) -> torch.Tensor:
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    seen[:, torch.unique(torch.from_numpy(OPS["prev_tokens"]))] = True
    return seen


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sampling_ops(case: dict) -> None:
    logits = torch.from_numpy(OPS["input_logits"])
    rows, vocab = logits.shape
    full = lambda v, dtype=torch.float32: torch.full((rows,), v, dtype=dtype)  # noqa: E731
    x = apply_temperature(logits, full(case["temperature"]))
    x = apply_repetition_penalty(x, history_mask(rows, vocab), full(case["repetition_penalty"]))
    assert torch.equal(x, torch.from_numpy(OPS[f"{case['name']}/after_repetition_penalty"]))
    x = apply_top_k(x, full(case["top_k"] or 0, torch.int64))
    x = apply_top_p(x, full(case["top_p"] or 1.0))
    assert torch.equal(x, torch.from_numpy(OPS[f"{case['name']}/filtered_logits"]))
    probs = torch.softmax(x, dim=-1)
    torch.testing.assert_close(probs, torch.from_numpy(OPS[f"{case['name']}/probs"]), atol=1e-6, rtol=0)


def test_greedy_with_repetition_penalty() -> None:
    logits = torch.from_numpy(OPS["input_logits"])
    rows, vocab = logits.shape
    tokens = sample(logits, torch.zeros(rows), torch.zeros(rows, dtype=torch.int64), torch.ones(rows),
                    penalty=torch.full((rows,), 1.5), seen=history_mask(rows, vocab))
    assert torch.equal(tokens, torch.from_numpy(OPS["greedy_rep_1.5/argmax"]))


def test_per_row_settings_equal_separate_calls() -> None:
    """One batched call with different settings per row equals one call per row."""
    logits = torch.from_numpy(OPS["input_logits"])
    rows = logits.shape[0]
    top_k = torch.tensor([0, 5, 25, 1, 1024, 3])
    top_p = torch.tensor([1.0, 0.5, 0.9, 1.0, 0.3, 0.99])
    batched = apply_top_p(apply_top_k(logits, top_k), top_p)
    for r in range(rows):
        alone = apply_top_p(apply_top_k(logits[r : r + 1], top_k[r : r + 1]), top_p[r : r + 1])
        assert torch.equal(batched[r : r + 1], alone)


@pytest.mark.parametrize("seed", [0, 7, 1234])
def test_draw_equals_torch_multinomial(seed: int) -> None:
    """`argmax(probs / noise)` with the generator's exponential noise is torch's CPU multinomial."""
    probs = torch.softmax(torch.from_numpy(OPS["input_logits"]) / 0.7, dim=-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).flatten()
    noise = exponential_noise(probs.shape[0], probs.shape[1], torch.Generator().manual_seed(seed), probs.device)
    assert torch.equal(torch.argmax(probs / noise, dim=-1), expected)

"""Teacher-forced parity of the Local model: backbone hidden states and every channel's logits
(fixtures/moss_tts_local/README.md sections 2 and 4), plus the first generated frame's raw logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from local_cases import PAD_CODE, get_run, goldens, load_local_model

from mossserve.layers.batch_context import BatchContext

HIDDEN_TOL = (1e-4, 1e-4)  # |a - b| <= atol + rtol * |b|
LOGIT_TOL = (5e-3, 1e-4)
SPECIAL = slice(151643, 151669)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float], what: str) -> None:
    ours, ref = ours.double(), torch.as_tensor(ref).double()
    excess = (ours - ref).abs() - (tol[0] + tol[1] * ref.abs())
    assert excess.max() <= 0, f"{what}: worst excess {excess.max():.3g} (max error {(ours - ref).abs().max():.3g})"


def backbone(rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    hidden_states: list[torch.Tensor] = []
    ctx = BatchContext.build([0], rows.shape[0], None, rows.device)
    with torch.no_grad():
        final = load_local_model()(rows[None], ctx, hidden_states=hidden_states)[0]
    return final, [h[0] for h in hidden_states]


@pytest.mark.parametrize("case", ["tf_clone", "tf_batch"])
def test_teacher_forced(case: str) -> None:
    g = goldens("teacher_forced")
    ids, mask = torch.from_numpy(g[f"{case}.input_ids"]), g[f"{case}.attention_mask"].astype(bool)
    labels, positions = torch.from_numpy(g[f"{case}.labels"]), g[f"{case}.positions"]
    model = load_local_model()
    for b in range(ids.shape[0]):
        valid = np.flatnonzero(mask[b])
        final, states = backbone(ids[b, valid])
        assert_close(states[0], g[f"{case}.hidden_states.0"][b, valid], HIDDEN_TOL, "summed embeddings")
        assert_close(states[1], g[f"{case}.hidden_states.1"][b, valid], HIDDEN_TOL, "after layer 0")
        assert_close(final, g[f"{case}.hidden_states.2"][b, valid], HIDDEN_TOL, "final norm")
        index = torch.from_numpy(np.searchsorted(valid, positions))
        with torch.no_grad():
            logits = model.teacher_forced_logits(final[index], labels[b, positions])
        assert_close(torch.stack(logits[1:], dim=1), g[f"{case}.audio_logits"][b], LOGIT_TOL, "audio logits")
        assert_close(logits[0][:, SPECIAL], g[f"{case}.text_logits_special"][b], LOGIT_TOL, "text logits")
        if f"{case}.text_logits_full_last" in g:
            assert_close(logits[0][-1], g[f"{case}.text_logits_full_last"][b, 0], LOGIT_TOL, "full text logits")


def test_depth_transformer_is_causal_not_eager() -> None:
    """Upstream's eager local attention would be bidirectional (README 8.1); the goldens are causal,
    and the eager variant differs from them by far more than the tolerance."""
    g = goldens("teacher_forced")
    assert np.abs(g["tf_clone.eager_local_audio_logits_last2"] - g["tf_clone.audio_logits"][:, -2:]).max() > 1.0


def test_first_frame_logits_of_greedy_clone() -> None:
    """Raw head outputs of the first generated frame (before the pad mask), channel by channel on
    the greedy choices, through the cached depth loop the family runs."""
    model = load_local_model()
    run = get_run("greedy_clone")
    final, _ = backbone(torch.from_numpy(run.prompts[0]))
    gen = goldens("generation")
    frame = torch.from_numpy(run.frames[0, :1])
    with torch.no_grad():
        logits = model.teacher_forced_logits(final[-1:], frame)
    assert_close(torch.stack(logits[1:], dim=1), gen["greedy_clone.frame0_audio_logits"], LOGIT_TOL, "audio")
    assert_close(logits[0][:, SPECIAL], gen["greedy_clone.frame0_text_logits_special"], LOGIT_TOL, "text")
    audio = torch.stack(logits[1:], dim=1)[0]
    audio[:, PAD_CODE] = float("-inf")
    assert torch.equal(audio.argmax(-1), frame[0, 1:])

"""Teacher-forced parity of the Delay model with the reference: hidden states and every head."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DELAY_DIR, load_delay_model
from mossserve.layers.batch_context import BatchContext

CASES = ["tf_clone_prompt", "tf_computing_loss", "tf_batch_padded"]
ATOL, RTOL = 2e-4, 1e-4


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    err = np.abs(ours - ref) - (ATOL + RTOL * np.abs(ref))
    assert np.all(err <= 0), f"{what}: worst excess {err.max():.3g}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("checkpoint", ["tiny_nvq32", "tiny_nvq16"])
def test_teacher_forced(checkpoint: str, case: str) -> None:
    model = load_delay_model(DELAY_DIR / checkpoint)
    golden = np.load(DELAY_DIR / checkpoint / "goldens_tf.npz")
    g = {k[len(case) + 1 :]: golden[k] for k in golden.files if k.startswith(case + "/")}
    layers = model.config.language.num_hidden_layers
    ids, mask = torch.from_numpy(g["input_ids"]), g["attention_mask"]
    cols = g["text_logit_cols"]
    for b in range(ids.shape[0]):
        valid = np.nonzero(mask[b])[0]
        rows = ids[b : b + 1, valid]
        hidden_states: list[torch.Tensor] = []
        with torch.no_grad():
            final = model(rows, BatchContext.build([0], len(valid), None, rows.device), hidden_states=hidden_states)
            text = model.text_logits(final)[0].double()
            audio = model.audio_logits(final)[0]
        for i in range(layers):
            assert_close(hidden_states[i][0].numpy(), g[f"hidden_states_{i}"][b, valid], f"hidden_states_{i}")
        assert_close(hidden_states[layers][0].numpy(), g["last_layer_output_prenorm"][b, valid], "prenorm")
        assert_close(final[0].numpy(), g[f"hidden_states_{layers}"][b, valid], "final norm")
        assert_close(text[:, cols].numpy(), g["text_logits_at_cols"][b, valid], "text logits at cols")
        assert_close(text.max(-1).values.numpy(), g["text_logits_max"][b, valid], "text max")
        assert_close(torch.logsumexp(text, -1).numpy(), g["text_logits_lse"][b, valid], "text lse")
        top2 = text.topk(2, dim=-1).values
        assert_close((top2[:, 0] - top2[:, 1]).numpy(), g["text_logits_top2_gap"][b, valid], "text top2 gap")
        clear = g["text_logits_top2_gap"][b, valid] > 1e-3
        assert np.array_equal(text.argmax(-1).numpy()[clear], g["text_logits_argmax"][b, valid][clear])

        assert torch.isneginf(audio[..., 1024]).all() and bool(g["audio_logits_last_index_is_neg_inf"])
        finite = audio[..., :1024].double()
        assert_close(finite.max(-1).values.numpy(), g["audio_logits_max"][b, valid], "audio max")
        assert_close(torch.logsumexp(finite, -1).numpy(), g["audio_logits_lse"][b, valid], "audio lse")
        a2 = finite.topk(2, dim=-1).values
        assert_close((a2[..., 0] - a2[..., 1]).numpy(), g["audio_logits_top2_gap"][b, valid], "audio top2 gap")
        clear = g["audio_logits_top2_gap"][b, valid] > 1e-3
        assert np.array_equal(finite.argmax(-1).numpy()[clear], g["audio_logits_argmax"][b, valid][clear])

        positions = g["full_positions"]
        in_row = [p for p in positions if mask[b, p]]
        index = [int(np.searchsorted(valid, p)) for p in in_row]
        full = g["audio_logits_full_at_positions"][b, [list(positions).index(p) for p in in_row]]
        ours = audio[index].numpy()
        assert np.array_equal(np.isneginf(ours), np.isneginf(full))
        assert_close(np.where(np.isneginf(full), 0, ours), np.where(np.isneginf(full), 0, full), "full audio logits")
        if "text_logits_full_last_position" in g:
            assert_close(text[-1].numpy(), g["text_logits_full_last_position"][b], "full text logits")

"""bfloat16 weights (fp32 accumulation) for every family: teacher-forced logits within the stated
tolerance of the fp32 goldens (docs/performance.md, "bfloat16 accuracy"), and every generation
case of every fixture runs to completion."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DELAY_DIR
from delay_cases import generation_cases
from local_cases import LOCAL_DIR, generation_runs, goldens, make_model_dir
from realtime_cases import REALTIME_DIR, golden, golden_json
from test_realtime_session import RUNS, script

from mossserve.api import TTS
from mossserve.cli import main
from mossserve.engine.static_batch import generate_static
from mossserve.layers.batch_context import BatchContext
from mossserve.loader import build_on_meta, load_weights, weight_files
from mossserve.models.registry import load_talker
from mossserve.speech_request import SpeechRequest

# The stated tolerance, for every family's logits against the reference's fp32 goldens:
MEAN_ERROR_PER_STD = 0.10  # mean |bf16 - fp32| <= 0.10 x the golden logits' standard deviation
CLEAR_GAP = 0.5  # positions whose golden top-2 gap exceeds this ...
CLEAR_TOP1_AGREEMENT = 0.95  # ... pick the golden's top-1 at least this often


def assert_within_bf16_tolerance(ours: torch.Tensor | np.ndarray, ref: np.ndarray, what: str) -> None:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    finite = np.isfinite(ref)
    assert np.array_equal(np.isfinite(ours), finite), f"{what}: masked entries differ"
    ours, ref_f = np.where(finite, ours, 0.0), np.where(finite, ref, 0.0)
    mean_error = np.abs(ours - ref_f).mean() / ref_f[finite].std()
    assert mean_error <= MEAN_ERROR_PER_STD, f"{what}: mean error {mean_error:.4f} x std"
    ranked = np.sort(np.where(finite, ref, -np.inf), axis=-1)
    clear = (ranked[..., -1] - ranked[..., -2]) > CLEAR_GAP
    agree = np.where(finite, ours, -np.inf).argmax(-1) == np.where(finite, ref, -np.inf).argmax(-1)
    if clear.any():
        assert agree[clear].mean() >= CLEAR_TOP1_AGREEMENT, f"{what}: top-1 agrees on {agree[clear].mean():.3f}"


def bf16_model(model_class, config_class, path: Path):
    config = config_class.from_file(path / "config.json")
    model = build_on_meta(lambda: model_class(config), torch.bfloat16, "cpu")
    load_weights(model, weight_files(path), model.checkpoint_layout())
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("checkpoint", ["tiny_nvq32", "tiny_nvq16"])
def test_delay_teacher_forced_logits(checkpoint: str) -> None:
    from mossserve.models.moss_delay import MossDelayModel
    from mossserve.models.moss_delay_config import MossDelayConfig

    model = bf16_model(MossDelayModel, MossDelayConfig, DELAY_DIR / checkpoint)
    golden_tf = np.load(DELAY_DIR / checkpoint / "goldens_tf.npz")
    for case in ["tf_clone_prompt", "tf_computing_loss", "tf_batch_padded"]:
        g = {k[len(case) + 1 :]: golden_tf[k] for k in golden_tf.files if k.startswith(case + "/")}
        ids, mask = torch.from_numpy(g["input_ids"]), g["attention_mask"]
        for b in range(ids.shape[0]):
            valid = np.nonzero(mask[b])[0]
            rows = ids[b : b + 1, valid]
            with torch.no_grad():
                final = model(rows, BatchContext.build([0], len(valid), None, rows.device))
                text, audio = model.text_logits(final)[0].float(), model.audio_logits(final)[0].float()
            assert_within_bf16_tolerance(text[:, g["text_logit_cols"]], g["text_logits_at_cols"][b, valid],
                                         f"{case}[{b}] text logits")
            positions = [p for p in g["full_positions"] if mask[b, p]]
            index = [int(np.searchsorted(valid, p)) for p in positions]
            full = g["audio_logits_full_at_positions"][b, [list(g["full_positions"]).index(p) for p in positions]]
            assert_within_bf16_tolerance(audio[index], full, f"{case}[{b}] audio logits")


def test_local_teacher_forced_logits() -> None:
    from mossserve.models.moss_local import MossLocalModel
    from mossserve.models.moss_local_config import MossLocalConfig

    model = bf16_model(MossLocalModel, MossLocalConfig, LOCAL_DIR)
    g = goldens("teacher_forced")
    for case in ["tf_clone", "tf_batch"]:
        ids, mask = torch.from_numpy(g[f"{case}.input_ids"]), g[f"{case}.attention_mask"].astype(bool)
        labels, positions = torch.from_numpy(g[f"{case}.labels"]), g[f"{case}.positions"]
        for b in range(ids.shape[0]):
            valid = np.flatnonzero(mask[b])
            rows = ids[b, valid]
            with torch.no_grad():
                final = model(rows[None], BatchContext.build([0], len(rows), None, rows.device))[0]
                index = torch.from_numpy(np.searchsorted(valid, positions))
                logits = model.teacher_forced_logits(final[index], labels[b, positions])
            assert_within_bf16_tolerance(torch.stack(logits[1:], dim=1), g[f"{case}.audio_logits"][b],
                                         f"{case}[{b}] audio logits")
            assert_within_bf16_tolerance(logits[0][:, 151643:151669], g[f"{case}.text_logits_special"][b],
                                         f"{case}[{b}] text logits")


def test_realtime_teacher_forced_logits() -> None:
    family = load_talker(REALTIME_DIR, dtype="bfloat16")
    tf = golden("teacher_forced")
    ids = tf["input_ids"]
    with torch.inference_mode():
        last = family.model(ids, BatchContext.build([0], ids.shape[1], None, ids.device))
        logits = family.model.local.teacher_forced(last[0, tf["positions"]], tf["local_codes"][:, :15])
    assert_within_bf16_tolerance(logits.float(), tf["local_logits"].numpy(), "local logits")


def test_the_tolerance_rejects_a_wrong_model() -> None:
    """The check is not vacuous: fp32 logits of another position fail it."""
    g = goldens("teacher_forced")["tf_clone.audio_logits"][0]
    with pytest.raises(AssertionError):
        assert_within_bf16_tolerance(np.roll(g, 1, axis=0), g, "shifted")


@pytest.mark.parametrize("checkpoint", ["tiny_nvq32", "tiny_nvq16"])
def test_delay_generation_cases_run_to_completion(delay_model_dirs, checkpoint: str) -> None:
    tts = TTS.from_pretrained(delay_model_dirs[checkpoint], dtype="bfloat16")
    n_vq = tts.talker.codebooks
    for case in generation_cases(DELAY_DIR / checkpoint):
        prompts = [tts.talker.prompt_from_rows(p) for p in case.prompts]
        for result in tts.generate(prompts, case.sampling, case.max_new_tokens):
            assert result.finish_reason in ("stop", "length") and len(result.rows) >= 1, case.name
            assert result.frames.shape[1] == n_vq and ((result.frames >= 0) & (result.frames < 1024)).all()


def test_local_generation_runs_run_to_completion(tmp_path: Path) -> None:
    family = load_talker(make_model_dir(tmp_path / "local"), dtype="bfloat16")
    for run in generation_runs():
        prompts = [family.with_depth(family.prompt_from_rows(p), run.depth) for p in run.prompts]
        for result in generate_static(family, prompts, [run.sampling] * len(prompts), run.max_new_frames):
            assert result.finish_reason in ("stop", "length") and len(result.rows) >= 1, run.name
            frames = result.frames[:, : run.depth]  # channels above the depth are not generated
            assert ((frames >= 0) & (frames < 1024)).all()


def test_realtime_offline_and_session_cases_run_to_completion(tmp_path: Path) -> None:
    tts = TTS.from_pretrained(REALTIME_DIR, dtype="bfloat16")
    voice = golden("prompts")["codes.voice"].numpy()
    for case, run in golden_json("generation")["runs"].items():
        if "texts" in run:  # the offline batch cases
            requests = [SpeechRequest(input=text, voice=v) for text, v in zip(run["texts"], [voice, None])]
            for result in tts.generate([tts.prompt(r) for r in requests], max_new_frames=64):
                assert result.finish_reason in ("stop", "length"), case
                assert result.frames.shape[1] == 16 and ((result.frames >= 0) & (result.frames < 1024)).all()
    for run in RUNS:
        if not run.startswith("stream_"):
            continue
        path, out = tmp_path / f"{run}.json", tmp_path / f"{run}.npy"
        path.write_text(json.dumps(script(run), ensure_ascii=False))
        assert main(["say", "--model", str(REALTIME_DIR), "--dtype", "bfloat16", "--request", str(path),
                     "--greedy", "--max-frames", "64", "--codes-out", str(out)]) == 0
        codes = np.load(out)
        assert codes.ndim == 2 and codes.shape[1] == 16 and ((codes >= 0) & (codes < 1024)).all()

"""The Local fixture (tests/fixtures/moss_tts_local): the loaded model and the goldens as records."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from mossserve.sampling import SamplingParams

FIXTURES = Path(__file__).parent / "fixtures"
LOCAL_DIR = FIXTURES / "moss_tts_local"
CODEC_DIR = FIXTURES / "moss_audio_tokenizer" / "tiny"
TOKENIZER_DIR = FIXTURES / "moss_tokenizer"
N_VQ, PAD_CODE, AUDIO_END = 32, 1024, 151653

# Upstream `generate` defaults, as generation.json describes the sampled run's settings.
UPSTREAM_DEFAULTS = SamplingParams(text_temperature=1.5, text_top_p=1.0, text_top_k=50, audio_temperature=1.0,
                                   audio_top_p=0.95, audio_top_k=50, audio_repetition_penalty=1.1)


@cache
def load_local_model():
    """The fixture's MossLocalModel, loaded once (fp32, cpu)."""
    from mossserve.loader import build_on_meta, load_weights, weight_files
    from mossserve.models.moss_local import MossLocalModel
    from mossserve.models.moss_local_config import MossLocalConfig

    config = MossLocalConfig.from_file(LOCAL_DIR / "config.json")
    model = build_on_meta(lambda: MossLocalModel(config), torch.float32, "cpu")
    load_weights(model, weight_files(LOCAL_DIR), model.checkpoint_layout())
    return model.eval().requires_grad_(False)


def make_model_dir(root: Path) -> Path:
    """The Local fixture as a published checkpoint directory: config, weights, tokenizer."""
    root.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "generation_config.json", "model.safetensors"):
        (root / file).symlink_to(LOCAL_DIR / file)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (root / file).symlink_to(TOKENIZER_DIR / file)
    return root


def local_family(with_tokenizer: bool = False):
    from mossserve.models.moss_local_family import MossLocalFamily
    from mossserve.text.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_dir(TOKENIZER_DIR) if with_tokenizer else None
    return MossLocalFamily(load_local_model(), tokenizer)


@cache
def goldens(name: str) -> dict[str, np.ndarray]:
    return load_file(LOCAL_DIR / f"{name}.safetensors")


@cache
def meta(name: str) -> dict:
    return json.loads((LOCAL_DIR / f"{name}.json").read_text(encoding="utf-8"))


@dataclass
class GenerationRun:
    name: str
    prompts: list[np.ndarray]  # per sequence, left padding removed
    depth: int
    sampling: SamplingParams
    max_new_frames: int
    frames: np.ndarray  # (B, N, 33) generated rows as upstream appended them
    outputs: list[np.ndarray]  # upstream's returned rows per sequence
    codec_inputs: list[np.ndarray]  # (32, 1, T) what processor.decode gave the codec
    stop_frames: list[int | None]  # 1-based frame of <|audio_end|>


def generation_runs() -> list[GenerationRun]:
    prompts, gen = goldens("prompts"), goldens("generation")
    runs = []
    for name, run in meta("generation")["runs"].items():
        ids, mask = prompts[f"{run['case']}.input_ids"], prompts[f"{run['case']}.attention_mask"].astype(bool)
        kwargs = run["generate_kwargs"]
        sampled = name.startswith("sampled")
        batch = ids.shape[0]
        stops = run["eos_frame_1based"]
        runs.append(GenerationRun(
            name=name,
            prompts=[ids[b][mask[b]] for b in range(batch)],
            depth=kwargs.get("n_vq_for_inference", N_VQ),
            sampling=UPSTREAM_DEFAULTS.with_overrides(seed=run["seed"]) if sampled else SamplingParams.greedy(),
            max_new_frames=kwargs.get("max_new_tokens", 100),
            frames=gen[f"{name}.frames"],
            outputs=[gen[f"{name}.{b}.output"] if f"{name}.{b}.output" in gen else gen[f"{name}.output"]
                     for b in range(batch)],
            codec_inputs=[gen[f"{name}.codec_input.{b}"] for b in range(batch) if f"{name}.codec_input.{b}" in gen],
            stop_frames=stops if isinstance(stops, list) else [stops],
        ))
    return runs


def get_run(name: str) -> GenerationRun:
    return next(r for r in generation_runs() if r.name == name)


def conversations(case: str) -> tuple[list[list[dict]], str]:
    """A prompt case's conversations as prebuilt messages (rendered content + codes), and its mode."""
    refs = goldens("prompts")
    info = meta("prompts")["cases"][case]
    batch = [[{"role": m["role"], "content": m["content"],
               "audio_codes_list": [refs[f"ref.{a['ref']}"] for a in m["audio_codes"]]} for m in conv]
             for conv in info["batch"]]
    return batch, info["mode"]

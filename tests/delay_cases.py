"""The generation goldens of the Delay fixtures as (prompts, sampling, expected) records."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mossserve.sampling import SamplingParams


@dataclass
class GenerationCase:
    name: str
    prompts: list[np.ndarray]  # per row, left padding removed
    pad_lengths: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    seed: int | None
    golden: dict[str, np.ndarray]


def generation_cases(checkpoint: Path) -> list[GenerationCase]:
    meta = json.loads((checkpoint / "goldens.json").read_text())["generation"]
    npz = np.load(checkpoint / "goldens_gen.npz")
    cases = []
    for name, info in meta.items():
        g = {k[len(name) + 1 :]: npz[k] for k in npz.files if k.startswith(name + "/")}
        ids, mask = g["prompt_input_ids"], g["prompt_attention_mask"]
        kw = info["generate_kwargs"]
        sampling = SamplingParams(
            text_temperature=kw["text_temperature"], text_top_p=kw["text_top_p"], text_top_k=kw["text_top_k"],
            audio_temperature=kw["audio_temperature"], audio_top_p=kw["audio_top_p"], audio_top_k=kw["audio_top_k"],
            audio_repetition_penalty=kw["audio_repetition_penalty"], seed=info["seed"],
        )
        cases.append(GenerationCase(
            name=name,
            prompts=[ids[b][mask[b]] for b in range(ids.shape[0])],
            pad_lengths=[int((~mask[b]).sum()) for b in range(ids.shape[0])],
            sampling=sampling,
            max_new_tokens=kw["max_new_tokens"],
            seed=info["seed"],
            golden=g,
        ))
    return cases

"""The Fish S2 Pro fixture (tests/fixtures/fish_s2_pro, copied from fixtures/fish_s2_pro): the tiny
checkpoint loaded once, and the generation goldens as engine requests."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from mossserve.sampling import SamplingParams

FISH_DIR = Path(__file__).parent / "fixtures" / "fish_s2_pro"
GREEDY = SamplingParams(audio_temperature=1.0, audio_top_p=0.9, audio_top_k=1)  # the goldens' greedy
SAMPLED = SamplingParams(audio_temperature=0.8, audio_top_p=0.8, audio_top_k=30, seed=20251123)


@cache
def npz(name: str) -> dict[str, np.ndarray]:
    with np.load(FISH_DIR / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


@cache
def family():
    from mossserve.models.registry import load_talker

    return load_talker(FISH_DIR)


@dataclass
class GenCase:
    name: str
    prompts: list[np.ndarray]  # per batch (T_b, 1 + N), time-first
    ys: list[np.ndarray]  # per batch the reference's y (T_b + n_b, 1 + N)
    codes: list[np.ndarray]  # per batch the reference's returned frames (n_b - 1, N)
    sampling: SamplingParams
    cap: int  # max_new_tokens

    @property
    def generated(self) -> np.ndarray:
        """Every generated column of every batch, in order (what the engine emits as rows)."""
        return np.concatenate([y[len(p):] for p, y in zip(self.prompts, self.ys)])

    def tails(self) -> list[np.ndarray]:
        """Batch b's prompt after batch b-1's prompt and its fed-back frames (b >= 1)."""
        return [p[len(self.prompts[b]) + len(self.codes[b]):] for b, p in enumerate(self.prompts[1:])]


GEN_CASES = {"plain": 64, "clone": 64, "multi_speaker": 64, "emotion": 64, "maxlen": 4, "sampled": 16}


def gen_case(name: str) -> GenCase:
    g = npz("generation")
    batches = sorted({int(k.split("__b")[1].split("__")[0]) for k in g if k.startswith(name + "__b")})
    get = lambda b, what: g[f"{name}__b{b}__{what}"].T.copy()
    return GenCase(name, [get(b, "prompt") for b in batches], [get(b, "y") for b in batches],
                   [get(b, "codes") for b in batches], SAMPLED if name == "sampled" else GREEDY, GEN_CASES[name])


def prompts_json() -> dict:
    return json.loads((FISH_DIR / "prompts.json").read_text())

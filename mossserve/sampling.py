"""Sampling settings of one request.

The Delay family samples its text head with one setting and its audio heads with another; audio
settings may be given per codebook (a sequence of n_vq values) as well as one value for all.
A temperature of 0 means greedy (argmax) for that head group, as in the reference (a negative one is refused).
`audio_repetition_window` limits the repetition history to the last N generated frames (the
Realtime family's window; 0 = the whole history, which is what the other families always use:
they refuse another value).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence, Union

from .errors import InvalidRequestError

PerCodebook = Union[float, Sequence[float]]
# The least temperature (other than 0, greedy) and repetition penalty: logits are divided by them in
# float32, and a divisor far below this makes them infinite (a row of NaN probabilities).
MIN_DIVISOR = 1e-3
# Larger values would only overflow float32 arithmetic (logits / temperature, a top-k as a C int);
# at 100 a temperature already flattens any logits a model gives to near-uniform.
MAX_TEMPERATURE = 100.0
# A repetition penalty multiplies negative logits: past this (the inverse of MIN_DIVISOR) it only drives
# them toward float32's infinity, where a row of seen tokens becomes NaN.
MAX_REPETITION_PENALTY = 1 / MIN_DIVISOR
MAX_TOP_K = 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
    text_temperature: float = 1.5
    text_top_p: float = 1.0
    text_top_k: int = 50
    audio_temperature: PerCodebook = 1.7
    audio_top_p: PerCodebook = 0.8
    audio_top_k: Union[int, Sequence[int]] = 25
    audio_repetition_penalty: PerCodebook = 1.0
    audio_repetition_window: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):  # numpy scalars and arrays as Python numbers and lists (the checks take those)
            value = getattr(self, f.name)
            if isinstance(value, (list, tuple)):
                value = type(value)(v.tolist() if hasattr(v, "tolist") else v for v in value)
            elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
                value = value.tolist()
            object.__setattr__(self, f.name, value)

    @classmethod
    def greedy(cls, **overrides) -> "SamplingParams":
        """Argmax for every head; the repetition penalty still applies where set."""
        return cls(text_temperature=0.0, audio_temperature=0.0, **overrides)

    def with_overrides(self, **overrides) -> "SamplingParams":
        """Replace the fields given (None values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def generator(self):
        """The request's own random stream: seeded by `seed`, or from a fresh seed drawn by a new
        generator (never by torch's global one, whose stream a caller may have seeded for itself)."""
        import torch

        if self.seed is not None:
            return torch.Generator().manual_seed(self.seed)
        generator = torch.Generator()
        generator.seed()
        return generator

    def per_codebook(self, name: str, n_vq: int) -> list[float]:
        """One value per codebook for an audio field, validated."""
        value = getattr(self, name)
        values = [value] * n_vq if isinstance(value, (int, float)) else list(value)
        if len(values) != n_vq:
            raise InvalidRequestError(f"{name} has {len(values)} values; the model has {n_vq} codebooks")
        return [float(v) for v in values]

    def validate(self, codebooks: int | None = None) -> None:
        """Every field's range; with `codebooks`, also the length of per-codebook lists."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "seed":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63):
                    raise InvalidRequestError(f"seed must be an integer in 0..2**63-1, got {value!r}")
                continue
            if f.name == "audio_repetition_window":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise InvalidRequestError(f"audio_repetition_window must be a non-negative integer (0 = all), got {value!r}")
                continue
            if not isinstance(value, (int, float, list, tuple)):
                raise InvalidRequestError(f"{f.name} must be a number or a list of numbers, got {value!r}")
            if f.name.startswith("text_") and isinstance(value, (list, tuple)):
                raise InvalidRequestError(f"{f.name} takes one number (the text head has one setting), got a list")
            values = [value] if isinstance(value, (int, float)) else list(value)
            if codebooks is not None and isinstance(value, (list, tuple)) and len(values) != codebooks:
                raise InvalidRequestError(f"{f.name} has {len(values)} values; the model has {codebooks} codebooks")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise InvalidRequestError(f"{f.name} must be a finite number, got {v!r}")
                if f.name.endswith("temperature") and (v < 0 or 0 < v < MIN_DIVISOR or v > MAX_TEMPERATURE):
                    raise InvalidRequestError(f"{f.name} must be 0 (greedy) or in {MIN_DIVISOR}..{MAX_TEMPERATURE:g}, "
                                              f"got {v}")
                if f.name.endswith("top_p") and not 0.0 < v <= 1.0:
                    raise InvalidRequestError(f"{f.name} must be in (0, 1], got {v}")
                if f.name.endswith("top_k") and (v < 0 or int(v) != v or v > MAX_TOP_K):
                    raise InvalidRequestError(f"{f.name} must be a non-negative integer (0 = off) up to "
                                              f"{MAX_TOP_K}, got {v}")
                if f.name.endswith("repetition_penalty") and not MIN_DIVISOR <= v <= MAX_REPETITION_PENALTY:
                    raise InvalidRequestError(f"{f.name} must be in {MIN_DIVISOR}..{MAX_REPETITION_PENALTY:g}, got {v}")

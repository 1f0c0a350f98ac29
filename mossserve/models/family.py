"""The talker-family seam: what the engine needs from a model family, and nothing more.

A family turns a request into a prompt matrix, keeps per-slot decode state in tensors (so a
batch of requests at different points of their lives is one gather), and turns the last
hidden state of every row into that row's next input row. The engine owns slots, the KV
cache, batching and streaming; the family owns everything model-specific.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import InvalidRequestError
from ..sampling import SamplingParams
from ..speech_request import EncodeVoice, SpeechRequest
from .qwen3_config import Qwen3Config


@dataclass
class Prompt:
    """A request's prompt matrix (T, columns) plus what its family needs to start decoding."""

    rows: np.ndarray
    start_length: int = 0  # prompt rows that belong to the returned audio (continuation prefix)
    info: dict = field(default_factory=dict)
    later_rows: int = 0  # rows the family will add to the prompt while it runs (StepOutput.prompt_rows)


def checked_rows(rows: np.ndarray, columns: int, vocab_size: int, max_code: int) -> np.ndarray:
    """A prompt matrix as a user gives it (`say --prompt-matrix`), checked: shape (T, columns),
    integers, text ids in 0..vocab_size - 1, codes in 0..max_code. Returned as int64."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != columns or rows.shape[0] == 0:
        raise InvalidRequestError(f"prompt matrix must have shape (T, {columns}), got {tuple(rows.shape)}")
    if not np.issubdtype(rows.dtype, np.integer):
        raise InvalidRequestError(f"prompt matrix must hold integers, got {rows.dtype}")
    if rows[:, 0].min() < 0 or rows[:, 0].max() >= vocab_size:
        raise InvalidRequestError(f"prompt text ids must lie in 0..{vocab_size - 1}")
    if rows[:, 1:].min() < 0 or rows[:, 1:].max() > max_code:
        raise InvalidRequestError(f"prompt audio codes must lie in 0..{max_code}")
    return rows.astype(np.int64)


@dataclass
class StepOutput:
    """Per batch row: the next input row, a completed audio frame (if any), and whether it ended."""

    rows: torch.Tensor  # (B, columns) int64
    frames: torch.Tensor  # (B, codebooks) int64, meaningful where has_frame
    has_frame: torch.Tensor  # (B,) bool
    new_segment: torch.Tensor  # (B,) bool: this frame follows a gap and starts a new clip
    finished: torch.Tensor  # (B,) bool
    waiting: torch.Tensor | None = None  # (B,) bool: the next row needs input not yet pushed (see push_input)
    # Per row, None or rows (n, columns) the request's prompt continues with: the engine prefills them
    # after everything already in the cache and steps from their last hidden state; the row emitted
    # in this step is not fed back (e.g. Fish: the next text batch of one growing conversation).
    prompt_rows: list[np.ndarray | None] | None = None
    # Per row with prompt_rows: how many of its latest cached positions those rows begin by rewriting
    # (the engine drops them from the cache first; e.g. Fish: a column whose prompt form differs).
    rewound: list[int] | None = None


@dataclass
class InputUpdate:
    """What input pushed to a running request changes (`TalkerFamily.push_input`)."""

    prompt_rows: np.ndarray | None = None  # rows to add to the prompt (prefilled before the first step)
    seal: bool = False  # the prompt is complete: its last row leads to the first step
    next_row: np.ndarray | None = None  # the next input row of a request that was waiting for input
    text_tokens: int = 0  # text ids the piece added: the runaway guard's bound grows with them


class TalkerFamily(ABC):
    name: ClassVar[str]  # delay, local, realtime, fish: what /v1/models, the bench and the docs call it
    # A reference voice is audio plus its transcript (Fish): a stored voice's transcript is then the
    # request's reference_text unless one is given (for Delay, reference_text means continuation).
    voice_needs_transcript: ClassVar[bool] = False
    normalizes_reference_loudness: ClassVar[bool] = True  # the MOSS processors bring a reference to -20 dBFS
    reserved_text: ClassVar[tuple[str, ...]] = ()  # markers the prompt builder reads in text (`check_typed`)
    repetition_window: ClassVar[bool] = False  # the penalty's history can be limited (audio_repetition_window)
    greedy_penalty: ClassVar[bool] = True  # greedy decoding still applies the repetition penalty (not Local's)
    model: nn.Module
    backbone_config: Qwen3Config  # sizes of the KV cache
    columns: int  # width of a prompt row: text column + one per codebook
    codebooks: int
    sample_rate: int
    frame_rate: float = 12.5  # audio frames per second (the MOSS-Audio-Tokenizer's rate)
    max_new_frames: int  # default cap on generated steps
    source: Path | None = None  # the checkpoint directory it was loaded from

    @abstractmethod
    def build_prompt(self, request: SpeechRequest, encode_voice: EncodeVoice | None = None) -> Prompt: ...

    @property
    @abstractmethod
    def row_limits(self) -> tuple[int, int]:
        """(text vocabulary size, largest audio code) of a prompt row this model can embed."""

    def checked_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows as a user gives them (`say --prompt-matrix`), checked against this model (`checked_rows`)."""
        return checked_rows(rows, self.columns, *self.row_limits)

    def check_prompt(self, prompt: Prompt) -> None:
        """Refuse a prompt (a hand-made one: the builders check theirs) that the model cannot embed;
        run, it would fail in the embedding and take its whole batch with it (on CUDA, the device)."""
        self.checked_rows(prompt.rows)

    @abstractmethod
    def default_sampling(self) -> SamplingParams: ...

    @abstractmethod
    def new_state(self, max_slots: int, device: torch.device) -> object:
        """Per-slot decode state tables for up to `max_slots` concurrent requests."""

    @abstractmethod
    def admit(self, state: object, slot: int, prompt: Prompt, sampling: SamplingParams) -> list[np.ndarray]:
        """Start a request in `slot`; returns the audio segments (F_i, codebooks) already complete in
        the prompt (a continuation prefix); generated frames extend the last one unless they follow a gap."""

    def release(self, state: object, slot: int) -> None:
        """Forget the request in `slot`."""

    def conversation_prompts(self, data: object, base_dir: Path | None, mode: str | None,
                             encode_voice: EncodeVoice | None = None) -> list[Prompt]:
        """`--conversation`: the prompts of a conversation file's JSON (`data`; relative paths from
        `base_dir`), in the family's own message form and `mode` (None: the form's default)."""
        raise InvalidRequestError(f"this {self.name} model takes no --conversation; give --request")

    def check_transcript(self, text: str, name: str) -> None:
        """Raise InvalidRequestError for a voice's transcript this model would refuse in a request
        (checked when a voice is stored with it, and again by each server that uses a stored voice's
        transcript as a reference text: VoiceResolver.check_stored_transcript)."""
        self.check_typed(text, name)

    def check_typed_text(self, request: SpeechRequest) -> None:
        """`check_typed` on each of the request's typed text fields."""
        for name, text in request.typed_texts:
            self.check_typed(text, name)

    def check_typed(self, text: str, name: str) -> None:
        """Raise InvalidRequestError for text a user typed (field `name`) that spells a special token
        (`TextTokenizer.encode_user`) or one of `reserved_text`, as typed or as the prompt builder
        will tokenize it (`typed_form`: a zero-width character inside a spelling must not hide it).
        Without a tokenizer only prompt matrices run, so nothing is checked here."""
        if getattr(self, "tokenizer", None) is None:
            return
        for form in dict.fromkeys((text, self.typed_form(text))):
            marker = next((m for m in self.reserved_text if m in form), None)
            if marker is not None:
                raise InvalidRequestError(f"{name} contains {marker}, which text may not use (the prompt builder "
                                          "reserves it)")
            self.tokenizer.encode_user(form, name)

    def typed_form(self, text: str) -> str:
        """Typed text as the prompt builder tokenizes it (the Delay processor normalizes it first)."""
        return text

    def check_sampling(self, sampling: SamplingParams) -> None:
        """Raise InvalidRequestError for valid settings this family cannot sample with (checked when a
        request is queued, so that `admit` never refuses one on the engine's thread)."""
        if sampling.audio_repetition_window and not self.repetition_window:  # refused rather than ignored
            raise InvalidRequestError(f"audio_repetition_window is not a setting of the {self.name} family: its "
                                      "repetition penalty always looks at the whole history (give 0)")

    # ---- streaming input: text arriving while the request runs (families that support it) -----
    def push_input(self, state: object, slot: int, piece: object, end: bool) -> InputUpdate:
        """More input for the request in `slot` (whose prompt said `info["open"]`); `end`: no more comes.
        Called on the engine thread, in the order the pieces were pushed."""
        raise NotImplementedError

    def check_input(self, piece: object) -> None:
        """Raise InvalidRequestError for a piece `push_input` refuses whatever the request's state.
        Called on the pushing thread: a bad piece fails the push, not the request it was meant for."""

    # ---- sessions: turns that continue one context (families that support them) -----------
    supports_sessions: bool = False

    def continue_session(self, state: object, slot: int, prompt: Prompt, sampling: SamplingParams) -> list[np.ndarray]:
        """The next turn of a session in `slot`, whose KV cache holds the earlier turns; like `admit`."""
        raise NotImplementedError

    def save_session(self, state: object, slot: int) -> object:
        """What a session's later turns need from `slot` when the session gives the slot up (its
        context is then prefilled again into another slot, where `restore_session` puts this back)."""
        raise NotImplementedError

    def restore_session(self, state: object, slot: int, saved: object) -> None:
        raise NotImplementedError

    def decode_weights(self) -> dict[str, torch.Tensor]:
        """Every weight a decode step may read, by name: the model's parameters and any copy of some of
        their rows the family keeps for its step (the bench counts the bytes a step reads from these)."""
        return dict(self.model.named_parameters())

    def set_decode_mode(self, state: object, mode: str, batch_sizes: list[int]) -> None:
        """The runner's decode mode ("eager", "static" or "graphs") and padded batch sizes: a family whose
        step makes model calls of its own (a depth transformer) runs them the same way."""

    @abstractmethod
    def step(self, state: object, hidden: torch.Tensor, slots: torch.Tensor) -> StepOutput:
        """hidden (B, H): last hidden state of each row; slots (B,) their slots."""

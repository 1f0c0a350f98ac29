"""The Local family (MOSS-TTS-Local-Transformer) behind the talker seam.

Per step, every running row's backbone state goes through the depth loop at once: one depth-
transformer step for the whole batch per channel c = 0 (text), 1..K, each followed by the choice
of that channel's token for every row. Each request has its own depth K (variable bitrate): a row
takes part in channels 0..K and its row holds SKIPPED above K, so the backbone ignores those
channels (upstream embeds only channels 0..K, prompt rows included). Its frames hand K codebooks
on (`Prompt.info["codebooks"]`), which the engine decodes with K quantizers.

Randomness follows upstream `_sample` (fixtures/moss_tts_local/README.md section 6): per frame one
multinomial draw per sampled channel 0, 1, .., K, each over that channel's whole vocabulary. Every
request draws from its own generator, so a seeded request replays upstream's `torch.manual_seed`
run alone or in any batch (up to float rounding at near-ties: docs/engine.md, "Determinism");
`shared_seed` (static batch only) gives the batch one generator.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidRequestError
from ..layers.fixed_shape import FixedShapeCalls
from ..layers.sampler import exponential_noise, noise_by_request
from ..sampling import SamplingParams
from ..speech_request import SpeechRequest
from ..text.delay_prompt import AUDIO_PLACEHOLDER
from .family import EncodeVoice, Prompt, StepOutput, TalkerFamily
from .moss_local import SKIPPED, MossLocalModel
from .moss_local_config import MossLocalConfig
from .moss_local_sampling import choose

# Upstream `generate` defaults (text: no repetition penalty; audio: 1.1 over the whole column).
LOCAL_SAMPLING = SamplingParams(text_temperature=1.5, text_top_p=1.0, text_top_k=50, audio_temperature=1.0,
                                audio_top_p=0.95, audio_top_k=50, audio_repetition_penalty=1.1)


@dataclass
class LocalState:
    depth: torch.Tensor  # (S,) int64: codebooks generated per frame
    after_gap: torch.Tensor  # (S,) bool: the next frame starts a new clip
    seen: torch.Tensor  # (S, n_vq, A + 1) bool: codes in each codebook's column so far (prompt included)
    text_temperature: torch.Tensor  # (S,) float32
    text_top_k: torch.Tensor  # (S,) int64
    text_top_p: torch.Tensor  # (S,) float64 (HF takes 1 - p in double)
    audio_temperature: torch.Tensor  # (S, n_vq) float32
    audio_top_k: torch.Tensor  # (S, n_vq) int64
    audio_top_p: torch.Tensor  # (S, n_vq) float64
    audio_penalty: torch.Tensor  # (S, n_vq) float32
    generators: list[torch.Generator | None]
    depth_calls: FixedShapeCalls  # the depth positions (at fixed shapes in static / graphs mode)
    shared_generator: torch.Generator | None = None


class MossLocalFamily(TalkerFamily):
    name = "local"
    reserved_text = (AUDIO_PLACEHOLDER,)
    greedy_penalty = False  # upstream's greedy mode runs no logits processor at all

    def __init__(self, model: MossLocalModel, tokenizer, sampling_defaults: SamplingParams | None = None,
                 max_new_frames: int = 4096) -> None:
        self.model = model
        self.config: MossLocalConfig = model.config
        self.backbone_config = self.config.language
        self.tokenizer = tokenizer
        self._builder = None
        self.codebooks = self.config.n_vq
        self.columns = self.config.channels
        self.sample_rate = self.config.sampling_rate
        self._sampling_defaults = sampling_defaults or LOCAL_SAMPLING
        self.max_new_frames = max_new_frames

    # ---- prompts (typed text is tokenized as given: the Local processor does not normalize it) ----
    def build_prompt(self, request: SpeechRequest, encode_voice: EncodeVoice | None = None) -> Prompt:
        from ..text.delay_prompt import check_joined_fields
        from ..text.local_prompt import local_conversation

        self.check_typed_text(request)
        conversation, mode = local_conversation(request, n_vq=self.config.n_vq,
                                                audio_vocab_size=self.config.audio_vocab_size,
                                                encode_voice=encode_voice)
        check_joined_fields(conversation, self.tokenizer)
        prompt = self.prompt_from_conversation(conversation, mode)
        prompt.info["text_tokens"] = len(self.tokenizer.encode(request.input or ""))
        prompt.info["duration_frames"] = request.expected_frames
        return prompt if request.depth is None else self.with_depth(prompt, request.depth)

    def conversation_prompts(self, data: object, base_dir: Path | None, mode: str | None,
                             encode_voice: EncodeVoice | None = None) -> list[Prompt]:
        from ..text.conversation import message_prompts

        return message_prompts(self, data, base_dir, mode, encode_voice)

    def prompt_from_conversation(self, conversation: list, mode: str) -> Prompt:
        """A conversation as upstream's processor takes it (text/local_prompt.py)."""
        from ..text.local_prompt import LocalPromptBuilder

        if self._builder is None:
            if self.tokenizer is None:
                raise InvalidRequestError("this model was loaded without a tokenizer; give a prompt matrix")
            self._builder = LocalPromptBuilder(self.tokenizer, self.config)
        return self.prompt_from_rows(self._builder.build(conversation, mode))

    @property
    def row_limits(self) -> tuple[int, int]:
        return self.config.language.vocab_size, self.config.audio_pad_code

    def prompt_from_rows(self, rows: np.ndarray) -> Prompt:
        """A prompt matrix as is (e.g. `say --prompt-matrix`), checked against this model; full depth."""
        cfg = self.config
        rows = self.checked_rows(rows)
        starts = np.flatnonzero(rows[:, 0] == cfg.audio_start_token_id)
        # Upstream returns the rows from the last <|audio_start|>; those already in the prompt are the prefix.
        start_length = len(rows) - int(starts[-1]) - 1 if len(starts) else 0
        return Prompt(rows=rows, start_length=start_length, info={"depth": cfg.n_vq, "matrix": rows})

    def check_depth(self, depth: int) -> None:
        n = self.config.n_vq
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or not 1 <= depth <= n:
            raise InvalidRequestError(f"depth must be an integer in 1..{n} (codebooks per frame), got {depth!r}")

    def check_prompt(self, prompt: Prompt) -> None:
        """As every family's, but at a reduced depth the channels above it hold SKIPPED (`with_depth`)."""
        depth = prompt.info.get("depth", self.config.n_vq)
        self.check_depth(depth)
        rows = prompt.rows
        if rows.ndim == 2 and rows.shape[1] == self.columns and depth < self.config.n_vq:
            if not (rows[:, 1 + depth:] == SKIPPED).all():
                raise InvalidRequestError(f"a prompt at depth {depth} must hold {SKIPPED} (not embedded) in the channels "
                                          f"above {depth}; it holds codes there")
            rows = rows.copy()
            rows[:, 1 + depth:] = 0  # checked as codes below
        self.checked_rows(rows)

    def with_depth(self, prompt: Prompt, depth: int) -> Prompt:
        """The prompt at depth K: channels above K become SKIPPED (not embedded), frames hand K codebooks on."""
        self.check_depth(depth)
        rows = prompt.info.get("matrix", prompt.rows).copy()
        rows[:, 1 + depth :] = SKIPPED
        info = {**prompt.info, "depth": int(depth), "codebooks": int(depth)}
        return Prompt(rows=rows, start_length=prompt.start_length, info=info)

    def default_sampling(self) -> SamplingParams:
        return self._sampling_defaults

    # ---- decode state --------------------------------------------------------------------
    def new_state(self, max_slots: int, device: torch.device, shared_seed: int | None = None) -> LocalState:
        n, codes = self.config.n_vq, self.config.audio_vocab_size + 1
        return LocalState(
            depth=torch.full((max_slots,), n, dtype=torch.int64, device=device),
            after_gap=torch.ones(max_slots, dtype=torch.bool, device=device),
            seen=torch.zeros(max_slots, n, codes, dtype=torch.bool, device=device),
            text_temperature=torch.ones(max_slots, dtype=torch.float32, device=device),
            text_top_k=torch.zeros(max_slots, dtype=torch.int64, device=device),
            text_top_p=torch.ones(max_slots, dtype=torch.float64, device=device),
            audio_temperature=torch.ones(max_slots, n, dtype=torch.float32, device=device),
            audio_top_k=torch.zeros(max_slots, n, dtype=torch.int64, device=device),
            audio_top_p=torch.ones(max_slots, n, dtype=torch.float64, device=device),
            audio_penalty=torch.ones(max_slots, n, dtype=torch.float32, device=device),
            generators=[None] * max_slots,
            depth_calls=self._depth_calls(),
            shared_generator=None if shared_seed is None else torch.Generator().manual_seed(shared_seed),
        )

    def admit(self, state: LocalState, slot: int, prompt: Prompt, sampling: SamplingParams) -> list[np.ndarray]:
        cfg, n = self.config, self.config.n_vq
        sampling.validate()
        depth = int(prompt.info.get("depth", n))
        device = state.depth.device
        rows = prompt.rows
        codes = torch.from_numpy(rows[:, 1:]).to(device)
        codes = torch.where(codes >= 0, codes, cfg.audio_pad_code)  # SKIPPED channels are never sampled
        state.seen[slot] = False
        state.seen[slot].scatter_(1, codes.T, True)
        state.depth[slot] = depth
        state.text_temperature[slot] = float(sampling.text_temperature)
        state.text_top_k[slot] = int(sampling.text_top_k or 0)
        state.text_top_p[slot] = float(sampling.text_top_p if sampling.text_top_p is not None else 1.0)
        for name, table in (("audio_temperature", state.audio_temperature), ("audio_top_p", state.audio_top_p),
                            ("audio_repetition_penalty", state.audio_penalty)):
            table[slot] = torch.tensor(sampling.per_codebook(name, n), dtype=table.dtype, device=device)
        state.audio_top_k[slot] = torch.tensor([int(k) for k in sampling.per_codebook("audio_top_k", n)], device=device)
        state.generators[slot] = sampling.generator()
        prefix, ends_in_gap = self._prefix_segments(rows, depth)
        state.after_gap[slot] = ends_in_gap
        return prefix

    def _prefix_segments(self, rows: np.ndarray, depth: int) -> tuple[list[np.ndarray], bool]:
        """The prompt's audio after its last <|audio_start|> (upstream decodes it with the new frames):
        runs of rows whose first `depth` codes are not all pad; and whether it ends on a gap."""
        cfg = self.config
        starts = np.flatnonzero(rows[:, 0] == cfg.audio_start_token_id)
        tail = rows[int(starts[-1]) + 1 :, 1:] if len(starts) else rows[:0, 1:]
        pad = (tail[:, :depth] == cfg.audio_pad_code).all(axis=1)
        keep = np.concatenate([[False], ~pad, [False]])
        edges = np.flatnonzero(np.diff(keep.astype(np.int8)))
        segments = [tail[a:b] for a, b in zip(edges[0::2], edges[1::2])]
        return segments, len(tail) == 0 or bool(pad[-1])

    def release(self, state: LocalState, slot: int) -> None:
        state.generators[slot] = None

    # ---- one decode step -----------------------------------------------------------------
    def set_decode_mode(self, state: LocalState, mode: str, batch_sizes: list[int]) -> None:
        if mode != "eager":
            state.depth_calls = self._depth_calls(batch_sizes, graphs=mode == "graphs")

    def _depth_calls(self, batch_sizes: Sequence[int] = (), graphs: bool = False) -> FixedShapeCalls:
        """The depth positions of a frame, at fixed sizes (static / graphs modes) or at each batch's own."""
        model = self.model
        weight = model.audio_head
        return FixedShapeCalls(lambda channel, x, cache: model.depth_logits(x, cache, channel),
                               lambda size: model.new_depth_cache(size, self.config.channels),
                               self.config.local.hidden_size, weight.dtype, weight.device, range(self.config.channels),
                               batch_sizes, graphs)

    def step(self, state: LocalState, hidden: torch.Tensor, slots: torch.Tensor) -> StepOutput:
        """The depth loop for every row at once: one depth-transformer step per channel. Every row's
        settings, repetition history and noise are gathered once per frame, so a channel costs its
        model call and one batched choice, and reads nothing back to the host."""
        cfg, model = self.config, self.model
        batch = hidden.shape[0]
        depth = state.depth[slots]
        deepest = int(depth.max())
        active = depth[:, None] >= torch.arange(self.columns, device=hidden.device)  # channel 0 (text) always
        temperature = torch.cat([state.text_temperature[slots, None], state.audio_temperature[slots]], dim=1)
        temperature = temperature.masked_fill(~active, 0.0)  # rows past their depth draw nothing
        top_k = torch.cat([state.text_top_k[slots, None], state.audio_top_k[slots]], dim=1)
        top_p = torch.cat([state.text_top_p[slots, None], state.audio_top_p[slots]], dim=1)
        penalty, seen = state.audio_penalty[slots], state.seen[slots]
        drawing = temperature[:, : deepest + 1] > 0
        # a channel where no sampled row is penalised skips the history
        penalised = [False] + ((penalty != 1.0) & (temperature[:, 1:] > 0)).any(dim=0).tolist()
        noise = self._frame_noise(state, slots, drawing, hidden.device)
        depth_logits = state.depth_calls.frame(batch)
        tokens = torch.full((batch, self.columns), SKIPPED, dtype=torch.int64, device=hidden.device)
        x = model.depth_input(hidden)
        for channel in range(deepest + 1):
            logits = depth_logits(channel, x)
            if channel:
                logits[:, cfg.audio_pad_code] = float("-inf")
            history = (penalty[:, channel - 1], seen[:, channel - 1]) if penalised[channel] else (None, None)
            chosen = choose(logits, temperature[:, channel], top_k[:, channel], top_p[:, channel], noise[channel],
                            *history)
            tokens[:, channel] = torch.where(active[:, channel], chosen, SKIPPED)
            if channel < deepest:
                x = model.token_input(channel, chosen)
        self._remember(state, slots, tokens[:, 1:])
        finished = tokens[:, 0] == cfg.audio_end_token_id
        new_segment = state.after_gap[slots]
        state.after_gap[slots] = False
        return StepOutput(rows=tokens, frames=tokens[:, 1:], has_frame=torch.ones_like(finished),
                          new_segment=new_segment, finished=finished)

    @staticmethod
    def _remember(state: LocalState, slots: torch.Tensor, codes: torch.Tensor) -> None:
        """The frame's codes (B, n_vq; SKIPPED past a row's depth) join their codebooks' histories.
        A channel's choice reads only its own codebook's history, so one update after the frame
        gives every channel what an update after each channel would."""
        rows, books = torch.nonzero(codes != SKIPPED, as_tuple=True)
        state.seen[slots[rows], books, codes[rows, books]] = True

    def _frame_noise(self, state: LocalState, slots: torch.Tensor, drawing: torch.Tensor,
                     device: torch.device) -> list[torch.Tensor | None]:
        """Each channel's exponential noise for the frame (B, that channel's vocabulary), None where
        no row draws: upstream's one multinomial call per drawing channel 0, 1, .., in channel order.
        Per-request generators: each request's draws in one call per vocabulary (its text draw, then
        its audio channels' in order, as one call per channel would draw them; ones elsewhere). The
        shared generator: each channel's drawing rows in batch order, channel after channel."""
        text_vocab, audio_vocab = self.config.language.vocab_size, self.config.audio_vocab_size + 1
        counts = drawing.sum(dim=0).tolist()
        if state.shared_generator is not None:
            noise = []
            for channel, count in enumerate(counts):
                vocab = text_vocab if channel == 0 else audio_vocab
                channel_noise = None
                if count:
                    channel_noise = torch.ones(len(slots), vocab, device=device)
                    channel_noise[drawing[:, channel]] = exponential_noise(count, vocab, state.shared_generator, device)
                noise.append(channel_noise)
            return noise
        generators = [state.generators[slot] for slot in slots.tolist()]
        text = noise_by_request(drawing[:, :1], generators, text_vocab, device)[:, 0] if counts[0] else None
        audio = noise_by_request(drawing[:, 1:], generators, audio_vocab, device) if any(counts[1:]) else None
        return [text] + [audio[:, c] if count else None for c, count in enumerate(counts[1:])]

"""The Realtime family (MOSS-TTS-Realtime) behind the seam: the offline path (README §5.8).

A plain request becomes the offline prompt (system prompt, voice context, `<|im_start|>assistant\\n`)
plus the prefill rows: the first P = min(n, 12) text ids with BOS in codebook 0 of the last.
Per slot the state keeps the text ids still to feed, the sampling settings and the repetition
history; each `step` runs the local depth loop for the whole batch at once (one local-transformer
call per codebook position) and returns `[next text id or <|text_pad|>, frame]` as the next row.
A frame whose codebook 0 is EOS (1026) ends the request and is not handed on.

Randomness follows the reference: one multinomial per codebook per frame, in codebook order,
each from the request's own generator, so a seeded request replays the reference's seeded run
alone or in a batch. The repetition history is per request, per codebook: token counts over the
last `audio_repetition_window` frames (0: all), kept with a ring of those frames so that a frame
leaving the window is subtracted; the first frame is never penalised.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidRequestError
from ..layers.fixed_shape import FixedShapeCalls
from ..layers.sampler import apply_repetition_penalty, noise_by_request
from ..sampling import SamplingParams
from ..speech_request import EncodeVoice, SpeechRequest, check_text
from .family import InputUpdate, Prompt, StepOutput, TalkerFamily
from .moss_realtime import MossRealtimeModel
from .moss_realtime_config import MossRealtimeConfig
from .moss_realtime_sampling import sample_codes

# The reference's generation defaults (inferencer.py, the model card); window 50 frames.
DEFAULT_SAMPLING = SamplingParams(audio_temperature=0.8, audio_top_p=0.6, audio_top_k=30,
                                  audio_repetition_penalty=1.1, audio_repetition_window=50)
# The model card's and infer.py's max_length (the inferencer class's own default is 1000): steps after the
# first frame, so 5001 frames (400 s) at most.
DEFAULT_MAX_LENGTH = 5000
UNSUPPORTED_FIELDS = ("reference_text", "instructions", "duration_tokens", "duration_seconds", "speakers", "depth",
                      "chunk_length")


@dataclass
class RealtimeState:
    text: torch.Tensor  # (S, cap) int64: assistant text ids still to feed after the prefill
    text_len: torch.Tensor  # (S,) int64
    text_pos: torch.Tensor  # (S,) int64: next id to feed
    frames: torch.Tensor  # (S,) int64: frames generated so far
    counts: torch.Tensor  # (S, 16, codes) int32: history tokens per codebook within the window
    ring: torch.Tensor  # (S, W, 16) int64: the last `window` frames, frame k at k % window
    window: torch.Tensor  # (S,) int64, 0 = the whole history
    temperature: torch.Tensor  # (S, 16) float32, <= 0 greedy
    top_k: torch.Tensor  # (S, 16) int64, 0 = off
    top_p: torch.Tensor  # (S, 16) float64: 1 - p is formed in double, as the reference's Python float
    penalty: torch.Tensor  # (S, 16) float32
    generators: list[torch.Generator | None]
    # streaming input (a turn whose text arrives while it speaks)
    ended: torch.Tensor  # (S,) bool: no more text comes (then text pads follow the text)
    waiting: torch.Tensor  # (S,) bool: the last step found no text to feed next
    last_frame: torch.Tensor  # (S, 16) int64: the frame the next row carries
    prefilled: torch.Tensor  # (S,) bool: the turn's prefill rows have been handed to the engine
    texts: list  # per slot: the TextSegmentStream cutting pushed text, or None
    depth_calls: FixedShapeCalls  # the local transformer's positions (at fixed shapes in static / graphs mode)


class MossRealtimeFamily(TalkerFamily):
    name = "realtime"
    normalizes_reference_loudness = False  # the reference encodes the loaded audio as it is (inferencer.py)

    def __init__(self, model: MossRealtimeModel, tokenizer, max_new_frames: int = DEFAULT_MAX_LENGTH + 1,
                 sampling_defaults: SamplingParams | None = None) -> None:
        self.model = model
        self.config: MossRealtimeConfig = model.config
        self.backbone_config = self.config.language
        self.tokenizer = tokenizer
        self.codebooks = self.config.rvq
        self.columns = 1 + self.config.rvq
        self.sample_rate = self.config.sampling_rate
        self.max_new_frames = max_new_frames
        self._sampling_defaults = sampling_defaults or DEFAULT_SAMPLING
        self._builder = None

    # ---- prompts -------------------------------------------------------------------------
    @property
    def builder(self):
        from ..text.realtime_prompt import RealtimePromptBuilder

        if self._builder is None:
            if self.tokenizer is None:
                raise InvalidRequestError("this model was loaded without a tokenizer; give a prompt matrix")
            self._builder = RealtimePromptBuilder(self.tokenizer, self.config)
        return self._builder

    def build_prompt(self, request: SpeechRequest, encode_voice: EncodeVoice | None = None) -> Prompt:
        """The offline path: system prompt (+ voice context) + assistant start + prefill rows."""
        given = [name for name in UNSUPPORTED_FIELDS if getattr(request, name) is not None]
        if given or request.mode == "continuation":
            raise InvalidRequestError(f"MOSS-TTS-Realtime takes input and voice only; not {', '.join(given or ['continuation'])}")
        if not request.input:
            raise InvalidRequestError("input text is required")
        self.check_typed_text(request)
        voice = request.voice
        if voice is not None and not isinstance(voice, np.ndarray):
            if encode_voice is None:
                raise InvalidRequestError("a reference audio voice needs a codec to encode it; give codes (frames, 16)")
            voice = encode_voice(Path(voice))
        voice = None if voice is None else self.builder.check_codes(voice, "voice")
        return self.offline_prompt(self.tokenizer.encode(request.input), voice)

    def offline_prompt(self, text_ids: list[int], voice: np.ndarray | None = None) -> Prompt:
        """Prompt for assistant text ids and optional time-major voice codes (T, 16)."""
        from ..text.realtime_prompt import prefill_length

        prefilled = prefill_length(len(text_ids), ended=False)
        rows = np.concatenate([self.builder.offline(voice), self.builder.prefill(text_ids[:prefilled])])
        return self.prompt_from_rows(rows, text_ids[prefilled:], text_tokens=len(text_ids))

    def turn_prompt(self, turn, first: bool, voice: np.ndarray | None = None) -> Prompt:
        """A session turn whose text is all known (a session script, docs/cli.md): the turn's input,
        the prefill rows the reference's session feeds for the turn's pushes, and the rest of its
        text, one id per step."""
        rows, prefill, rest = self._turn_rows(turn, first, voice)
        prompt = self.prompt_from_rows(rows, rest, text_tokens=len(prefill) + len(rest))
        prompt.info["uncapped"] = True  # the reference's session runs a turn to its EOS: no step cap
        return prompt

    def _turn_rows(self, turn, first: bool, voice: np.ndarray | None) -> tuple[np.ndarray, list[int], list[int]]:
        """(the turn's input + its prefill rows, the prefilled text ids, the ids fed one per step after them)."""
        from ..text.realtime_session import split_text

        if turn.pieces:
            self.check_typed("".join(turn.pieces), "input")
        for chunk in turn.token_chunks:
            self.check_input(chunk)
        prefill, rest = split_text(turn, self.tokenizer.encode)
        return np.concatenate([self.turn_input(turn, first, voice), self.builder.prefill(prefill)]), prefill, rest

    def conversation_prompts(self, data: object, base_dir: Path | None, mode: str | None,
                             encode_voice: EncodeVoice | None = None) -> list[Prompt]:
        """`--conversation`: upstream's fine-tuning record (text/realtime_conversation.py)."""
        from ..text.realtime_conversation import parse_realtime_conversation

        return [self.prompt_from_conversation(parse_realtime_conversation(data, base_dir, encode_voice), mode)]

    def prompt_from_conversation(self, conversation, mode: str | None = None) -> Prompt:
        """The last turn with the earlier ones as context: the rows a session's cache would hold had it
        spoken their audio itself (README §5.7: each turn's input and prefill, then one step row per
        frame; no EOS frame), then the last turn's input and prefill. In continuation the last turn's
        audio is fed the same way; it starts the returned codes (decoded as context, cut from the audio)
        and the repetition history, as if generated."""
        from ..text.realtime_prompt import orient_codes

        mode = mode or conversation.default_mode
        given = conversation.turns[-1].audio is not None
        if mode == "continuation" and not given:
            raise InvalidRequestError("continuation goes on from the last assistant message's audio; it has none")
        if mode == "generation" and given:
            raise InvalidRequestError("the last assistant message has audio, so it is a continuation; generation "
                                      "speaks a last message without audio")
        if mode not in ("generation", "continuation"):
            raise InvalidRequestError(f"mode must be generation or continuation, got {mode!r}")
        pieces = []
        for index, turn in enumerate(conversation.turns):
            rows, prefill, rest = self._turn_rows(turn, index == 0, conversation.voice)
            frames = np.zeros((0, self.codebooks), dtype=np.int64)
            if turn.audio is not None:
                frames = self.builder.check_codes(orient_codes(turn.audio), f"assistant message {index}'s audio")
            pieces += [rows, self.builder.steps(rest, frames)]
        prompt = self.prompt_from_rows(np.concatenate(pieces), rest[len(frames):],
                                       text_tokens=len(prefill) + len(rest))
        if given:
            prompt.start_length, prompt.info["history"] = len(frames), frames
        return prompt

    def open_turn_prompt(self, turn, first: bool, voice: np.ndarray | None = None) -> Prompt:
        """A session turn whose text streams in (`push_input`): the turn's input only, left open."""
        prompt = self.prompt_from_rows(self.turn_input(turn, first, voice))
        prompt.info["open"] = prompt.info["uncapped"] = True
        return prompt

    def turn_input(self, turn, first: bool, voice: np.ndarray | None = None) -> np.ndarray:
        """README §5.4: the system prompt and voice on a context's first turn; then the user turn with
        audio, the text-only user turn, or no user turn: the assistant's opening as the offline path
        has it (a layout of ours; the reference's sessions always have a user turn)."""
        from ..text.realtime_prompt import ASSISTANT_OPEN, orient_codes

        b = self.builder
        if turn.user_text is not None:
            self.check_typed(turn.user_text, "user_text")
        if turn.user_audio is not None:
            rows = b.user_turn(turn.user_text, b.check_codes(orient_codes(turn.user_audio), "user_audio"))
        elif turn.user_text is not None:
            rows = b.text_only_turn(turn.user_text)
        else:
            rows = b.rows(ASSISTANT_OPEN if first else "<|im_end|>\n" + ASSISTANT_OPEN)
        if first:
            voice = None if voice is None else b.check_codes(orient_codes(voice), "voice")
            rows = np.concatenate([b.system(voice), rows])
        return rows

    def prompt_from_rows(self, rows: np.ndarray, text_ids: list[int] | tuple = (), text_tokens: int | None = None) -> Prompt:
        """A prompt matrix as is (its last row starts the audio), then `text_ids` fed one per step."""
        rows = self.checked_rows(rows)
        ids = self._checked_text_ids(text_ids)
        info = {"text_ids": ids, "runaway_guard": True,
                "text_tokens": int(text_tokens if text_tokens is not None else len(ids))}
        return Prompt(rows=rows, info=info)

    @property
    def row_limits(self) -> tuple[int, int]:
        return self.config.language.vocab_size, self.config.audio_eos_code

    def check_prompt(self, prompt: Prompt) -> None:
        super().check_prompt(prompt)
        self._checked_text_ids(prompt.info.get("text_ids", ()))

    def _checked_text_ids(self, text_ids) -> np.ndarray:
        ids, vocab = np.asarray(text_ids, dtype=np.int64), self.config.language.vocab_size
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
            raise InvalidRequestError(f"text ids must lie in 0..{vocab - 1}")
        return ids

    def default_sampling(self) -> SamplingParams:
        return self._sampling_defaults

    # ---- decode state --------------------------------------------------------------------
    def new_state(self, max_slots: int, device: torch.device) -> RealtimeState:
        n, codes = self.codebooks, self.config.audio_vocab_size
        i64 = {"dtype": torch.int64, "device": device}
        return RealtimeState(
            text=torch.zeros(max_slots, 1, **i64),
            text_len=torch.zeros(max_slots, **i64),
            text_pos=torch.zeros(max_slots, **i64),
            frames=torch.zeros(max_slots, **i64),
            counts=torch.zeros(max_slots, n, codes, dtype=torch.int32, device=device),
            ring=torch.zeros(max_slots, 1, n, **i64),
            window=torch.zeros(max_slots, **i64),
            temperature=torch.ones(max_slots, n, dtype=torch.float32, device=device),
            top_k=torch.zeros(max_slots, n, **i64),
            top_p=torch.ones(max_slots, n, dtype=torch.float64, device=device),
            penalty=torch.ones(max_slots, n, dtype=torch.float32, device=device),
            generators=[None] * max_slots,
            ended=torch.ones(max_slots, dtype=torch.bool, device=device),
            waiting=torch.zeros(max_slots, dtype=torch.bool, device=device),
            last_frame=torch.zeros(max_slots, n, **i64),
            prefilled=torch.ones(max_slots, dtype=torch.bool, device=device),
            texts=[None] * max_slots,
            depth_calls=self._depth_calls(),
        )

    def admit(self, state: RealtimeState, slot: int, prompt: Prompt, sampling: SamplingParams) -> list[np.ndarray]:
        """A continuation's given frames (`info["history"]`) are its first clip and its repetition history."""
        self.continue_session(state, slot, prompt, sampling)
        state.generators[slot] = sampling.generator()
        history = prompt.info.get("history")
        if history is None:
            return []
        self._remember_all(state, slot, torch.as_tensor(history, device=state.text.device))
        return [history]

    # ---- sessions (README §5.6-5.7): later turns keep the cache and the random stream --------
    supports_sessions = True
    repetition_window = True

    def continue_session(self, state: RealtimeState, slot: int, prompt: Prompt,
                         sampling: SamplingParams) -> list[np.ndarray]:
        """A new turn in `slot`: its text and sampling settings; history and frame count start over,
        the generator goes on (the reference seeds once per session)."""
        from ..text.realtime_segment import TextSegmentStream

        sampling.validate()
        n, device = self.codebooks, state.text.device
        self.restart(state, slot, prompt.info.get("text_ids", ()))
        streaming = bool(prompt.info.get("open"))
        state.ended[slot] = state.prefilled[slot] = not streaming
        state.texts[slot] = TextSegmentStream(self.tokenizer.encode) if streaming else None
        window = int(sampling.audio_repetition_window)
        if window >= self.backbone_config.max_position_embeddings:  # longer than any turn: the whole history,
            window = 0  # without a ring of that many frames for every slot
        if window > state.ring.shape[1]:
            state.ring = _grow(state.ring, 1, window, 0)
        state.window[slot] = window
        for name, table in (("audio_temperature", state.temperature), ("audio_top_p", state.top_p),
                            ("audio_repetition_penalty", state.penalty)):
            table[slot] = torch.tensor(sampling.per_codebook(name, n), dtype=table.dtype, device=device)
        state.top_k[slot] = torch.tensor([int(k) for k in sampling.per_codebook("audio_top_k", n)], device=device)
        return []

    def save_session(self, state: RealtimeState, slot: int) -> torch.Generator | None:
        return state.generators[slot]

    def restore_session(self, state: RealtimeState, slot: int, saved: torch.Generator | None) -> None:
        state.generators[slot] = saved

    def restart(self, state: RealtimeState, slot: int, text_ids: list[int] | tuple = ()) -> None:
        """A new turn in the same slot (a streaming session): the repetition history and the frame count
        start over, the generator goes on, and `text_ids` become the ids still to feed."""
        ids = torch.as_tensor(np.asarray(text_ids, dtype=np.int64), device=state.text.device)
        if len(ids) > state.text.shape[1]:
            state.text = _grow(state.text, 1, len(ids), 0)
        state.text[slot, : len(ids)] = ids
        state.text_len[slot], state.text_pos[slot], state.frames[slot] = len(ids), 0, 0
        state.counts[slot] = 0
        state.waiting[slot] = False

    def release(self, state: RealtimeState, slot: int) -> None:
        state.generators[slot] = None
        state.texts[slot] = None

    # ---- streaming input (README §5.6): text pushed while the turn speaks ----------------------
    def push_input(self, state: RealtimeState, slot: int, piece: object, end: bool) -> InputUpdate:
        """A text delta (str) or token ids (list of int), cut and tokenised as the reference session
        does; the prefill rows go out at the first push that leaves 12 ids pending (or at the end),
        and a turn that was waiting for text gets its next row."""
        from ..text.realtime_prompt import DELAY_TOKENS, prefill_length

        if state.texts[slot] is None:
            raise InvalidRequestError("this request takes no more input")
        if isinstance(piece, str):  # checked by `check_input` on the pushing thread (Engine.push_input)
            ids = state.texts[slot].push(piece)
        elif piece is None:
            ids = []
        else:
            ids = [int(i) for i in piece]
        if end:
            ids += state.texts[slot].end()
            state.ended[slot] = True
        self._append_text(state, slot, ids)
        update = InputUpdate(text_tokens=len(ids))
        pending = int(state.text_len[slot] - state.text_pos[slot])
        ended = bool(state.ended[slot])
        if not state.prefilled[slot]:
            if pending >= DELAY_TOKENS or (ended and pending):
                count = prefill_length(pending, ended)
                update.prompt_rows = self.builder.prefill(state.text[slot, :count].tolist())
                update.seal = True
                state.text_pos[slot], state.prefilled[slot] = count, True
            elif ended:
                raise InvalidRequestError("the turn's text is empty: nothing to say")
        elif bool(state.waiting[slot]) and (pending or ended):
            pos = int(state.text_pos[slot])
            token = int(state.text[slot, pos]) if pending else self.config.text_pad_id
            state.text_pos[slot] = pos + (1 if pending else 0)
            state.waiting[slot] = False
            update.next_row = np.concatenate([[token], state.last_frame[slot].cpu().numpy()])
        return update

    def check_input(self, piece: object) -> None:
        """Text (str), token ids (integers in the text vocabulary), or None."""
        if piece is None or isinstance(piece, str):
            check_text(piece, "text")
            if piece:
                self.check_typed(piece, "text")  # split over pieces: Engine.push_input checks seams
            return
        vocab = self.config.language.vocab_size
        if (isinstance(piece, bytes) or not hasattr(piece, "__iter__")
                or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < vocab
                       for i in piece)):
            raise InvalidRequestError(f"text ids must be integers in 0..{vocab - 1}")
        special = sorted({self.tokenizer.special[int(i)] for i in piece if int(i) in self.tokenizer.special}
                         if self.tokenizer is not None else ())
        if special:
            raise InvalidRequestError(f"text ids may not be special tokens ({', '.join(special)})")

    def _append_text(self, state: RealtimeState, slot: int, ids: list[int]) -> None:
        length = int(state.text_len[slot])
        if length + len(ids) > state.text.shape[1]:
            state.text = _grow(state.text, 1, length + len(ids), 0)
        state.text[slot, length : length + len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
        state.text_len[slot] = length + len(ids)

    # ---- one decode step -----------------------------------------------------------------
    def step(self, state: RealtimeState, hidden: torch.Tensor, slots: torch.Tensor) -> StepOutput:
        cfg = self.config
        frames = self.depth_loop(state, hidden, slots)
        self._remember(state, slots, frames)
        pos, length = state.text_pos[slots], state.text_len[slots]
        has_text = pos < length
        text = state.text[slots, pos.clamp(max=state.text.shape[1] - 1)]
        text = torch.where(has_text, text, cfg.text_pad_id)
        first = state.frames[slots] == 0
        finished = frames[:, 0] == cfg.audio_eos_code
        waiting = ~has_text & ~state.ended[slots] & ~finished  # its next text has not been pushed yet
        state.text_pos[slots] = pos + has_text.long()
        state.frames[slots] += 1
        state.waiting[slots] = waiting
        state.last_frame[slots] = frames
        return StepOutput(rows=torch.cat([text[:, None], frames], dim=1), frames=frames, has_frame=~finished,
                          new_segment=~finished & first, finished=finished, waiting=waiting)

    def set_decode_mode(self, state: RealtimeState, mode: str, batch_sizes: list[int]) -> None:
        if mode != "eager":
            state.depth_calls = self._depth_calls(batch_sizes, graphs=mode == "graphs")

    def _depth_calls(self, batch_sizes: Sequence[int] = (), graphs: bool = False) -> FixedShapeCalls:
        """The local transformer's positions of a frame, at fixed sizes (static / graphs modes) or at
        each batch's own."""
        local = self.model.local
        weight = local.heads
        return FixedShapeCalls(lambda codebook, x, cache: local.step(x, codebook, cache),
                               lambda size: local.new_cache(size, weight.device, weight.dtype),
                               local.config.hidden_size, weight.dtype, weight.device, range(self.codebooks),
                               batch_sizes, graphs)

    def depth_loop(self, state: RealtimeState, hidden: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One frame per row: hidden (B, H) -> codes (B, 16), one batched local step per codebook."""
        local, batch = self.model.local, hidden.shape[0]
        local_step = state.depth_calls.frame(batch)
        penalty = torch.where((state.frames[slots] > 0)[:, None], state.penalty[slots], 1.0)
        seen = state.counts[slots] > 0
        temperature, top_k, top_p = state.temperature[slots], state.top_k[slots], state.top_p[slots]
        codes = torch.empty(batch, self.codebooks, dtype=torch.int64, device=hidden.device)
        drawing = temperature > 0
        draws = bool(drawing.any())
        x, noise = hidden, None
        for i in range(self.codebooks):
            logits = apply_repetition_penalty(local_step(i, x), seen[:, i], penalty[:, i])
            if i == 0 and draws:
                noise = self._noise(state, slots, drawing, logits.shape[-1], hidden.device)
            codes[:, i] = sample_codes(logits, temperature[:, i], top_k[:, i], top_p[:, i],
                                       None if noise is None else noise[:, i])
            if i + 1 < self.codebooks:
                x = local.embed_codes(i, codes[:, i])
        return codes

    def _noise(self, state: RealtimeState, slots: torch.Tensor, drawing: torch.Tensor, vocab: int,
               device: torch.device) -> torch.Tensor:
        """A frame's exponential noise (B, codebooks, vocab), each request's from its own generator."""
        return noise_by_request(drawing, [state.generators[slot] for slot in slots.tolist()], vocab, device)

    def _remember_all(self, state: RealtimeState, slot: int, frames: torch.Tensor) -> None:
        """The history after `frames` (F, 16) in one go: what F calls of `_remember` leave."""
        count, window = len(frames), int(state.window[slot])
        kept = frames if window == 0 else frames[-window:]
        counts = torch.zeros_like(state.counts[slot])
        counts.scatter_add_(1, kept.T.contiguous(), torch.ones_like(kept.T, dtype=counts.dtype))
        state.counts[slot] = counts
        if window:
            state.ring[slot, torch.arange(count - len(kept), count, device=frames.device) % window] = kept
        state.frames[slot] = count

    def _remember(self, state: RealtimeState, slots: torch.Tensor, frames: torch.Tensor) -> None:
        """Add this frame to each row's history; the frame `window` frames back leaves it."""
        k, window = state.frames[slots], state.window[slots]
        windowed = window > 0
        index = torch.where(windowed, k % window.clamp(min=1), 0)
        leaving = (windowed & (k >= window)).int()
        counts = state.counts[slots]
        old = state.ring[slots, index]
        counts.scatter_add_(2, old[:, :, None], -leaving[:, None, None].expand(-1, self.codebooks, 1).contiguous())
        counts.scatter_add_(2, frames[:, :, None], torch.ones_like(frames[:, :, None], dtype=torch.int32))
        state.counts[slots] = counts
        state.ring[slots, index] = frames


def _grow(table: torch.Tensor, dim: int, size: int, fill: int) -> torch.Tensor:
    """`table` widened along `dim` to at least `size` (doubling), old contents kept."""
    shape = list(table.shape)
    shape[dim] = max(size, 2 * shape[dim])
    out = torch.full(shape, fill, dtype=table.dtype, device=table.device)
    out.narrow(dim, 0, table.shape[dim]).copy_(table)
    return out


def is_realtime_config(config: dict) -> bool:
    """A MOSS-TTS-Realtime config.json (model_type or architectures)."""
    return config.get("model_type") == "moss_tts_realtime" or "MossTTSRealtime" in (config.get("architectures") or [])


def load_realtime(model_dir: Path, name: str, config: dict, device: torch.device, dtype: torch.dtype) -> TalkerFamily:
    """Config, weights (strict) and tokenizer of a Realtime checkpoint directory -> the family.
    `name` is what the caller asked for (a hub id or path); kept for the registry's signature."""
    from ..text.tokenizer import TextTokenizer
    from .moss_realtime import load_realtime_model

    realtime_config = MossRealtimeConfig.from_dict(config, str(Path(model_dir) / "config.json"))
    model = load_realtime_model(Path(model_dir), realtime_config, device, dtype)
    tokenizer = TextTokenizer.from_dir(model_dir)
    family = MossRealtimeFamily(model, tokenizer)
    family.source = Path(model_dir)
    return family

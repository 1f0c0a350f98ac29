"""The Delay family (MOSS-TTS, MOSS-TTSD, MOSS-VoiceGenerator, MOSS-SoundEffect) behind the seam.

Per slot it keeps the reference's decode state (audio length, delay counter, audio mode,
stopping, step), the repetition-penalty history as presence masks, the sampling settings as
tensors, and a window of the last n_vq rows that de-delays frames online: frame t is complete
once row t + n_vq - 1 is out. One `step` serves a batch of requests at different steps.

Randomness follows the reference: per step a request draws, in order, noise for its text row,
its codebook-0 row and its other codebooks (only for rows it samples). Each request has its own
generator, so a seeded request draws the reference's numbers whatever runs beside it (its codes
equal up to float rounding at near-ties: docs/engine.md, "Determinism");
`shared_generator` instead reproduces the reference's static batch, where one generator and one
repetition history serve the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidRequestError
from ..layers.cpu_select import argmax_rows
from ..layers.head_bound import head_rounding_bound
from ..layers.sampler import (
    as_noise,
    bits_match_noise,
    exponential_bits,
    exponential_draws,
    exponential_noise,
    noise_from_bits,
    sample,
)
from ..sampling import SamplingParams
from ..speech_request import SpeechRequest
from ..text.delay_prompt import AUDIO_PLACEHOLDER
from .delay_pattern import dedelay, segments
from .family import EncodeVoice, Prompt, StepOutput, TalkerFamily
from .moss_delay import MossDelayModel
from .moss_delay_config import MossDelayConfig

INACTIVE = -1
LITERAL_DELAY_SLOT_ID = 151662  # the reference masks this id at step 0 literally, not from the config


@dataclass
class DelayState:
    audio_len: torch.Tensor  # (S,) int64
    delayed: torch.Tensor  # (S,) int64, INACTIVE or 1..n_vq
    is_audio: torch.Tensor  # (S,) bool
    stopping: torch.Tensor  # (S,) bool
    steps: torch.Tensor  # (S,) int64, steps taken
    seen_first: torch.Tensor  # (S, A+1) bool, codebook-0 history
    seen_rest: torch.Tensor  # (S, A+1) bool, union history of codebooks 1..
    window: torch.Tensor  # (S, n_vq, n_vq) last n_vq audio rows, oldest first
    pushed: torch.Tensor  # (S,) int64 rows pushed into the window
    skip: torch.Tensor  # (S,) int64 generated rows still before the returned output (start_idx > T)
    after_gap: torch.Tensor  # (S,) bool: no frame yet, or the last complete frame was all pad
    text_temperature: torch.Tensor  # (S,)
    text_top_k: torch.Tensor
    text_top_p: torch.Tensor
    audio_temperature: torch.Tensor  # (S, n_vq)
    audio_top_k: torch.Tensor
    audio_top_p: torch.Tensor
    audio_penalty: torch.Tensor
    admitted: torch.Tensor  # (S,) bool
    replay: torch.Tensor  # (S,) bool: seeded, so its draws follow the reference's random stream exactly
    generators: list[torch.Generator | None]
    shared_generator: torch.Generator | None = None


def _selected(mask: torch.Tensor) -> torch.Tensor | None:
    """The rows of `mask` as an index, or None when it holds every row (the usual step: nothing to gather)."""
    return None if bool(mask.all()) else torch.nonzero(mask).flatten()


class MossDelayFamily(TalkerFamily):
    name = "delay"
    reserved_text = (AUDIO_PLACEHOLDER,)

    def __init__(self, model: MossDelayModel, tokenizer, default_task: str | None = None,
                 sampling_defaults: SamplingParams | None = None, max_new_frames: int = 4096) -> None:
        self.model = model
        self.config: MossDelayConfig = model.config
        self.backbone_config = self.config.language
        self.tokenizer = tokenizer
        self._builder = None
        self.default_task = default_task
        self.codebooks = self.config.n_vq
        self.columns = 1 + self.config.n_vq
        self.sample_rate = self.config.sampling_rate
        self._sampling_defaults = sampling_defaults or SamplingParams()
        self.max_new_frames = max_new_frames
        self._text_masks: dict[torch.device, torch.Tensor] = {}
        self._slot_id_tables: dict[torch.device, torch.Tensor] = {}
        # The text ids allowed in audio mode, ascending.
        self.slot_token_ids = tuple(sorted([self.config.audio_assistant_gen_slot_token_id,
                                            self.config.audio_assistant_delay_slot_token_id]))
        self._audio_allowed: dict[torch.device, torch.Tensor] = {}
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._openers: dict[torch.device, torch.Tensor] = {}

    # ---- prompts -------------------------------------------------------------------------
    def typed_form(self, text: str) -> str:
        from ..text.normalizer import normalize_tts_text

        return normalize_tts_text(text)

    def build_prompt(self, request: SpeechRequest, encode_voice: EncodeVoice | None = None) -> Prompt:
        from ..text.delay_prompt import check_joined_fields
        from ..text.delay_requests import delay_conversation, infer_task
        from ..text.pauses import pause_seconds

        self.check_typed_text(request)
        task = request.task or self.default_task or infer_task(request)
        conversation, mode = delay_conversation(
            request,
            n_vq=self.config.n_vq,
            audio_vocab_size=self.config.audio_vocab_size,
            task=task,
            encode_voice=encode_voice,
        )
        check_joined_fields(conversation, self.tokenizer)
        prompt = self.prompt_from_conversation(conversation, mode)
        prompt.info["text_tokens"] = len(self.tokenizer.encode(request.input or ""))
        prompt.info["duration_frames"] = request.expected_frames
        prompt.info["pauses"] = pause_seconds(self.typed_form(request.input or ""))  # as the model reads them
        return prompt

    def conversation_prompts(self, data: object, base_dir: Path | None, mode: str | None,
                             encode_voice: EncodeVoice | None = None) -> list[Prompt]:
        from ..text.conversation import message_prompts

        return message_prompts(self, data, base_dir, mode, encode_voice)

    def prompt_from_conversation(self, conversation: list, mode: str) -> Prompt:
        """A conversation as the reference processor takes it (text/delay_prompt.py)."""
        from ..text.delay_prompt import DelayPromptBuilder

        if self._builder is None:
            if self.tokenizer is None:
                raise InvalidRequestError("this model was loaded without a tokenizer; give a prompt matrix")
            self._builder = DelayPromptBuilder(self.tokenizer, self.config)
        prompt = self.prompt_from_rows(self._builder.build(conversation, mode))
        # The engine's runaway guard goes by the text and repeated frames; a sound effect has no text and
        # may repeat frames by nature, from a request or a conversation file alike.
        prompt.info["runaway_guard"] = not _asks_for_sound_effect(conversation)
        return prompt

    @property
    def row_limits(self) -> tuple[int, int]:
        return self.config.language.vocab_size, self.config.audio_pad_code

    def prompt_from_rows(self, rows: np.ndarray) -> Prompt:
        """A prompt matrix as is (e.g. `say --prompt-matrix`), checked against this model."""
        cfg = self.config
        rows = self.checked_rows(rows)
        starts = np.nonzero(rows[:, 0] == cfg.im_start_token_id)[0]
        start_idx = (int(starts[-1]) if len(starts) else -1) + 3
        return Prompt(rows=rows, start_length=len(rows) - start_idx, info={"start_idx": start_idx})

    def default_sampling(self) -> SamplingParams:
        return self._sampling_defaults

    # ---- decode state --------------------------------------------------------------------
    def new_state(self, max_slots: int, device: torch.device, shared_seed: int | None = None) -> DelayState:
        n, codes = self.config.n_vq, self.config.audio_vocab_size + 1
        i64 = {"dtype": torch.int64, "device": device}
        f32 = {"dtype": torch.float32, "device": device}
        return DelayState(
            audio_len=torch.zeros(max_slots, **i64),
            delayed=torch.full((max_slots,), INACTIVE, **i64),
            is_audio=torch.zeros(max_slots, dtype=torch.bool, device=device),
            stopping=torch.zeros(max_slots, dtype=torch.bool, device=device),
            steps=torch.zeros(max_slots, **i64),
            seen_first=torch.zeros(max_slots, codes, dtype=torch.bool, device=device),
            seen_rest=torch.zeros(max_slots, codes, dtype=torch.bool, device=device),
            window=torch.full((max_slots, n, n), self.config.audio_pad_code, **i64),
            pushed=torch.zeros(max_slots, **i64),
            skip=torch.zeros(max_slots, **i64),
            after_gap=torch.ones(max_slots, dtype=torch.bool, device=device),
            text_temperature=torch.ones(max_slots, **f32),
            text_top_k=torch.zeros(max_slots, **i64),
            text_top_p=torch.ones(max_slots, **f32),
            audio_temperature=torch.ones(max_slots, n, **f32),
            audio_top_k=torch.zeros(max_slots, n, **i64),
            audio_top_p=torch.ones(max_slots, n, **f32),
            audio_penalty=torch.ones(max_slots, n, **f32),
            admitted=torch.zeros(max_slots, dtype=torch.bool, device=device),
            replay=torch.zeros(max_slots, dtype=torch.bool, device=device),
            generators=[None] * max_slots,
            shared_generator=None if shared_seed is None else torch.Generator().manual_seed(shared_seed),
        )

    def admit(self, state: DelayState, slot: int, prompt: Prompt, sampling: SamplingParams) -> list[np.ndarray]:
        cfg, n = self.config, self.config.n_vq
        sampling.validate()
        rows = prompt.rows
        text = rows[:, 0]
        audio_starts = np.nonzero(text == cfg.audio_start_token_id)[0]
        continuing = text[-1] in (cfg.audio_start_token_id, cfg.audio_assistant_gen_slot_token_id)
        in_audio = bool(continuing and len(audio_starts))
        device = state.audio_len.device
        state.audio_len[slot] = len(rows) - int(audio_starts[-1]) if in_audio else 0
        state.delayed[slot] = INACTIVE
        state.is_audio[slot] = in_audio
        state.stopping[slot] = False
        state.steps[slot] = 0
        state.seen_first[slot] = False
        state.seen_first[slot, torch.from_numpy(np.unique(rows[:, 1])).to(device)] = True
        state.seen_rest[slot] = False
        state.seen_rest[slot, torch.from_numpy(np.unique(rows[:, 2:])).to(device)] = True
        tail = rows[prompt.info["start_idx"] :, 1:]
        state.skip[slot] = max(0, prompt.info["start_idx"] - len(rows))
        window = np.full((n, n), cfg.audio_pad_code, dtype=np.int64)
        kept = tail[-n:]
        window[n - len(kept) :] = kept
        state.window[slot] = torch.from_numpy(window).to(device)
        state.pushed[slot] = len(tail)
        complete = dedelay(tail)
        state.after_gap[slot] = len(complete) == 0 or bool((complete[-1] == cfg.audio_pad_code).all())
        state.text_temperature[slot] = float(sampling.text_temperature)
        state.text_top_k[slot] = int(sampling.text_top_k or 0)
        state.text_top_p[slot] = float(sampling.text_top_p if sampling.text_top_p is not None else 1.0)
        for name, table in (("audio_temperature", state.audio_temperature), ("audio_top_p", state.audio_top_p),
                            ("audio_repetition_penalty", state.audio_penalty)):
            table[slot] = torch.tensor(sampling.per_codebook(name, n), device=device)
        state.audio_top_k[slot] = torch.tensor([int(k) for k in sampling.per_codebook("audio_top_k", n)], device=device)
        state.admitted[slot] = True
        state.generators[slot] = sampling.generator()
        state.replay[slot] = sampling.seed is not None or state.shared_generator is not None
        return segments(complete, cfg.audio_pad_code)

    def release(self, state: DelayState, slot: int) -> None:
        state.admitted[slot] = False
        state.generators[slot] = None

    # ---- one decode step -----------------------------------------------------------------
    def step(self, state: DelayState, hidden: torch.Tensor, slots: torch.Tensor) -> StepOutput:
        cfg, n = self.config, self.config.n_vq
        batch, device = hidden.shape[0], hidden.device
        audio_len, delayed = state.audio_len[slots], state.delayed[slots]
        is_audio, stopping, steps = state.is_audio[slots], state.stopping[slots], state.steps[slots]
        inactive = delayed == INACTIVE

        forced_text, next_delay = self._step_tables(device)
        audio_eos = ~stopping & (delayed == n)
        is_audio = is_audio & ~audio_eos
        rows = _selected(~stopping & inactive)  # the rows that choose their text token
        if rows is None:
            text = self._sample_text(state, hidden, slots, is_audio, steps)
        else:
            text = torch.where(stopping, cfg.pad_token_id, forced_text[delayed + 1])
            if len(rows):
                text[rows] = self._sample_text(state, hidden[rows], slots[rows], is_audio[rows], steps[rows])
        is_audio = is_audio | (text == cfg.audio_start_token_id)
        stopping = stopping | (text == cfg.im_end_token_id)

        # Codebook c is sampled once c codebooks are open and the delay tail has passed it (INACTIVE is
        # -1: every codebook has).
        codebook = torch.arange(n, device=device)
        sampled = (audio_len[:, None] > codebook) & (codebook >= delayed[:, None])
        rows = _selected(sampled.any(dim=1))
        if rows is None:
            codes = torch.where(sampled, self._sample_audio(state, hidden, slots, sampled), cfg.audio_pad_code)
        else:
            codes = torch.full((batch, n), cfg.audio_pad_code, dtype=torch.int64, device=device)
            if len(rows):
                drawn = self._sample_audio(state, hidden[rows], slots[rows], sampled[rows])
                codes[rows] = torch.where(sampled[rows], drawn, cfg.audio_pad_code)

        opens_slot = torch.isin(text, self._slot_openers(device))
        audio_len = torch.where(text == cfg.audio_end_token_id, 0, audio_len + opens_slot)
        delayed = next_delay[torch.where(inactive & (text == cfg.audio_assistant_delay_slot_token_id), 0, delayed) + 1]

        state.audio_len[slots], state.delayed[slots] = audio_len, delayed
        state.is_audio[slots], state.stopping[slots], state.steps[slots] = is_audio, stopping, steps + 1
        state.seen_first[slots, codes[:, 0]] = True
        state.seen_rest[slots[:, None], codes[:, 1:]] = True
        skip = state.skip[slots]
        pushing = skip == 0
        window = state.window[slots]
        window = torch.where(pushing[:, None, None], torch.cat([window[:, 1:], codes[:, None, :]], dim=1), window)
        pushed = state.pushed[slots] + pushing
        state.window[slots], state.skip[slots], state.pushed[slots] = window, (skip - 1).clamp(min=0), pushed
        frames = window.diagonal(dim1=1, dim2=2)
        complete = pushing & (pushed >= n)
        all_pad = (frames == cfg.audio_pad_code).all(dim=1)
        has_frame = complete & ~all_pad
        after_gap = state.after_gap[slots]
        state.after_gap[slots] = torch.where(complete, all_pad, after_gap)
        return StepOutput(rows=torch.cat([text[:, None], codes], dim=1), frames=frames, has_frame=has_frame,
                          new_segment=has_frame & after_gap, finished=stopping)

    def _step_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Lookups by delay counter + 1 (INACTIVE, 0 when a delay slot starts it, 1..n_vq): the forced
        text token (a delay slot while the delay runs, the audio end at n_vq; INACTIVE rows choose
        theirs) and the counter's next value (it ends past n_vq)."""
        if device not in self._tables:
            cfg, n = self.config, self.config.n_vq
            forced = [cfg.pad_token_id] + [cfg.audio_assistant_delay_slot_token_id] * n + [cfg.audio_end_token_id]
            following = [INACTIVE] + list(range(1, n + 1)) + [INACTIVE]
            self._tables[device] = (torch.tensor(forced, device=device), torch.tensor(following, device=device))
        return self._tables[device]

    def _slot_openers(self, device: torch.device) -> torch.Tensor:
        """Text tokens that open an audio slot (each adds one to the audio length)."""
        if device not in self._openers:
            cfg = self.config
            ids = [cfg.audio_start_token_id, cfg.audio_assistant_gen_slot_token_id,
                   cfg.audio_assistant_delay_slot_token_id]
            self._openers[device] = torch.tensor(ids, device=device)
        return self._openers[device]

    def _sample_text(self, state: DelayState, hidden: torch.Tensor, slots: torch.Tensor,
                     is_audio: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Text tokens for rows in text mode (the whole head) and in audio mode (two columns).

        In audio mode only the two slot tokens can win, so those rows compute two columns of the
        text head instead of 151,936 and sample over those two: every other id is at -inf, so
        temperature, top-k, top-p, softmax and the draw reduce to the same operations on the two
        (docs/performance.md). The two-column logits may differ from the full head's in the last
        bits (another matmul shape), so a greedy or seeded row whose choice lies within the
        rounding bound of the head (a near-tie), or that meets a tie-break the full vector would
        settle (top-k 1 or top-p on equal values), a non-finite logit or a zero noise draw, takes
        the full head instead: its token is the full computation's, whatever the shape.

        Every row takes the two columns (a batch all in audio mode, the usual one, then needs no
        selection); text-mode rows then take the whole head, as one batch."""
        device = hidden.device
        temperature, top_k, top_p = state.text_temperature[slots], state.text_top_k[slots], state.text_top_p[slots]
        drawing = temperature > 0
        replay = drawing & state.replay[slots]
        ids = self._slot_ids(device)
        window, zero_draw, full_noise, kept_bits = self._text_noise(state, slots, drawing, replay, is_audio, ids)

        logits, bound = self._narrow_text_logits(hidden, ids, steps)
        exact = self._narrow_is_exact(logits, bound, temperature, top_k, top_p, window)
        decided = is_audio & (exact | (drawing & ~replay))  # greedy and seeded rows must match the full head
        if zero_draw is not None:
            decided &= ~zero_draw
        tokens = ids[sample(logits, temperature, top_k, top_p, noise=window)]
        if bool(decided.all()):
            return tokens

        # The whole head for text-mode rows, as one batch.
        rows = torch.nonzero(~is_audio).flatten()
        if len(rows):
            tokens[rows] = self._full_text(hidden[rows], self._text_mask(device), rows, steps, temperature, top_k,
                                           top_p, drawing, full_noise, kept_bits)
        # Audio-mode rows that two columns could not decide (near-ties, ties, zero draws: rare), one at
        # a time, so that their answer is the one of the row alone whatever else is in the batch.
        for row in torch.nonzero(is_audio & ~decided).flatten().tolist():
            one = torch.tensor([row], device=device)
            tokens[one] = self._full_text(hidden[one], ~self._audio_text_allowed(device), one, steps, temperature,
                                          top_k, top_p, drawing, full_noise, kept_bits)
        return tokens

    def _text_noise(self, state: DelayState, slots: torch.Tensor, drawing: torch.Tensor, replay: torch.Tensor,
                    is_audio: torch.Tensor, ids: torch.Tensor):
        """The text draws of one step: the two columns' noise of every row (R, 2; ones where unused),
        which audio-mode rows drew a zero, and the whole-vocabulary noise of rows that need it (by
        row; a seeded audio-mode row keeps the raw bits instead). None, None, {}, {} when every row
        is greedy.

        Seeded rows draw first, in batch order (the shared generator's order), then the others. A
        seeded request takes its noise over the whole vocabulary from its generator, as the
        reference's multinomial does, so its random stream stays the reference's; in audio mode it
        takes the raw bits (a third of the cost of the noise) and turns only the two columns into
        noise. An unseeded one draws noise only for the two columns, which is the same distribution."""
        full_noise: dict[int, torch.Tensor] = {}
        kept_bits: dict[int, torch.Tensor] = {}
        if not bool(drawing.any()):
            return None, None, full_noise, kept_bits
        vocab, device = self.config.language.vocab_size, ids.device
        window = torch.ones(len(slots), len(ids), device=device)
        zero_draw = torch.zeros(len(slots), dtype=torch.bool, device=device)
        fast_bits = bits_match_noise(vocab)
        cpu_ids = ids.cpu()
        slot_list, audio_list = slots.tolist(), is_audio.tolist()
        for row in torch.nonzero(replay).flatten().tolist():
            generator = state.shared_generator if state.shared_generator is not None else state.generators[slot_list[row]]
            if audio_list[row] and fast_bits:
                bits = exponential_bits(1, vocab, generator)
                # A zero noise makes a NaN that the full vector would pick. (numpy: one thread; a torch
                # reduction over 151,936 values costs far more on a busy CPU.)
                if int(bits.numpy().min()) == 0:
                    full_noise[row] = noise_from_bits(bits, device)[0]
                    zero_draw[row] = True
                else:
                    kept_bits[row] = bits
                    window[row] = noise_from_bits(bits[0, cpu_ids], device)
            else:
                full_noise[row] = exponential_noise(1, vocab, generator, device)[0]
                if audio_list[row]:
                    window[row] = full_noise[row][ids]
                    zero_draw[row] = bool((full_noise[row] == 0).any())
        loose = drawing & ~replay
        for rows, width in ((torch.nonzero(loose & is_audio).flatten(), len(ids)),
                            (torch.nonzero(loose & ~is_audio).flatten(), vocab)):
            if len(rows):
                drawn = as_noise(self._noise(state, slots[rows], torch.ones_like(rows), width, device), device)
                if width == vocab:
                    full_noise.update(zip(rows.tolist(), drawn))
                else:
                    window[rows] = drawn
        return window, zero_draw, full_noise, kept_bits

    def _full_text(self, hidden: torch.Tensor, banned: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor,
                   temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, drawing: torch.Tensor,
                   full_noise: dict[int, torch.Tensor], kept_bits: dict[int, torch.Tensor]) -> torch.Tensor:
        """Text tokens of `rows` from the whole head, the reference's masks and whole-vocabulary noise."""
        cfg = self.config
        vocab, device = cfg.language.vocab_size, hidden.device
        every = torch.arange(vocab, device=device)
        logits = self.model.text_logits(hidden)
        step0 = (steps[rows] == 0)[:, None] & (every == LITERAL_DELAY_SLOT_ID)
        early = (steps[rows] <= cfg.n_vq)[:, None] & (every == cfg.im_end_token_id)
        logits = logits.masked_fill(banned | step0 | early, float("-inf"))
        noise = None
        if bool(drawing[rows].any()):
            noise = torch.ones(len(rows), vocab, device=device)
            for i, row in enumerate(rows.tolist()):
                if row in full_noise:
                    noise[i] = full_noise[row]
                elif row in kept_bits:  # a seeded audio-mode row that needs the whole vector after all
                    noise[i] = noise_from_bits(kept_bits[row], device)[0]
        return sample(logits, temperature[rows], top_k[rows], top_p[rows], noise=noise)

    def _narrow_text_logits(self, hidden: torch.Tensor, ids: torch.Tensor,
                            steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio-mode text logits at `ids` (masked as the full vector is), and a bound on how far
        any other matmul of the same head (the full one) may put each of them (layers/head_bound.py)."""
        cfg = self.config
        weight = self.model.text_head.weight[ids]
        logits = self.model.text_logits(hidden, ids)
        bound = head_rounding_bound(weight.abs().float(), hidden, logits, weight)
        # The full vector's bans that can fall on a slot token: the delay slot at step 0, the end of
        # the turn in the first n_vq + 1 steps.
        for column, token in enumerate(self.slot_token_ids):
            if token == LITERAL_DELAY_SLOT_ID:
                logits[:, column].masked_fill_(steps == 0, float("-inf"))
            if token == cfg.im_end_token_id:
                logits[:, column].masked_fill_(steps <= cfg.n_vq, float("-inf"))
        return logits, bound

    @staticmethod
    def _narrow_is_exact(logits: torch.Tensor, bound: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                         top_p: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Rows (R, 2) whose draw over the two columns is the full vector's whatever the last bits of
        the logits: every decision (argmax; top-k 1; the top-p cut; probs / noise) clears the
        logits' rounding bound by a margin (4x the bound, plus 1e-5 for softmax and division).
        `noise` None: every row is greedy, and only the argmax needs to clear."""
        finite = torch.isfinite(logits)
        # One slot token at -inf (the delay slot at step 0), the other finite: that one wins.
        single = (finite[:, 0] ^ finite[:, 1]) & (logits == float("-inf")).any(1)
        a, b = logits.double().unbind(1)
        if noise is None:
            # A pair with a non-finite logit makes d NaN or infinite, and so never clears.
            d = (a - b).abs()
            return single | (d > 4 * bound.double().sum(1) + 1e-5 * (1 + d))
        both = finite.all(1)
        greedy = temperature <= 0
        t = torch.where(greedy, torch.ones_like(temperature), temperature).double()
        d = torch.where(both, (a - b) / t, torch.zeros_like(a))
        tolerance = 4 * bound.double().sum(1) / t + 1e-5 * (1 + d.abs())
        clear = d.abs() > tolerance
        p_big = torch.sigmoid(d.abs())
        cut = (top_p < 1) & (p_big > top_p)
        top_p_clear = (top_p >= 1) | ((p_big - top_p).abs() > tolerance + 1e-6)
        both_kept = (top_k != 1) & ~cut
        log_ratio = noise[:, 0].double().log() - noise[:, 1].double().log()
        draw_clear = ~both_kept | ((d - log_ratio).abs() > tolerance)
        sampled = ((top_k != 1) | clear) & top_p_clear & draw_clear
        return single | (both & torch.where(greedy, clear, sampled))

    def _slot_ids(self, device: torch.device) -> torch.Tensor:
        """The text ids allowed in audio mode, ascending (argmax ties break as over the whole vocabulary)."""
        if device not in self._slot_id_tables:
            self._slot_id_tables[device] = torch.tensor(self.slot_token_ids, device=device)
        return self._slot_id_tables[device]

    def _sample_audio(self, state: DelayState, hidden: torch.Tensor, slots: torch.Tensor,
                      sampled: torch.Tensor) -> torch.Tensor:
        """Sample every (row, codebook) flagged in `sampled` (R, n); returns (R, n) codes."""
        n, codes = self.config.n_vq, self.config.audio_vocab_size + 1
        logits = self.model.audio_logits(hidden).reshape(-1, codes)
        penalty, seen = state.audio_penalty[slots], None
        penalized = bool((penalty != 1.0).any())  # the history matters only where a penalty is set
        temperature = state.audio_temperature[slots] * sampled  # codebooks not sampled: greedy (pads follow)
        drawing = temperature > 0
        draws = bool(drawing.any())
        if not penalized and not draws:  # greedy: the argmax is all there is to do
            return argmax_rows(logits).view(len(slots), n)
        if penalized:
            seen_first, seen_rest = state.seen_first, state.seen_rest
            if state.shared_generator is not None:
                seen_first = seen_first[state.admitted].any(0, keepdim=True).expand_as(seen_first)
                seen_rest = seen_rest[state.admitted].any(0, keepdim=True).expand_as(seen_rest)
            seen = torch.cat([seen_first[slots][:, None], seen_rest[slots][:, None].expand(-1, n - 1, -1)], dim=1)
            seen = seen.reshape(-1, codes)
        noise = None
        if draws:
            if state.shared_generator is None:
                # Per-request generators: a request's codebook-0 row and its other rows are consecutive
                # draws from its own stream, so one call per request draws both, in codebook order.
                drawn = self._noise(state, slots, drawing.sum(1), codes, logits.device)
                if bool(drawing.all()):
                    noise = drawn
                else:  # rows that do not draw get ones (bits or noise: neither is 0, race's fallback)
                    noise = torch.ones(len(slots), n, codes, dtype=drawn.dtype, device=logits.device)
                    noise[drawing] = drawn
            else:  # the shared stream: every codebook-0 row first, then the rest
                first = self._noise(state, slots, drawing[:, 0].long(), codes, logits.device)
                rest = self._noise(state, slots, drawing[:, 1:].sum(1), codes, logits.device)
                made = first if first is not None else rest
                noise = torch.ones(len(slots), n, codes, dtype=made.dtype, device=logits.device)
                if first is not None:
                    noise[:, 0][drawing[:, 0]] = first
                if rest is not None:
                    noise[:, 1:][drawing[:, 1:]] = rest
            noise = noise.reshape(-1, codes)
        tokens = sample(
            logits,
            temperature.flatten(),
            state.audio_top_k[slots].flatten(),
            state.audio_top_p[slots].flatten(),
            penalty=penalty.flatten(),
            seen=seen,
            noise=noise,
        )
        return tokens.view(len(slots), n)

    def _noise(self, state: DelayState, slots: torch.Tensor, counts: torch.Tensor, vocab: int,
               device: torch.device) -> torch.Tensor | None:
        """Exponential noise for `counts[i]` rows of request i, in batch order, as its random bits where
        they make it (layers/sampler.py, `exponential_draws`): one call per request from its own
        generator, or one call for all from the shared generator."""
        total = int(counts.sum())
        if total == 0:
            return None
        if state.shared_generator is not None:
            return exponential_draws(total, vocab, state.shared_generator, device)
        parts = [
            exponential_draws(count, vocab, state.generators[slot], device)
            for slot, count in zip(slots.tolist(), counts.tolist())
            if count
        ]
        return torch.cat(parts)

    def _audio_text_allowed(self, device: torch.device) -> torch.Tensor:
        """Text ids allowed in audio mode (the two slot tokens), as a vocabulary mask."""
        if device not in self._audio_allowed:
            allowed = torch.zeros(self.config.language.vocab_size, dtype=torch.bool, device=device)
            allowed[self._slot_ids(device)] = True
            self._audio_allowed[device] = allowed
        return self._audio_allowed[device]

    def _text_mask(self, device: torch.device) -> torch.Tensor:
        """Text ids banned in text mode."""
        if device not in self._text_masks:
            cfg = self.config
            mask = torch.zeros(cfg.language.vocab_size, dtype=torch.bool, device=device)
            mask[[cfg.pad_token_id, cfg.audio_assistant_gen_slot_token_id, cfg.audio_assistant_delay_slot_token_id,
                  cfg.audio_end_token_id]] = True
            self._text_masks[device] = mask
        return self._text_masks[device]


def _asks_for_sound_effect(conversation: list) -> bool:
    """Whether the turn to answer describes a sound (`ambient_sound`) rather than text to speak; a
    message is a UserMessage or its dict form, as the prompt builder takes both."""
    def field(message, name: str):
        return message.get(name) if isinstance(message, dict) else getattr(message, name, None)

    last = next((m for m in reversed(conversation) if field(m, "role") == "user"), None)
    return last is not None and field(last, "ambient_sound") is not None and field(last, "text") is None

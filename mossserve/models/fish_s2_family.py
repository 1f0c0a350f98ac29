"""The Fish S2 Pro family behind the talker seam.

Per engine step, for every running row at once: slow logits + the semantic mask (only the rows the
mask allows, each choice certified or redone over the whole head: `slow_tokens`) -> the slow token
(normal sample, and the repetition-aware re-sample, README section 7.2) -> the fast AR over the
frame's N positions, one fast step for the whole batch per codebook. A row's next input is the
column [token, c_0 .. c_{N-1}].

Randomness follows the reference's draw order (section 7.3): per generated column, U[0,1) over
the vocabulary for the normal sample, again for the high sample, then over C for each codebook
1..N-1. Each request draws from its own generator, so a seeded request replays the reference's
`torch.manual_seed` run alone or in any batch (up to float rounding at near-ties: docs/engine.md,
"Determinism"). Greedy rows (top_k = 1) draw nothing.

Multi-batch texts (speaker turns grouped by chunk_length, section 3.4) run as one request: when a
batch ends with <|im_end|> and another follows, the step hands the engine that batch's prompt tail
(`StepOutput.prompt_rows`) to prefill after the frames already in the cache, which is exactly the
reference's next prompt (the earlier codes as a VQ part) in one growing conversation.

Decisions where the reference has bugs (docs/fish.md): a generation cut by the frame cap keeps its
last frame (the reference drops it); one frame (`max_new_tokens=1`) works; the token of a batch's
first step is not tested for <|im_end|> (as the reference: it is fed back and decoding goes on).
That column is the one whose cached form differs from the next batch's prompt: fed back, it is the
plain <|im_end|>; in the VQ part it is `<|semantic:c_0|>` with its codes. A batch that began so
keeps its fed-back columns, and its tail rewrites them (`StepOutput.rewound`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidRequestError
from ..layers.head_bound import head_cannot_overflow, head_rounding_bound
from ..layers.heads import project_float32
from ..loader import build_on_meta, load_weights, weight_files
from ..sampling import SamplingParams
from ..speech_request import SpeechRequest
from ..text.fish_turns import SPEAKER_TAG
from .config_utils import read_json
from .family import EncodeVoice, Prompt, StepOutput, TalkerFamily
from .fish_s2 import FishS2Model
from .fish_s2_config import FishS2Config
from .fish_s2_sampling import (
    HIGH_TEMPERATURE,
    HIGH_TOP_P,
    RAS_WINDOW,
    certified_argmax,
    certified_draw,
    choose,
    repeated,
)

SAMPLE_RATE = 44100  # the modded DAC's rate when codec_config.json does not say
FRAME_SAMPLES = 2048  # samples per code frame (hop 512 x 4): 21.5 frames per second at 44.1 kHz
# The reference HTTP server's sampling defaults (README section 7.4). Its frame cap (1024 per text
# batch) is not copied: here one cap covers all batches of a request, so the default is 4096 frames
# (~190 s), with the engine's runaway guard bounding a generation by its text.
FISH_SAMPLING = SamplingParams(audio_temperature=0.8, audio_top_p=0.8, audio_top_k=30)
# The narrow slow head decides only where its choice clears this multiple of the rounding bound
# (the bound already covers both matmuls; the factor covers its higher-order terms and leaves room).
BOUND_SAFETY = 2.0


@dataclass
class FishState:
    temperature: torch.Tensor  # (S,) float32
    top_p: torch.Tensor  # (S,) float32
    top_k: torch.Tensor  # (S,) int64: 1 = greedy
    first: torch.Tensor  # (S,) bool: the next step is a batch's prefill step (no repetition check)
    window: torch.Tensor  # (S, RAS_WINDOW) int64: slow tokens of the last decode steps (0 = empty)
    window_pos: torch.Tensor  # (S,) int64: where the next decode token goes (a ring)
    generators: list[torch.Generator | None]
    pending: list[list[np.ndarray]]  # per slot: later batches' prompt tails
    # per slot: the columns this batch fed back, its first as the VQ part holds it; kept only for a
    # batch whose first token was <|im_end|> (None otherwise)
    replay: list[list[np.ndarray] | None]


@dataclass
class NarrowHead:
    """The slow head's rows that the semantic mask leaves finite, kept once per weight."""
    source: torch.Tensor  # the whole head (V, D) these rows were taken from
    ids: torch.Tensor  # (A,) ascending: the semantic ids and <|im_end|>
    weight: torch.Tensor  # (A, D) float32, whatever the head's dtype
    weight_abs: torch.Tensor  # (A, D) float32: |W|, for the rounding bound
    max_row_norm: float  # of the whole head: no logit of the whole head can overflow below it


class FishS2Family(TalkerFamily):
    name = "fish"
    voice_needs_transcript = True
    normalizes_reference_loudness = False  # the reference encodes the audio as it is

    def __init__(self, model: FishS2Model, tokenizer=None, sampling_defaults: SamplingParams | None = None,
                 max_new_frames: int = 4096, sample_rate: int = SAMPLE_RATE) -> None:
        self.model = model
        self.config: FishS2Config = model.config
        self.backbone_config = self.config.slow
        self.tokenizer = tokenizer
        self.codebooks = self.config.num_codebooks
        self.columns = self.config.columns
        self.sample_rate = sample_rate
        self.frame_rate = sample_rate / FRAME_SAMPLES
        self.max_new_frames = max_new_frames
        self._sampling_defaults = sampling_defaults or FISH_SAMPLING
        self._builder = None
        c = self.config
        weight = model.fast_output.weight
        mask = torch.full((c.slow.vocab_size,), float("-inf"), device=weight.device)
        mask[c.semantic_start : c.semantic_end + 1] = 0.0
        mask[c.eos_token_id] = 0.0
        self.mask = mask  # section 6: only semantic tokens and <|im_end|> may be sampled
        self._narrow: NarrowHead | None = None

    # ---- prompts -------------------------------------------------------------------------
    def build_prompt(self, request: SpeechRequest, encode_voice: EncodeVoice | None = None) -> Prompt:
        self.check_typed_text(request)  # each field by its own name, before the builder joins the transcripts
        return self._plan_prompt(self.builder().plan(request, encode_voice))

    def conversation_prompts(self, data: object, base_dir: Path | None, mode: str | None,
                             encode_voice: EncodeVoice | None = None) -> list[Prompt]:
        """`--conversation`: the batches of the reference's growing conversation given up to the text
        to speak (text/fish_conversation.py); generation only."""
        from ..text.fish_conversation import parse_fish_conversation

        if mode == "continuation":
            raise InvalidRequestError("Fish S2 Pro speaks a conversation's last user message; it does not continue "
                                      "an assistant's speech (mode continuation)")
        conversation = parse_fish_conversation(data, base_dir, encode_voice)
        for index, (text, _) in enumerate(conversation.references):
            self.check_typed(text, f"references[{index}].text")
        for index, text in enumerate([text for text, _ in conversation.earlier] + [conversation.text]):
            self.check_typed(text, f"conversations[{2 * index}].text")
        return [self._plan_prompt(*self.builder().plan_conversation(conversation))]

    def _plan_prompt(self, plan, earlier_codes: list[np.ndarray] = ()) -> Prompt:
        """The prompt of the plan's first batch to generate, with the later batches' tails."""
        builder, first = self.builder(), plan.given
        rows = builder.prompt(plan, first, earlier_codes)
        tails = [builder.next_batch_rows(plan, b) for b in range(first + 1, plan.num_batches)]
        prompt = self.prompt_from_rows(rows, tails)
        # what the runaway guard bounds the audio by: the words, not the speaker tags (7 tokens each)
        prompt.info["text_tokens"] = sum(len(self.tokenizer.encode(SPEAKER_TAG.sub("", text)))
                                         for text in plan.batches[first:])
        return prompt

    def check_transcript(self, text: str, name: str) -> None:
        super().check_transcript(text, name)
        if not SPEAKER_TAG.sub("", text).strip():  # what the prompt builder refuses at every use of the voice
            raise InvalidRequestError(f"{name} is speaker tags alone: voice cloning needs what the voice says")

    def builder(self):
        from ..text.fish_prompt import FishPromptBuilder

        if self._builder is None:
            if self.tokenizer is None:
                raise InvalidRequestError("this model was loaded without a tokenizer; give a prompt matrix")
            c = self.config
            self._builder = FishPromptBuilder(self.tokenizer, c.num_codebooks, c.codebook_size,
                                              c.slow.max_position_embeddings)
        return self._builder

    def prompt_from_rows(self, rows: np.ndarray, tails: list[np.ndarray] = ()) -> Prompt:
        """Batch 0's prompt matrix (T, 1 + N) and the prompt tails of later batches, checked."""
        tails = [self.checked_rows(t) for t in tails]
        return Prompt(rows=self.checked_rows(rows), info={"continuations": tails}, later_rows=sum(len(t) for t in tails))

    @property
    def row_limits(self) -> tuple[int, int]:
        return self.config.slow.vocab_size, self.config.codebook_size - 1

    def check_prompt(self, prompt: Prompt) -> None:
        super().check_prompt(prompt)
        for tail in prompt.info.get("continuations", ()):
            self.checked_rows(tail)

    def default_sampling(self) -> SamplingParams:
        return self._sampling_defaults

    # ---- decode state --------------------------------------------------------------------
    def new_state(self, max_slots: int, device: torch.device) -> FishState:
        return FishState(
            temperature=torch.ones(max_slots, dtype=torch.float32, device=device),
            top_p=torch.ones(max_slots, dtype=torch.float32, device=device),
            top_k=torch.ones(max_slots, dtype=torch.int64, device=device),
            first=torch.ones(max_slots, dtype=torch.bool, device=device),
            window=torch.zeros(max_slots, RAS_WINDOW, dtype=torch.int64, device=device),
            window_pos=torch.zeros(max_slots, dtype=torch.int64, device=device),
            generators=[None] * max_slots,
            pending=[[] for _ in range(max_slots)],
            replay=[None] * max_slots,
        )

    def check_sampling(self, sampling: SamplingParams) -> None:
        super().check_sampling(sampling)
        fish_settings(sampling)
        if sampling.audio_repetition_penalty != 1.0:  # refused rather than ignored
            raise InvalidRequestError(f"audio_repetition_penalty {sampling.audio_repetition_penalty!r}: Fish S2 Pro "
                                      "applies no repetition penalty (the reference's S2 sampling has none); give 1")

    def admit(self, state: FishState, slot: int, prompt: Prompt, sampling: SamplingParams) -> list[np.ndarray]:
        sampling.validate()
        temperature, top_p, top_k = fish_settings(sampling)
        state.temperature[slot], state.top_p[slot], state.top_k[slot] = temperature, top_p, top_k
        state.generators[slot] = None if top_k == 1 else sampling.generator()
        state.pending[slot] = list(prompt.info.get("continuations", []))
        self._start_batch(state, slot)
        return []

    def _start_batch(self, state: FishState, slot: int) -> None:
        state.first[slot] = True
        state.window[slot] = 0
        state.window_pos[slot] = 0
        state.replay[slot] = None

    def release(self, state: FishState, slot: int) -> None:
        state.generators[slot] = None
        state.pending[slot] = []
        state.replay[slot] = None

    # ---- one decode step -----------------------------------------------------------------
    def step(self, state: FishState, hidden: torch.Tensor, slots: torch.Tensor) -> StepOutput:
        c = self.config
        temperature, top_p, top_k = state.temperature[slots], state.top_p[slots], state.top_k[slots]
        first = state.first[slots]
        vocab, size = c.slow.vocab_size, c.codebook_size
        uniform = self._uniform(state, slots, top_k, 2 * vocab + (c.num_codebooks - 1) * size, hidden.device)
        u_normal, u_high, u_fast = (None, None, None) if uniform is None else uniform.split(
            [vocab, vocab, (c.num_codebooks - 1) * size], dim=-1)

        tokens, _ = self.slow_tokens(hidden, temperature, top_p, top_k, u_normal, u_high, state.window[slots], first)
        self._remember(state, slots[~first], tokens[~first])

        codes = self._fast(hidden, tokens, temperature, top_p, top_k, u_fast)
        rows = torch.cat([tokens[:, None], codes], dim=1)
        is_end = tokens == c.eos_token_id
        ends = is_end & ~first
        state.first[slots] = False
        ending, opening = torch.stack([ends, is_end & first]).cpu().numpy()
        slot_ids = slots.tolist()
        self._keep_replays(state, slot_ids, rows, ending, opening)
        prompt_rows: list[np.ndarray | None] = [None] * len(slot_ids)
        rewound = [0] * len(slot_ids)
        for row in np.flatnonzero(ending).tolist():
            slot = slot_ids[row]
            if state.pending[slot]:  # the next batch of this request's text
                replay = state.replay[slot] or []
                prompt_rows[row] = np.concatenate([*replay, state.pending[slot].pop(0)])
                rewound[row] = len(replay)
                self._start_batch(state, slot)
        more = torch.tensor([p is not None for p in prompt_rows], device=hidden.device)
        return StepOutput(rows=rows, frames=codes, has_frame=~ends, new_segment=torch.zeros_like(ends),
                          finished=ends & ~more, prompt_rows=prompt_rows if ending.any() else None,
                          rewound=rewound if any(rewound) else None)

    def _keep_replays(self, state: FishState, slot_ids: list[int], rows: torch.Tensor, ending: np.ndarray,
                      opening: np.ndarray) -> None:
        """Keep the fed-back columns of batches whose first token was <|im_end|> (README 3.4, 4.1):
        the next batch's prompt holds that column as `<|semantic:c_0|>` (c_0 = 0 for <|im_end|>)."""
        keeping = [row for row, slot in enumerate(slot_ids)
                   if opening[row] or (state.replay[slot] is not None and not ending[row])]
        if not keeping:
            return
        host = rows[keeping].cpu().numpy()
        for column, row in zip(host, keeping):
            slot = slot_ids[row]
            if opening[row]:
                column = column.copy()
                column[0] = self.config.semantic_start + column[1]
                state.replay[slot] = []
            state.replay[slot].append(column[None])

    def slow_tokens(self, hidden: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                    u_normal: torch.Tensor | None, u_high: torch.Tensor | None, window: torch.Tensor,
                    first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's slow token (B,), and which rows took the whole head (B,) bool.

        The head's rows for the A allowed ids decide a row when its choice is certain for any rounding
        of the whole head and of the sampler (fish_s2_sampling.certified_*); the rest (near-ties) take
        the whole head one row at a time, so that their answer does not depend on the batch."""
        head = self._narrow_head()
        logits = project_float32(hidden, head.weight)
        bound = BOUND_SAFETY * head_rounding_bound(head.weight_abs, hidden, logits, head.weight)
        index, ok_normal = certified_argmax(logits, bound)
        ok_high = ok_normal.clone()
        normal, high = head.ids[index], head.ids[index]  # greedy rows: the high sample is the argmax too
        if u_normal is not None:
            rows = torch.nonzero(top_k != 1).flatten()
            count = len(rows)
            picked, ok = certified_draw(  # the normal samples, then the high ones, in one batch
                _twice(logits[rows]), _twice(bound[rows]),
                torch.cat([temperature[rows], torch.full_like(temperature[rows], HIGH_TEMPERATURE)]),
                torch.cat([top_p[rows], torch.full_like(top_p[rows], HIGH_TOP_P)]), _twice(top_k[rows]),
                torch.cat([u_normal[rows][:, head.ids], u_high[rows][:, head.ids]]))
            normal[rows], high[rows] = head.ids[picked[:count]], head.ids[picked[count:]]
            ok_normal[rows], ok_high[rows] = ok[:count], ok[count:]
        c = self.config
        use_high = repeated(normal, window, c.semantic_start, c.semantic_end) & ~first
        wide = ~head_cannot_overflow(hidden, head.max_row_norm) | ~ok_normal | (use_high & ~ok_high)
        for row in torch.nonzero(wide).flatten().tolist():
            one = slice(row, row + 1)
            normal[one], high[one] = self._full_slow(hidden[one], temperature[one], top_p[one], top_k[one],
                                                     None if u_normal is None else u_normal[one],
                                                     None if u_high is None else u_high[one])
        use_high = repeated(normal, window, c.semantic_start, c.semantic_end) & ~first
        return torch.where(use_high, high, normal), wide

    def _full_slow(self, hidden: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                   u_normal: torch.Tensor | None, u_high: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The normal and the high sample over the whole head and the reference's mask."""
        logits = self.model.logits(hidden) + self.mask
        normal = choose(logits, temperature, top_p, top_k, u_normal)
        high = choose(logits, torch.full_like(temperature, HIGH_TEMPERATURE), torch.full_like(top_p, HIGH_TOP_P),
                      top_k, u_high)
        return normal, high

    def decode_weights(self) -> dict[str, torch.Tensor]:
        weights = super().decode_weights()
        if self._narrow is not None:
            weights.update({"slow_head.allowed_rows": self._narrow.weight,
                            "slow_head.allowed_rows_abs": self._narrow.weight_abs})
        return weights

    def _narrow_head(self) -> NarrowHead:
        """The allowed rows of the slow head, taken on first use (and again if the weight changes)."""
        weight = self.model.head_weight()
        if self._narrow is None or self._narrow.source is not weight:
            c = self.config
            ids = torch.arange(c.semantic_start, c.semantic_end + 1, device=weight.device)
            ids = torch.cat([ids, torch.tensor([c.eos_token_id], device=weight.device)]).unique(sorted=True)
            # float32 rows, bf16 weights too: logits in float32 are not rounded to bf16, so the
            # certificate's bound stays float32's and near-ties (the whole head) stay rare
            rows = weight.detach()[ids].float().contiguous()
            norm = float(weight.detach().float().norm(dim=-1).max())
            self._narrow = NarrowHead(weight, ids, rows, rows.abs(), norm)
        return self._narrow

    def _fast(self, hidden: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
              top_k: torch.Tensor, uniform: torch.Tensor | None) -> torch.Tensor:
        """The frame's codes (B, N): c_0 from the slow token, c_1.. from the fast AR, all rows at once."""
        c, model = self.config, self.model
        size = c.codebook_size
        cache = model.new_fast_cache(hidden.shape[0])
        model.fast_step(model.fast_start(hidden), 0, cache, with_logits=False)  # position 0's logits are unused
        code = (tokens - c.semantic_start).clamp(0, size - 1)
        codes = [code]
        for i in range(1, c.num_codebooks):
            logits = model.fast_step(model.fast_input(code), i, cache)
            u = None if uniform is None else uniform[:, (i - 1) * size : i * size]
            code = choose(logits, temperature, top_p, top_k, u)
            codes.append(code)
        return torch.stack(codes, dim=1)

    def _remember(self, state: FishState, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Put decode-step tokens into their rows' repetition windows."""
        position = state.window_pos[slots]
        state.window[slots, position] = tokens
        state.window_pos[slots] = (position + 1) % RAS_WINDOW

    def _uniform(self, state: FishState, slots: torch.Tensor, top_k: torch.Tensor, width: int,
                 device: torch.device) -> torch.Tensor | None:
        """One column's U[0,1) draws (B, width) for the sampled rows, each from its request's generator.
        One `rand(width)` equals the reference's consecutive rand_like calls (tests/test_fish_sampling.py)."""
        rows = torch.nonzero(top_k != 1).flatten().tolist()
        if not rows:
            return None
        uniform = torch.full((len(slots), width), 0.5, device=device)
        slot_ids = slots.tolist()
        for row in rows:
            uniform[row] = torch.rand(width, generator=state.generators[slot_ids[row]]).to(device)
        return uniform


def _twice(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x])


def fish_settings(sampling: SamplingParams) -> tuple[float, float, int]:
    """(temperature, top_p, top_k) of a request: Fish samples every token with one setting (the audio
    one); temperature <= 0 means greedy, which the reference spells top_k = 1."""
    values = []
    for name in ("audio_temperature", "audio_top_p", "audio_top_k"):
        value = getattr(sampling, name)
        if not isinstance(value, (int, float)):
            raise InvalidRequestError(f"{name}: Fish S2 Pro takes one value for all codebooks, got {value!r}")
        values.append(value)
    temperature, top_p, top_k = values
    if temperature <= 0:
        return 1.0, float(top_p), 1
    return float(temperature), float(top_p), int(top_k)


def load_fish(model_dir: Path, config: dict, device: torch.device, dtype: torch.dtype) -> FishS2Family:
    """A `fish_qwen3_omni` checkpoint directory (sharded safetensors + index, tokenizer) -> the family."""
    from ..text.fish_tokenizer import FishTokenizer

    fish_config = FishS2Config.from_dict(config, str(model_dir / "config.json"))
    tokenizer = FishTokenizer.from_dir(model_dir, semantic_fallback=(fish_config.semantic_start,
                                                                      fish_config.semantic_end))
    fish_config = fish_config.with_semantic_range(tokenizer.semantic_start, tokenizer.semantic_end)
    model = build_on_meta(lambda: FishS2Model(fish_config), dtype, device)
    load_weights(model, weight_files(model_dir), model.checkpoint_layout())
    model.to_rotate_half()
    codec_config = model_dir / "codec_config.json"
    sample_rate = int(read_json(codec_config).get("sample_rate", SAMPLE_RATE)) if codec_config.is_file() else SAMPLE_RATE
    family = FishS2Family(model.eval().requires_grad_(False), tokenizer, sample_rate=sample_rate)
    family.source = model_dir
    return family

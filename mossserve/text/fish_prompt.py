"""Fish S2 Pro prompts: a request becomes text batches, and batch b a `(T, 1 + N)` prompt matrix.

The layout is the reference's (fixtures/fish_s2_pro/README.md section 3), reproduced exactly:

* a conversation of system / user / assistant messages; every text part is tokenized on its own
  (BPE never merges across parts); a VQ part of F frames is F positions with token
  `semantic_start + c0` and the frame's N codes in columns 1..N (0 elsewhere);
* system: `convert the provided text to speech`, or with references the reference form: their
  texts (each prefixed `<|speaker:i|>` unless it already holds a tag) joined by newlines, then all
  their codes concatenated in time as one VQ part;
* batch b's prompt is one growing conversation: the system message, then for every earlier batch
  its user message and an assistant message with that batch's generated codes, then batch b's
  user message and the open assistant header `<|im_start|>assistant\\n<|voice|>`;
* a batch prompt may hold at most `max_seq_len - 2048` positions (an error otherwise).

Batch b's prompt extends batch b-1's prompt by that batch's codes and `next_batch_rows(plan, b)`,
so a talker that fed those codes back keeps its cache and prefills only the new rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InvalidRequestError
from ..speech_request import EncodeVoice, SpeechRequest, check_codes
from .fish_tokenizer import FishTokenizer
from .fish_turns import DEFAULT_CHUNK_LENGTH, SPEAKER_TAG, batch_texts, split_turns

PROMPT_HEADROOM = 2048  # the reference keeps this many positions of max_seq_len free for generation
SYSTEM_PLAIN = "convert the provided text to speech"
SYSTEM_REFERENCE = "convert the provided text to speech reference to the following:\n\nText:\n"
SPEECH_HEADER = "\n\nSpeech:\n"
IM_END = "<|im_end|>\n"
ASSISTANT_HEADER = "<|im_start|>assistant\n<|voice|>"


@dataclass(frozen=True)
class FishReference:
    """A reference voice: what it says and its codes (F, N), time first."""

    text: str
    codes: np.ndarray


@dataclass(frozen=True)
class Segment:
    """One part of a prompt: a text part tokenized alone (`text` set) or a VQ part (`codes` (P, N) set)."""

    ids: np.ndarray  # (P,) int64 token ids
    text: str | None = None
    codes: np.ndarray | None = None


@dataclass(frozen=True)
class FishPlan:
    """A request as the reference generates it: its references and its text batches, tokenized."""

    references: list[FishReference]
    batches: list[str]
    system: list[Segment]  # the system message (reference codes included)
    users: list[list[Segment]]  # per batch: its user message
    given: int = 0  # earlier batches whose codes are given (a conversation's); batch `given` is generated first

    @property
    def num_batches(self) -> int:
        return len(self.batches)


class FishPromptBuilder:
    def __init__(self, tokenizer: FishTokenizer, num_codebooks: int, codebook_size: int, max_seq_len: int):
        self.tokenizer = tokenizer
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size  # codes of codebooks 1..N-1 lie in 0..codebook_size - 1
        self.prompt_limit = max_seq_len - PROMPT_HEADROOM
        self._assistant = self._text(ASSISTANT_HEADER)
        self._im_end = self._text(IM_END)

    # ---- plans ---------------------------------------------------------------------------
    def plan(self, request: SpeechRequest, encode_voice: EncodeVoice | None = None) -> FishPlan:
        """A `SpeechRequest` as a plan: `input` (may hold `<|speaker:N|>` tags), `voice` +
        `reference_text` (one reference) or `speakers` (several), `chunk_length` (default 300).
        Voices are codes (F, N) or audio paths that `encode_voice` (the codec) turns into codes."""
        _reject_unused(request)
        _check_spoken(request.input, "input")
        if request.speakers is not None and (request.voice is not None or request.reference_text is not None):
            raise InvalidRequestError("give one voice (voice + reference_text) or several (speakers), not both")
        if request.speakers is not None:
            given = [(s.voice, s.reference_text, f"speakers[{i}]") for i, s in enumerate(request.speakers)]
        elif request.voice is not None or request.reference_text is not None:
            given = [(request.voice, request.reference_text, "")]
        else:
            given = []
        references = [self._reference(voice, text, name, encode_voice) for voice, text, name in given]
        return self.plan_text(request.input, references, request.chunk_length or DEFAULT_CHUNK_LENGTH)

    def plan_conversation(self, conversation) -> tuple[FishPlan, list[np.ndarray]]:
        """A conversation (text/fish_conversation.py) as a plan whose first `given` batches are its
        earlier ones, and their codes: batch `given` is the first to generate. Errors name the
        conversation's fields."""
        _check_spoken(conversation.text, f"conversations[{2 * len(conversation.earlier)}].text")
        for index, (text, _) in enumerate(conversation.references):
            if not SPEAKER_TAG.sub("", text).strip():
                raise InvalidRequestError(f"references[{index}].text is speaker tags alone: voice cloning needs "
                                          "what the voice says")
        for index, (_, codes) in enumerate(conversation.earlier):
            self._check_reference_codes(codes, f"conversations[{2 * index + 1}]")
        references = [FishReference(text, codes) for text, codes in conversation.references]
        plan = self.plan_text(conversation.text, references, conversation.chunk_length, conversation.earlier)
        return plan, [codes for _, codes in conversation.earlier]

    def plan_text(self, text: str, references: Sequence[FishReference] = (),
                  chunk_length: int = DEFAULT_CHUNK_LENGTH, earlier: Sequence[tuple[str, np.ndarray]] = ()) -> FishPlan:
        """The plan of a text and its references (after `earlier` batches given with their codes, a
        conversation's): batches tokenized, reference codes checked, and the prompt lengths that are
        known before generation checked against the limit."""
        references = list(references)
        for i, reference in enumerate(references):
            self._check_reference_codes(reference.codes, f"references[{i}]")
        batches = batch_texts(text, chunk_length)
        users = [self._user(given, f"conversations[{2 * i}].text") for i, (given, _) in enumerate(earlier)]
        users += [self._user(batch, "input") for batch in batches]
        plan = FishPlan(references, [given for given, _ in earlier] + batches, self._system(references), users,
                        given=len(earlier))
        first = sum(len(s.ids) for s in self.segments(plan, plan.given, [codes for _, codes in earlier]))
        self.check_length(first, f"batch {plan.given}", plan)
        if len(batches) > 1:  # the last batch's prompt holds at least every text row of the batches before it
            known = first + sum(len(s.ids) for user in users[plan.given + 1:] for s in user)
            known += (len(batches) - 1) * (len(self._im_end.ids) + len(self._assistant.ids))
            self.check_length(known, f"batch {plan.num_batches - 1} (text alone, before any generated audio)", plan)
        return plan

    # ---- prompts -------------------------------------------------------------------------
    def segments(self, plan: FishPlan, batch: int = 0, earlier_codes: Sequence[np.ndarray] = ()) -> list[Segment]:
        """The parts of batch `batch`'s prompt, given the codes (F_k, N) generated for every earlier batch."""
        if not 0 <= batch < plan.num_batches:
            raise IndexError(f"batch {batch} out of range: the plan has {plan.num_batches} batches")
        if len(earlier_codes) != batch:
            raise ValueError(f"batch {batch}'s prompt needs the codes of {batch} earlier batches, got {len(earlier_codes)}")
        parts = list(plan.system)
        for user, codes in zip(plan.users, earlier_codes):
            parts += [*user, self._assistant, self._vq(self._checked_generated(codes)), self._im_end]
        return parts + [*plan.users[batch], self._assistant]

    def prompt(self, plan: FishPlan, batch: int = 0, earlier_codes: Sequence[np.ndarray] = ()) -> np.ndarray:
        """Batch `batch`'s whole prompt matrix (T, 1 + N); longer than `prompt_limit` is an error."""
        rows = self._rows(self.segments(plan, batch, earlier_codes))
        self.check_length(len(rows), f"batch {batch}", plan)
        return rows

    def next_batch_rows(self, plan: FishPlan, batch: int) -> np.ndarray:
        """What batch `batch`'s prompt adds after batch `batch - 1`'s prompt and that batch's codes:
        `<|im_end|>\\n`, the user message, the open assistant header."""
        if not 1 <= batch < plan.num_batches:
            raise IndexError(f"batch {batch} has no earlier batch in a plan of {plan.num_batches} batches")
        return self._rows([self._im_end, *plan.users[batch], self._assistant])

    def vq_rows(self, codes: np.ndarray) -> np.ndarray:
        """The rows of a VQ part: token `semantic_start + c0`, then the frame's codes."""
        return self._rows([self._vq(np.asarray(codes, dtype=np.int64))])

    def check_length(self, length: int, what: str = "the prompt", plan: FishPlan | None = None) -> None:
        if length > self.prompt_limit:
            shorten = "the conversation, " if plan is not None and plan.given else ""
            raise InvalidRequestError(f"{what}: the prompt holds {length} positions, more than this model allows "
                                      f"({self.prompt_limit} = max_seq_len - {PROMPT_HEADROOM}); shorten {shorten}the "
                                      "text or the reference audio")

    # ---- parts ---------------------------------------------------------------------------
    def _system(self, references: list[FishReference]) -> list[Segment]:
        header, end = self._text("<|im_start|>system\n"), self._im_end
        if not references:
            return [header, self._text(SYSTEM_PLAIN), end]
        texts = [r.text if SPEAKER_TAG.search(r.text) else f"<|speaker:{i}|>{r.text}" for i, r in enumerate(references)]
        codes = np.concatenate([r.codes for r in references])
        return [header, self._text(SYSTEM_REFERENCE), self._user_text("\n".join(texts), "reference_text"),
                self._text(SPEECH_HEADER), self._vq(codes), end]

    def _user(self, text: str, name: str) -> list[Segment]:
        return [self._text("<|im_start|>user\n"), self._user_text(text, name), self._im_end]

    def _text(self, text: str) -> Segment:
        return Segment(np.asarray(self.tokenizer.encode(text), dtype=np.int64), text=text)

    def _user_text(self, text: str, name: str) -> Segment:
        return Segment(np.asarray(self.tokenizer.encode_user(text, name), dtype=np.int64), text=text)

    def _vq(self, codes: np.ndarray) -> Segment:
        return Segment(self.tokenizer.semantic_start + codes[:, 0], codes=codes)

    def _rows(self, segments: list[Segment]) -> np.ndarray:
        rows = np.zeros((sum(len(s.ids) for s in segments), 1 + self.num_codebooks), dtype=np.int64)
        position = 0
        for segment in segments:
            end = position + len(segment.ids)
            rows[position:end, 0] = segment.ids
            if segment.codes is not None:
                rows[position:end, 1:] = segment.codes
            position = end
        return rows

    # ---- checks --------------------------------------------------------------------------
    def _reference(self, voice: object, text: str | None, name: str, encode_voice: EncodeVoice | None) -> FishReference:
        prefix = f"{name}." if name else ""
        # the message begins with the field that is missing; a transcript of speaker tags alone is empty
        if voice is None or text is None or not SPEAKER_TAG.sub("", text).strip():
            missing = f"{prefix}voice is missing" if voice is None else \
                f"{prefix}reference_text is {'missing' if text is None else 'empty (speaker tags aside)'}"
            raise InvalidRequestError(f"{missing}: voice cloning needs {prefix}voice and {prefix}reference_text "
                                      "(its transcript) together")
        if isinstance(voice, (str, Path)):
            if encode_voice is None:
                raise InvalidRequestError(f"{prefix}voice is an audio file; encoding it needs the codec (or give codes)")
            voice = encode_voice(Path(voice))
        codes = check_codes(np.asarray(voice), f"{prefix}voice")
        self._check_reference_codes(codes, f"{prefix}voice")  # named as the request names it
        return FishReference(text, codes)

    def _check_reference_codes(self, codes: np.ndarray, name: str) -> None:
        if codes.ndim != 2 or codes.shape[1] != self.num_codebooks or len(codes) == 0:
            raise InvalidRequestError(f"{name}: codes must have shape (frames, {self.num_codebooks}), "
                                      f"got {tuple(codes.shape)}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise InvalidRequestError(f"{name}: codes must be integers, got {codes.dtype}")
        semantic = self.tokenizer.semantic_count
        if codes[:, 0].min() < 0 or codes[:, 0].max() >= semantic:
            raise InvalidRequestError(f"{name}: codebook 0 (semantic) codes must lie in 0..{semantic - 1}")
        if codes[:, 1:].size and (codes[:, 1:].min() < 0 or codes[:, 1:].max() >= self.codebook_size):
            raise InvalidRequestError(f"{name}: codes must lie in 0..{self.codebook_size - 1}")

    def _checked_generated(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"generated codes must have shape (frames, {self.num_codebooks}), got {tuple(codes.shape)}")
        return codes


def _check_spoken(text: str | None, name: str) -> None:
    if text is None or not text.strip():
        raise InvalidRequestError(f"{name} is empty: there is nothing to say")
    if not any(SPEAKER_TAG.sub("", turn).strip() for turn in split_turns(text) or [text]):
        raise InvalidRequestError(f"{name} holds speaker tags and no text after them: there is nothing to say "
                                  "(text before the first tag is not spoken, as in the reference)")


def _reject_unused(request: SpeechRequest) -> None:
    if request.task not in (None, "tts"):
        raise InvalidRequestError(f"Fish S2 Pro runs only the tts task, got {request.task!r}")
    unused = {
        "instructions": request.instructions is not None,
        "duration_tokens": request.duration_tokens is not None,
        "duration_seconds": request.duration_seconds is not None,
        "mode": request.mode is not None,
        "language": request.language is not None,
        "depth": request.depth is not None,
    }
    for name, given in unused.items():
        if given:
            raise InvalidRequestError(f"{name} is not used by Fish S2 Pro")

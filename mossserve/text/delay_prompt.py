"""Prompt matrices of the Delay family (MOSS-TTS, MOSS-TTSD, MOSS-VoiceGenerator, MOSS-SoundEffect).

A conversation of user/assistant messages becomes a `(T, 1 + n_vq)` int64 matrix: column 0 is
the text token, columns 1..n_vq hold one audio codebook each. The layout is the reference
processor's (fixtures/moss_tokenizer/README.md section 3), reproduced exactly:

* a user message renders the fixed `<user_inst>` template; its `reference` entries are audio
  blocks; an assistant message is an audio block (or custom content with `<|audio|>`s);
* each message is wrapped in ChatML on its own and the whole message string is tokenized at
  once (merges cross field boundaries);
* every `<|audio|>` with T frames becomes `<|audio_start|>`, T + n_vq - 1 slots, `<|audio_end|>`,
  and the slot rows carry the codes through the delay pattern (codebook c lags c rows);
* `continuation` cuts every assistant message right after the T-th slot of its last block, so
  the model resumes the audio; `computing_loss` keeps everything;
* a batch is left-padded (text pad id, audio pad code, mask False).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Sequence

import numpy as np

from ..errors import CheckpointError, InvalidRequestError
from ..models.moss_delay_config import MossDelayConfig
from .normalizer import normalize_tts_text
from .tokenizer import TextTokenizer
from ..models.delay_pattern import delay_pattern

AUDIO_PLACEHOLDER = "<|audio|>"
JOINED = "the prompt's user text (the request's text fields as its template joins them)"
MODES = ("generation", "continuation", "computing_loss")
USER_FIELDS = ("text", "reference", "instruction", "tokens", "quality", "sound_event", "ambient_sound", "language")

# `{name}` markers are substituted in this order, one after another (as the reference does).
_USER_TEMPLATE = "\n".join([
    "<user_inst>",
    "- Reference(s):", "{reference}",
    "- Instruction:", "{instruction}",
    "- Tokens:", "{tokens}",
    "- Quality:", "{quality}",
    "- Sound Event:", "{sound_event}",
    "- Ambient Sound:", "{ambient_sound}",
    "- Language:", "{language}",
    "- Text:", "{text}",
    "</user_inst>",
])


@dataclass
class UserMessage:
    """A user turn. Used as is: `text` is not normalized here (`build_user_message` does that)."""

    text: str | None = None
    reference: list[Any] | None = None  # one entry per speaker: codes (frames, n_vq) or None
    instruction: str | None = None
    tokens: int | None = None
    quality: str | None = None
    sound_event: str | None = None
    ambient_sound: str | None = None
    language: str | None = None
    # `text` as typed where `text` holds it normalized (a conversation file's message, read before the
    # model is known): a builder whose processor does not normalize (Local) uses this instead.
    typed_text: str | None = None
    role: ClassVar[str] = "user"

    @property
    def content(self) -> str:
        content = _USER_TEMPLATE.replace("{reference}", self._reference_section())
        for name in USER_FIELDS[2:] + ("text",):
            content = content.replace("{" + name + "}", str(getattr(self, name)))
        return content

    @property
    def audio_codes_list(self) -> list[Any]:
        return [r for r in self._references() if r is not None]

    def _references(self) -> list[Any]:
        if self.reference is None:
            return []
        if not isinstance(self.reference, (list, tuple)):
            raise InvalidRequestError("reference must be a list (one entry per speaker, None for no voice)")
        return list(self.reference)

    def _reference_section(self) -> str:
        if self.reference is None:
            return "None"
        pieces = [f"[S{k}]:\n{AUDIO_PLACEHOLDER}" for k, r in enumerate(self._references(), 1) if r is not None]
        return "\n".join(pieces)


@dataclass
class AssistantMessage:
    """An assistant turn: one code tensor per `<|audio|>` in `content`."""

    audio_codes_list: list[Any] = field(default_factory=list)
    content: str = AUDIO_PLACEHOLDER
    role: ClassVar[str] = "assistant"


Message = UserMessage | AssistantMessage
Conversation = list[Message]


def build_user_message(
    text: str | None = None,
    reference: Any = None,
    instruction: str | None = None,
    tokens: int | None = None,
    quality: str | None = None,
    sound_event: str | None = None,
    ambient_sound: str | None = None,
    language: str | None = None,
    normalize: bool = True,
) -> UserMessage:
    """A user message with `text` normalized as the Delay processor does (`normalize=False`: as given,
    as the Local processor takes it); a single reference is wrapped in a list."""
    if reference is not None and not isinstance(reference, (list, tuple)):
        reference = [reference]
    if text is not None:
        if not isinstance(text, str):
            raise InvalidRequestError(f"text must be a string, got {type(text).__name__}")
        text = normalize_tts_text(text) if normalize else text
    return UserMessage(text, reference, instruction, tokens, quality, sound_event, ambient_sound, language)


def build_assistant_message(audio_codes_list: Sequence[Any], content: str = AUDIO_PLACEHOLDER) -> AssistantMessage:
    if not isinstance(audio_codes_list, (list, tuple)):
        raise InvalidRequestError("audio_codes_list must be a list of code tensors (one per <|audio|>)")
    if not isinstance(content, str):
        raise InvalidRequestError("assistant content must be a string")
    return AssistantMessage(list(audio_codes_list), content)


def check_joined_fields(conversation: Conversation, tokenizer: TextTokenizer | None) -> None:
    """Raise InvalidRequestError where a request's typed fields, each of them allowed, spell a special
    token or `<|audio|>` once joined: the template fills its fields one after another (a typed
    "{text}" in `language` takes the input's text), and the normalizer reads joined fields as one text
    (a Markdown link over the space between transcript and input drops its '[').
    Without a tokenizer no prompt is built from text, so nothing is checked."""
    for message in conversation if tokenizer is not None else ():
        if not isinstance(message, UserMessage):
            continue
        content = message.content
        if content.count(AUDIO_PLACEHOLDER) != len(message.audio_codes_list):
            raise InvalidRequestError(f"{JOINED} contains {AUDIO_PLACEHOLDER}, which text may not use")
        tokenizer.encode_user(content.replace(AUDIO_PLACEHOLDER, " "), JOINED)


def message_parts(message: Message | dict, normalize: bool = True) -> tuple[str, str, list[Any]]:
    """(role, content, code tensors) of any accepted message form.

    Forms: a `UserMessage` / `AssistantMessage`; a dict with `role`, `content` and
    `audio_codes_list` (used verbatim, no template); `{"role": "user", <build_user_message
    fields>}` (text normalized if `normalize`; else a `UserMessage`'s `typed_text` is its text);
    `{"role": "assistant", "audio_codes_list": ..., "content": ...}`.
    """
    if isinstance(message, UserMessage) and not normalize and message.typed_text is not None:
        message = replace(message, text=message.typed_text, typed_text=None)
    if isinstance(message, (UserMessage, AssistantMessage)):
        return message.role, message.content, message.audio_codes_list
    if not isinstance(message, dict):
        raise InvalidRequestError(f"a message must be a UserMessage, AssistantMessage or dict, got {type(message).__name__}")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise InvalidRequestError(f"message role must be 'user' or 'assistant', got {role!r}")
    if "content" in message and "audio_codes_list" in message:
        _reject_unknown(message, {"role", "content", "audio_codes_list"})
        if not isinstance(message["content"], str) or not isinstance(message["audio_codes_list"], (list, tuple)):
            raise InvalidRequestError("a prebuilt message needs a string content and a list audio_codes_list")
        return role, message["content"], list(message["audio_codes_list"])
    if role == "user":
        _reject_unknown(message, {"role", *USER_FIELDS})
        user = build_user_message(**{k: v for k, v in message.items() if k != "role"}, normalize=normalize)
        return "user", user.content, user.audio_codes_list
    _reject_unknown(message, {"role", "content", "audio_codes_list"})
    assistant = build_assistant_message(message.get("audio_codes_list", []), message.get("content", AUDIO_PLACEHOLDER))
    return "assistant", assistant.content, assistant.audio_codes_list


class DelayPromptBuilder:
    """Builds prompt matrices from conversations; token ids and n_vq come from the model config.

    `delayed = False` (the Local family's processor) drops the delay pattern: an audio block is
    its frames' slot rows only, each row holding one whole frame. `opens_audio` (Local too) ends
    a generation prompt with an `<|audio_start|>` row, so the model starts on the first frame.
    `normalize = False` (Local too) takes a role dict's text (and a message's `typed_text`) as
    given: only the Delay processor normalizes it."""

    delayed: ClassVar[bool] = True
    opens_audio: ClassVar[bool] = False
    normalize: ClassVar[bool] = True

    def __init__(self, tokenizer: TextTokenizer, config: MossDelayConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.n_vq = config.n_vq
        self.delay_rows = self.n_vq - 1 if self.delayed else 0  # slot rows a block has beyond its frames
        # Spellings are looked up from the configured ids, as the reference does.
        self.audio_start = self._spelling(config.audio_start_token_id)
        self.audio_end = self._spelling(config.audio_end_token_id)
        self.user_slot = self._spelling(config.audio_user_slot_token_id)
        self.gen_slot = self._spelling(config.audio_assistant_gen_slot_token_id)
        self.delay_slot = self._spelling(config.audio_assistant_delay_slot_token_id)

    def __call__(
        self,
        conversations: Any,
        mode: str = "generation",
        apply_chat_template: bool = True,
        n_vq: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """input_ids int64 (B, L, 1 + n_vq) and attention_mask bool (B, L), left-padded.

        `conversations`: one message, or a list whose items are conversations (lists of
        messages) or single messages; as in the reference, a message at the top level of the
        list is a conversation of its own. `n_vq`, if given, must match every code tensor.
        """
        if isinstance(conversations, (UserMessage, AssistantMessage, dict)):
            conversations = [conversations]
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise InvalidRequestError("expected a message, a conversation or a non-empty list of conversations")
        rows = [self.build(c, mode, apply_chat_template, n_vq) for c in conversations]
        return self._left_pad(rows)

    def build(
        self,
        conversation: Any,
        mode: str = "generation",
        apply_chat_template: bool = True,
        n_vq: int | None = None,
    ) -> np.ndarray:
        """The (T, 1 + n_vq) matrix of one conversation (a list of messages, or one message)."""
        if mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if isinstance(conversation, (UserMessage, AssistantMessage, dict)):
            conversation = [conversation]
        if not isinstance(conversation, (list, tuple)):
            raise InvalidRequestError(f"a conversation must be a list of messages, got {type(conversation).__name__}")
        messages = [message_parts(m, self.normalize) for m in conversation]
        _check_mode(mode, [role for role, _, _ in messages])
        pieces = []
        for i, (role, content, codes) in enumerate(messages):
            codes = [self._check_codes(c, n_vq) for c in codes]
            add_prompt = mode == "generation" and i == len(messages) - 1
            text = self.templated(role, content, add_prompt) if apply_chat_template else content
            expanded, codes = self.expand(role, text, codes)
            pieces.append(self.rows(expanded, codes, truncate=mode == "continuation" and role == "assistant"))
        if mode == "generation" and self.opens_audio:
            opening = np.full((1, 1 + self.n_vq), self.config.audio_pad_code, dtype=np.int64)
            opening[0, 0] = self.config.audio_start_token_id
            pieces.append(opening)
        return np.concatenate(pieces)

    @staticmethod
    def templated(role: str, content: str, add_generation_prompt: bool) -> str:
        """ChatML around one message; the generation prompt opens the assistant turn."""
        text = f"<|im_start|>{role}\n{content}<|im_end|>\n"
        return text + "<|im_start|>assistant\n" if add_generation_prompt else text

    def expand(self, role: str, text: str, codes: list[np.ndarray]) -> tuple[str, list[np.ndarray]]:
        """Replace each `<|audio|>` by its block of slot tokens; returns the string and its codes."""
        if len(codes) > 1:
            text, codes = _merge_adjacent_placeholders(text, codes)
        count = text.count(AUDIO_PLACEHOLDER)
        if count != len(codes):
            raise InvalidRequestError(f"the {role} message's content has {count} {AUDIO_PLACEHOLDER} placeholders for "
                                      f"{len(codes)} code tensors: it needs one per tensor")
        gen, delay = (self.user_slot, self.user_slot) if role == "user" else (self.gen_slot, self.delay_slot)
        blocks = iter(f"{self.audio_start}{gen * len(c)}{delay * self.delay_rows}{self.audio_end}" for c in codes)
        return re.sub(re.escape(AUDIO_PLACEHOLDER), lambda _: next(blocks), text), codes

    def rows(self, expanded: str, codes: list[np.ndarray], truncate: bool = False) -> np.ndarray:
        """Tokenize one expanded message and lay its codes into the audio columns."""
        ids = np.asarray(self.tokenizer.encode(expanded), dtype=np.int64)
        starts = np.flatnonzero(ids == self.config.audio_start_token_id)
        ends = np.flatnonzero(ids == self.config.audio_end_token_id)
        if len(starts) != len(codes) or len(ends) != len(codes):
            raise InvalidRequestError("audio blocks in the message text do not match its code tensors")
        audio = np.full((len(ids), self.n_vq), self.config.audio_pad_code, dtype=np.int64)
        for start, end, block in zip(starts, ends, codes):
            if end != start + len(block) + self.delay_rows + 1:
                raise InvalidRequestError("audio blocks in the message text do not match its code tensors")
            audio[start + 1 : end] = delay_pattern(block, self.config.audio_pad_code) if self.delayed else block
        if truncate and codes:  # keep up to the last frame's slot of the last block
            keep = starts[-1] + 1 + len(codes[-1])
            ids, audio = ids[:keep], audio[:keep]
        return np.concatenate([ids[:, None], audio], axis=1)

    def _check_codes(self, codes: Any, n_vq: int | None) -> np.ndarray:
        if codes is None or isinstance(codes, (str, bytes)) or hasattr(codes, "__fspath__"):
            raise InvalidRequestError("audio must be codes (frames, n_vq); encode audio files with the codec first")
        array = np.asarray(codes)
        if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
            raise InvalidRequestError(f"audio codes must be integers, got dtype {array.dtype}")
        if array.ndim != 2:
            raise InvalidRequestError(f"audio codes must be 2-D (frames, n_vq), got shape {tuple(array.shape)}")
        if n_vq is not None and array.shape[1] != n_vq:
            raise InvalidRequestError(f"audio codes have {array.shape[1]} codebooks but n_vq={n_vq} was requested")
        if array.shape[1] != self.n_vq:
            raise InvalidRequestError(f"audio codes have {array.shape[1]} codebooks; this model has n_vq={self.n_vq}")
        if array.shape[0] == 0:
            raise InvalidRequestError("audio codes have zero frames")
        if array.min() < 0 or array.max() >= self.config.audio_vocab_size:
            raise InvalidRequestError(f"audio codes must lie in 0..{self.config.audio_vocab_size - 1}")
        return array.astype(np.int64, copy=False)

    def _left_pad(self, rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        length = max(len(r) for r in rows)
        input_ids = np.full((len(rows), length, 1 + self.n_vq), self.config.audio_pad_code, dtype=np.int64)
        input_ids[:, :, 0] = self.config.pad_token_id
        attention_mask = np.zeros((len(rows), length), dtype=bool)
        for b, r in enumerate(rows):
            input_ids[b, length - len(r) :] = r
            attention_mask[b, length - len(r) :] = True
        return input_ids, attention_mask

    def _spelling(self, token_id: int) -> str:
        token = self.tokenizer.id_to_token(token_id)
        if token is None:
            raise CheckpointError(f"the tokenizer has no token with id {token_id}, which the model config uses")
        return token


def _check_mode(mode: str, roles: list[str]) -> None:
    if not roles:
        raise InvalidRequestError("a conversation needs at least one message")
    got = f"got {len(roles)} ending with {roles[-1]}"
    if mode == "generation":
        if len(roles) % 2 == 0 or roles[-1] != "user":
            raise InvalidRequestError(f"generation mode needs an odd number of messages ending with a user message, {got}")
    elif len(roles) % 2 != 0 or roles[-1] != "assistant":
        raise InvalidRequestError(f"{mode} mode needs an even number of messages ending with an assistant message, {got}")


def _merge_adjacent_placeholders(text: str, codes: list[np.ndarray]) -> tuple[str, list[np.ndarray]]:
    """Placeholders separated only by whitespace become one whose codes are joined in time."""
    matches = list(re.finditer(re.escape(AUDIO_PLACEHOLDER), text))
    if len(matches) <= 1:
        return text, codes
    if len(matches) != len(codes):
        raise InvalidRequestError(f"{len(matches)} {AUDIO_PLACEHOLDER} placeholders but {len(codes)} code tensors")
    parts, merged, cursor, i = [], [], 0, 0
    while i < len(matches):
        j = i
        while j + 1 < len(matches) and not text[matches[j].end() : matches[j + 1].start()].strip():
            j += 1
        parts += [text[cursor : matches[i].start()], AUDIO_PLACEHOLDER]
        merged.append(np.concatenate(codes[i : j + 1]) if j > i else codes[i])
        cursor, i = matches[j].end(), j + 1
    parts.append(text[cursor:])
    return "".join(parts), merged


def _reject_unknown(message: dict, allowed: set[str]) -> None:
    unknown = sorted(set(message) - allowed)
    if unknown:
        allowed_list = ", ".join(sorted(allowed))
        raise InvalidRequestError(f"{message.get('role')} message: unknown field(s) {', '.join(unknown)} (allowed: {allowed_list})")

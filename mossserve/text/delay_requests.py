"""A `SpeechRequest` as a Delay-family conversation and mode, the way the upstream apps build them.

Upstream (OpenMOSS/MOSS-TTS @ 58b20a0) builds prompts in its demo apps and model cards; we
follow them per task:

* `tts` (MOSS-TTS, `clis/moss_tts_app.py`): text alone, or with `language` / duration `tokens`;
  a voice clones (user `reference=[codes]`, generation). Continuation is the app's
  "Continuation + Clone": the user text is the voice's transcript followed by the new text, the
  voice is both the reference and the assistant's audio prefix. As in the app, duration control
  is off in continuation. The transcript and the text are joined with one space (the model
  card concatenates them; the normalizer removes the space again where Chinese needs none).
  Without normalization (`normalize=False`, the Local processor's way) no space is put where
  either side of the join is a CJK or full-width character, as upstream's Local example joins them.
  Without `mode`, a voice with `reference_text` means continuation, a voice alone cloning.
* `dialogue` (MOSS-TTSD, `clis/moss_ttsd_app.py` and its model card): the input needs `[Sk]`
  tags for speakers 1..len(speakers) (1..5 without speakers); a look-alike (`[S0]`, `[S01]`, `[s2]`,
  `[S 2]`, `［S2］`) or a tag past the speakers is refused, in the input and in transcripts, as the
  prompt will read them (after the normalizer, which deletes format characters: `[S6]` with a
  zero-width space inside is `[S6]` there); a speaker's transcript may hold its own tag only
  (another would label its audio as that speaker's) and must say something besides it. A speaker
  gives a voice and its transcript together or neither. With at least one voice: `reference` is indexed by speaker
  (None where no voice), each cloned speaker's transcript (prefixed `[Sk] ` unless it starts
  with its tag) goes before the dialogue, joined by spaces as in the model card, and the
  assistant prefix is the cloned speakers' codes concatenated in time; mode continuation.
  Otherwise the dialogue alone, generation. Line breaks in the dialogue and transcripts become
  spaces, the first step of the app's dialogue clean-up (else the normalizer ends every line with
  。); not applied: the rest of that clean-up (tag rewriting, bracket/quote removal, punctuation
  folding, merging same-speaker turns), and
  the app encodes the concatenated waveforms as one clip where we concatenate codes.
* `voice_design` (MOSS-VoiceGenerator, `clis/moss_voice_generator_app.py`): text +
  instruction, both required; generation. Only the text is normalized, as in the reference
  processor (the model card's `normalize_inputs=True` has no counterpart there).
* `sound_effect` (MOSS-SoundEffect, its app and model card): the input is the `ambient_sound`
  description (not normalized, `text` stays None), optional duration as `tokens`; generation.

Inputs are stripped as the apps strip them; a field the task does not use is refused. The user
text is normalized as the Delay processor does, unless `normalize=False` (the Local processor).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from ..speech_request import EncodeVoice, SpeechRequest, check_codes
from .delay_prompt import (
    Conversation,
    UserMessage,
    build_assistant_message,
    build_user_message,
)
from .normalizer import normalize_tts_text

TASKS = ("tts", "dialogue", "voice_design", "sound_effect")
MAX_SPEAKERS = 5
# What a user may mean as a dialogue speaker tag (in either case, spaced, full-width); only
# [S1]..[S<speakers>] are ones. The normalizer keeps all of these as typed (NFC folds no width).
_TAG_LIKE = re.compile(r"[\[［]\s*[SsＳｓ]\s*\d+\s*[\]］]")
# Written without spaces around them: CJK punctuation, kana, CJK ideographs, full-width forms.
_UNSPACED = re.compile("[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")

# Request fields each task reads (besides `input` and `mode`, which every task reads).
TASK_FIELDS = {
    "tts": {"voice", "reference_text", "duration", "language"},
    "dialogue": {"speakers"},
    "voice_design": {"instructions"},
    "sound_effect": {"duration"},
}


def infer_task(request: SpeechRequest) -> str:
    """speakers -> dialogue; instructions without a voice -> voice_design; otherwise tts."""
    if request.speakers is not None:
        return "dialogue"
    if request.instructions is not None and request.voice is None:
        return "voice_design"
    return "tts"


def delay_conversation(
    request: SpeechRequest,
    *,
    n_vq: int,
    audio_vocab_size: int,
    task: str | None = None,
    encode_voice: EncodeVoice | None = None,
    normalize: bool = True,
) -> tuple[Conversation, str]:
    """(conversation, mode) for the Delay prompt builder.

    The task is the request's, else `task` (a model-level default), else inferred. Voices are
    codes (frames, n_vq) or audio paths, which `encode_voice` (the codec) turns into codes.
    `normalize=False` keeps the user text as given (the Local processor does not normalize it).
    """
    task = request.task or task or infer_task(request)
    if task not in TASKS:
        raise InvalidRequestError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    _reject_unused(request, task)
    build = {"tts": _tts, "dialogue": _dialogue, "voice_design": _voice_design, "sound_effect": _sound_effect}[task]
    return build(request, _VoiceCodes(n_vq, audio_vocab_size, encode_voice), normalize)


def _tts(request: SpeechRequest, codes: "_VoiceCodes", normalize: bool) -> tuple[Conversation, str]:
    has_voice = request.voice is not None
    transcript = _stripped(request.reference_text)
    language = _stripped(request.language)
    if transcript is not None and not has_voice:
        raise InvalidRequestError("reference_text is the transcript of a voice; give the voice too")
    mode = request.mode or ("continuation" if transcript is not None else "generation")
    if mode == "generation":
        if transcript is not None:
            raise InvalidRequestError("reference_text is used only in continuation mode (cloning does not need it)")
        text = _required(request.input, "input")
        reference = [codes(request.voice, "voice")] if has_voice else None
        return [_user(text, normalize, reference=reference, tokens=request.expected_frames, language=language)], mode
    if not has_voice:
        raise InvalidRequestError("continuation needs a voice: its codes are the audio prefix the model continues")
    if request.expected_frames is not None:
        raise InvalidRequestError("duration control is not available in continuation mode")
    text = _required(request.input, "input")
    if transcript is not None:
        text = _continued(transcript, text, normalize)
    voice = codes(request.voice, "voice")
    return [_user(text, normalize, reference=[voice], language=language), build_assistant_message([voice])], mode


def _continued(transcript: str, text: str, normalize: bool) -> str:
    """The voice's transcript, then the new text: one space between them, which the normalizer removes
    where Chinese needs none; unnormalized (Local), none where either side is CJK or full-width."""
    unspaced = not normalize and bool(_UNSPACED.match(transcript[-1]) or _UNSPACED.match(text[0]))
    return transcript + ("" if unspaced else " ") + text


def _dialogue(request: SpeechRequest, codes: "_VoiceCodes", normalize: bool) -> tuple[Conversation, str]:
    text = _one_line(_required(request.input, "input"))
    speakers = request.speakers or []
    if len(speakers) > MAX_SPEAKERS:
        raise InvalidRequestError(f"a dialogue has at most {MAX_SPEAKERS} speakers, got {len(speakers)}")
    limit = len(speakers) or MAX_SPEAKERS
    hint = "; speakers holds one entry per speaker, {} for one without a voice" if limit < MAX_SPEAKERS else ""
    if not _speaker_tags(_as_read(text, normalize), "input", limit, hint):
        raise InvalidRequestError("a dialogue needs speaker tags such as [S1], [S2] in input")
    transcripts = []
    for k, speaker in enumerate(speakers, 1):
        transcript = _stripped(speaker.reference_text)
        if (speaker.voice is None) != (transcript is None):
            raise InvalidRequestError(f"speakers[{k - 1}]: give voice and reference_text together (or neither)")
        if transcript is not None:
            transcripts.append(_tagged_transcript(transcript, k, limit, normalize))
    if not transcripts:
        if request.mode == "continuation":
            raise InvalidRequestError("dialogue continuation needs at least one speaker with a voice")
        return [_user(text, normalize)], "generation"
    if request.mode == "generation":
        raise InvalidRequestError("a dialogue with speaker voices runs in continuation mode (their audio is a prefix)")
    reference = [codes(s.voice, f"speakers[{k}].voice") for k, s in enumerate(speakers)]
    user = _user(" ".join(transcripts + [text]), normalize, reference=reference)
    prefix = np.concatenate([v for v in reference if v is not None])
    return [user, build_assistant_message([prefix])], "continuation"


def _speaker_tags(text: str, name: str, limit: int, hint: str = "") -> set[int]:
    """The speakers `text` tags. A tag is [S1]..[S{limit}]; a look-alike ([S0], [S01], [s2], [S 2], ［S2］) or
    a tag past the speakers is refused (its message ending with `hint`) rather than read as text or as a
    speaker no one gave: the model knows [S1]..[S5]."""
    tags = {f"[S{k}]": k for k in range(1, limit + 1)}
    used = set()
    for tag in _TAG_LIKE.findall(text):
        if tag not in tags:
            allowed = "[S1]" if limit == 1 else f"[S1]..[S{limit}]"
            raise InvalidRequestError(f"{name} uses {tag}, which is not a speaker tag of this dialogue "
                                      f"(its tags: {allowed}{hint})")
        used.add(tags[tag])
    return used


def check_speaker_transcript(transcript: str, k: int, speakers: int, name: str, normalize: bool = True) -> str:
    """Refuse speaker k's transcript (field `name`, in a dialogue of `speakers`) where the prompt would
    read in it a tag other than [Sk] (it would label k's audio as that speaker's: a transcript copied
    from a dialogue) or nothing but tags; returns it as the prompt reads it (`_as_read`). Shared with
    the server, which checks a stored voice's transcript so, naming the voice."""
    form = _as_read(_one_line(transcript), normalize)
    others = _speaker_tags(form, name, speakers) - {k}
    if others:
        raise InvalidRequestError(f"{name} is speaker {k}'s transcript but holds [S{min(others)}]; "
                                  f"tag it [S{k}] or not at all")
    if not _TAG_LIKE.sub("", form).strip():
        raise InvalidRequestError(f"{name} is empty (speaker tags aside): voice cloning needs what the voice says")
    return form


def _tagged_transcript(transcript: str, k: int, limit: int, normalize: bool) -> str:
    """Speaker k's transcript, checked, as it goes before the dialogue: `[Sk] ...`."""
    transcript = _one_line(transcript)
    form = check_speaker_transcript(transcript, k, limit, f"speakers[{k - 1}].reference_text", normalize)
    return transcript if form.startswith(f"[S{k}]") else f"[S{k}] {transcript}"


def _as_read(text: str, normalize: bool) -> str:
    """User text as the prompt will hold it, where speaker tags are judged: normalized (which deletes
    format characters: [S2] with a soft hyphen inside becomes [S2]) unless the processor takes it as given."""
    return normalize_tts_text(text) if normalize else text


def _voice_design(request: SpeechRequest, codes: "_VoiceCodes", normalize: bool) -> tuple[Conversation, str]:
    _require_generation(request, "voice_design")
    text = _required(request.input, "input")
    instruction = _required(request.instructions, "instructions",
                            "instructions is missing: voice_design needs instructions (the voice)")
    return [_user(text, normalize, instruction=instruction)], "generation"


def _sound_effect(request: SpeechRequest, codes: "_VoiceCodes", normalize: bool) -> tuple[Conversation, str]:
    _require_generation(request, "sound_effect")
    description = _required(request.input, "input", "input is empty: sound_effect needs a sound description in input")
    return [build_user_message(ambient_sound=description, tokens=request.expected_frames)], "generation"


class _VoiceCodes:
    """Turns a request voice into checked codes (frames, n_vq), encoding audio with the codec."""

    def __init__(self, n_vq: int, audio_vocab_size: int, encode_voice: EncodeVoice | None):
        self.n_vq, self.audio_vocab_size, self.encode_voice = n_vq, audio_vocab_size, encode_voice

    def __call__(self, voice: Any, name: str) -> np.ndarray | None:
        if voice is None:
            return None
        if isinstance(voice, (str, Path)):
            if self.encode_voice is None:
                raise InvalidRequestError(f"{name} is an audio file; encoding it needs the codec (or give codes)")
            voice = self.encode_voice(Path(voice))
        codes = check_codes(np.asarray(voice), name)
        if codes.shape[1] != self.n_vq:
            raise InvalidRequestError(f"{name}: codes have {codes.shape[1]} codebooks; this model has {self.n_vq}")
        if codes.min() < 0 or codes.max() >= self.audio_vocab_size:
            raise InvalidRequestError(f"{name}: codes must lie in 0..{self.audio_vocab_size - 1}")
        return codes


def _user(text: str, normalize: bool, **fields: Any) -> UserMessage:
    message = build_user_message(text=text, normalize=normalize, **fields)
    if not message.text:
        raise InvalidRequestError("input is empty after text normalization")
    return message


def _one_line(dialogue: str) -> str:
    """A dialogue written one turn per line, as the TTSD app's own example is, read as one line (the
    first step of the app's clean-up): the normalizer ends each line with 。, after English turns too."""
    return " ".join(dialogue.splitlines())


def _required(value: str | None, name: str, message: str | None = None) -> str:
    value = _stripped(value)
    if value is None:
        raise InvalidRequestError(message or f"{name} is empty: there is nothing to say")
    return value


def _stripped(value: str | None) -> str | None:
    """Blank strings count as absent, as in the apps."""
    if value is None:
        return None
    value = value.strip()
    return value or None


def _reject_unused(request: SpeechRequest, task: str) -> None:
    given = {
        "voice": request.voice is not None,
        "reference_text": request.reference_text is not None,
        "instructions": request.instructions is not None,
        "duration": request.duration_tokens is not None or request.duration_seconds is not None,
        "speakers": request.speakers is not None,
        "language": request.language is not None,
        "depth": request.depth is not None,
        "chunk_length": request.chunk_length is not None,
    }
    for name, present in given.items():
        if present and name not in TASK_FIELDS[task]:
            if name == "depth":
                raise InvalidRequestError("depth is used only by the Local model (MOSS-TTS-Local-Transformer)")
            if name == "chunk_length":
                raise InvalidRequestError("chunk_length is used only by Fish S2 Pro")
            label = "duration_tokens / duration_seconds" if name == "duration" else name
            per_speaker = task == "dialogue" and name in ("voice", "reference_text")
            hint = " (give voices per speaker in speakers)" if per_speaker else ""
            raise InvalidRequestError(f"{label} is not used by the {task} task{hint}")


def _require_generation(request: SpeechRequest, task: str) -> None:
    if request.mode not in (None, "generation"):
        raise InvalidRequestError(f"the {task} task supports only generation mode, got {request.mode!r}")

"""The request bodies of the speech API: OpenAI's fields plus the MOSS extensions.

Strict: a field of the wrong type, an unknown field or an out-of-range number is a 400 naming
the field, never silently coerced or ignored. What a model cannot do (instructions on a model
without voice design, speakers on a single-speaker model) is refused later by the model's own
prompt builder with a message that says so (a Delay model's task, by `speech.refuse_unused`,
in these fields' names).
"""
from __future__ import annotations

from typing import Annotated, Literal, Protocol

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..audio.formats import FORMATS
from ..audio.tempo import SPEEDS
from ..sampling import MIN_DIVISOR
from ..speech_request import FRAMES_PER_SECOND, MAX_DURATION_SECONDS

ResponseFormat = Literal[FORMATS]  # wav, pcm, flac, mp3, opus, aac
# More speakers than any model can voice apart (MOSS-TTSD takes 5); the bound keeps pydantic from
# checking, and erring on, half a million of them.
MAX_SPEAKER_ENTRIES = 64


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _first_unknown_only(cls, data: object) -> object:
        return first_unknown_only(cls, data)


def first_unknown_only(model: type[BaseModel], data: object) -> object:
    """A body with more keys than `model` has fields, with its first unknown key alone: pydantic reports
    field errors first and unknown keys in order, so the first error is the same, but it would build
    one error per key (seconds, holding the GIL, for a million keys)."""
    fields = model.model_fields  # a property: read once, not once per key
    if not isinstance(data, dict) or len(data) <= len(fields):
        return data
    unknown = next(k for k in data if k not in fields)  # among the first len(fields) + 1 keys
    return {**{k: data[k] for k in fields if k in data}, unknown: data[unknown]}


def _greedy_or_divisor(value: float) -> float:
    """A temperature divides the logits: 0 means greedy, and a positive one far below MIN_DIVISOR
    makes them infinite (SamplingParams.validate refuses it too, in the sampler's own names)."""
    if 0 < value < MIN_DIVISOR:
        raise ValueError(f"Input should be 0 (greedy) or at least {MIN_DIVISOR}")
    return value


# The sampling, first-chunk and speed fields a speech request and a realtime session share.
Seed = Annotated[int, Field(ge=0, lt=2**63)]
Temperature = Annotated[float, Field(ge=0, le=10), AfterValidator(_greedy_or_divisor)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=0, le=100000)]
RepetitionPenalty = Annotated[float, Field(ge=MIN_DIVISOR, le=10)]
FirstChunkFrames = Annotated[int, Field(ge=1)]
Speed = Annotated[float, Field(ge=SPEEDS[0], le=SPEEDS[1])]  # OpenAI's range; audio/tempo.py


class SamplingFields(Protocol):
    seed: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    initial_chunk_frames: int | None


# The body fields that carry each field of a Delay task's table (text/delay_requests.py TASK_FIELDS).
BODY_FIELDS = {
    "voice": ("voice", "ref_audio"),
    "reference_text": ("ref_text",),
    "duration": ("duration_seconds", "duration_tokens"),
    "instructions": ("instructions",),
    "speakers": ("speakers",),
    "language": ("language",),
}


def body_fields(task_fields: set[str]) -> list[str]:
    """The body fields that carry `task_fields` (a Delay task's table entry), sorted."""
    return sorted(name for field in task_fields for name in BODY_FIELDS[field])


def _voice_id(value: object) -> object:
    """OpenAI's newer object form of `voice`, `{"id": name}`, is the name."""
    return value["id"] if isinstance(value, dict) and set(value) == {"id"} else value


def _blank_is_unset(value: str) -> str | None:
    """OpenAI clients may send `instructions: ""`; it asks for nothing, so it is no instruction a model
    without voice design must refuse (as SpeechRequest reads a blank `instructions` or `language`)."""
    return value if value.strip() else None


class SpeakerBody(Body):
    """One dialogue speaker: a stored voice or inline reference audio, and its transcript."""

    voice: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    ref_audio: Annotated[str, Field(min_length=1)] | None = None
    ref_text: str | None = None


class SpeechBody(Body):
    @model_validator(mode="before")
    @classmethod
    def _null_is_omitted(cls, data: object) -> object:
        """OpenAI clients send null for a field they leave unset; it means the default (an unknown
        field is refused, null or not)."""
        data = first_unknown_only(cls, data)  # this validator runs before Body's
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}

    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    input: Annotated[str, Field(min_length=1)]
    voice: Annotated[str, Field(min_length=1, max_length=64), BeforeValidator(_voice_id)] | None = None
    response_format: ResponseFormat = "mp3"
    speed: Speed = 1.0
    instructions: Annotated[str, AfterValidator(_blank_is_unset)] | None = None
    stream: bool = False
    stream_format: Literal["audio", "sse"] | None = None
    # MOSS extensions
    ref_audio: Annotated[str, Field(min_length=1)] | None = None
    ref_text: str | None = None
    speakers: Annotated[list[SpeakerBody], Field(min_length=1, max_length=MAX_SPEAKER_ENTRIES)] | None = None
    language: Annotated[str, Field(max_length=32), AfterValidator(_blank_is_unset)] | None = None
    duration_seconds: Annotated[float, Field(gt=0, le=MAX_DURATION_SECONDS)] | None = None
    duration_tokens: Annotated[int, Field(gt=0, le=int(MAX_DURATION_SECONDS * FRAMES_PER_SECOND))] | None = None
    seed: Seed | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    initial_chunk_frames: FirstChunkFrames | None = None
    depth: int | None = None  # Local: codebooks per frame, 1..n_vq (the model checks it: one message for any value)
    chunk_length: Annotated[int, Field(ge=1, le=100000)] | None = None  # Fish S2 Pro: UTF-8 bytes per text batch

    @property
    def streamed(self) -> bool:
        """OpenAI's `stream_format` ("audio": raw audio chunks, "sse": events) streams; so does `stream`
        (audio). A body with neither gets the whole file at once."""
        return self.stream or self.stream_format is not None

"""Prompts of the Local family (MOSS-TTS-Local-Transformer).

Its processor is the Delay processor without the delay pattern (fixtures/moss_tts_local/README.md
section 5): the same user template, ChatML per message, placeholder merging, continuation cut and
left padding; an audio block is `<|audio_start|>`, one slot row per frame (each row one whole
frame), `<|audio_end|>`; a generation prompt ends with an `<|audio_start|>` row. Unlike the Delay
processor it does not normalize the user text: the template holds the text as given. A
`SpeechRequest` becomes the Delay `tts` task's conversation (text, clone by reference,
continuation with prefix audio, language, duration tokens), plus the template's Instruction
field, which the Local model card fills.
"""
from __future__ import annotations

from dataclasses import replace

from ..errors import InvalidRequestError
from ..speech_request import EncodeVoice, SpeechRequest
from .delay_prompt import Conversation, DelayPromptBuilder
from .delay_requests import delay_conversation


class LocalPromptBuilder(DelayPromptBuilder):
    delayed = False
    opens_audio = True
    normalize = False


def local_conversation(
    request: SpeechRequest,
    *,
    n_vq: int,
    audio_vocab_size: int,
    encode_voice: EncodeVoice | None = None,
) -> tuple[Conversation, str]:
    """(conversation, mode) for `LocalPromptBuilder`: the Delay `tts` task, with `instructions`."""
    if request.task not in (None, "tts"):
        raise InvalidRequestError(f"the Local model runs only the tts task, got {request.task!r}")
    if request.speakers is not None:
        raise InvalidRequestError("speakers (dialogue) are not supported by the Local model; give one voice")
    instruction = (request.instructions or "").strip() or None
    base = replace(request, instructions=None, depth=None, task="tts")
    conversation, mode = delay_conversation(base, n_vq=n_vq, audio_vocab_size=audio_vocab_size, task="tts",
                                            encode_voice=encode_voice, normalize=LocalPromptBuilder.normalize)
    conversation[0].instruction = instruction
    return conversation, mode

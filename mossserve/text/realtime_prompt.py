"""Prompt matrices of MOSS-TTS-Realtime (README §5.4-5.5): rows `[text, a_0 .. a_15]`.

Two reference processors build them: the streaming one (`processing_mossttsrealtime.py`: system
prompt, user turns, text-only turns) and the offline one inside `inferencer.py` (system prompt,
then `<|im_start|>assistant\\n`, no user turn). Every row carries the audio pad code in all
sixteen audio columns unless a layout puts codes there. Text is tokenised with the default call
(no BOS/EOS; special-token spellings are atomic), whole strings at a time, as the reference does.
"""
from __future__ import annotations

import numpy as np

from ..errors import InvalidRequestError
from ..models.moss_realtime_config import (
    AUDIO_PAD_TOKEN,
    TEXT_PAD_TOKEN,
    MossRealtimeConfig,
)

SYSTEM_PROMPT = (
    "<|im_start|>system\n"
    "You are a highly expressive text-to-speech (TTS) engine developed by Mosi Intelligence. \n"
    "You possess natural language understanding, emotional modeling, and multi-style speech generation "
    "capabilities, allowing you to generate the corresponding speech based on the text given in the assistant."
    "<|im_end|>\n"
)
VOICE_CONTEXT = "<|im_start|>context\nThe assistant section should be synthesized using the following voice timbre:"
USER_OPEN = "<|im_end|>\n<|im_start|>user\n"
USER_CLOSE = "<|im_end|>\n<|im_start|>assistant\n"
ASSISTANT_OPEN = "<|im_start|>assistant\n"
CODEBOOKS = 16  # the Realtime codec's quantizers, which every voice and user audio carries
DELAY_TOKENS = 12  # text tokens the audio lags behind its text (user turns, and the assistant's prefill)


def orient_codes(codes: np.ndarray, channels: int = CODEBOOKS) -> np.ndarray:
    """The streaming processor's orientation rule: (channels, T) or (T, channels) -> (T, channels).

    A first dimension equal to `channels` means (channels, T), so a time-major array of exactly
    16 frames is read transposed: that is the reference's ambiguity (README §8.10), kept so that
    session inputs mean what they mean upstream. Larger arrays are cut to `channels` codebooks."""
    tokens = np.asarray(codes)
    if tokens.ndim != 2:
        raise InvalidRequestError(f"audio codes must be 2-D, got shape {tokens.shape}")
    rows, cols = tokens.shape
    if rows == channels:
        tokens = tokens.T
    elif cols == channels:
        pass
    elif rows > channels:
        tokens = tokens[:channels].T
    elif cols > channels:
        tokens = tokens[:, :channels]
    if tokens.shape[1] != channels:
        raise InvalidRequestError(f"audio codes need {channels} codebooks, got shape {tuple(np.shape(codes))}")
    return tokens.astype(np.int64)


class RealtimePromptBuilder:
    def __init__(self, tokenizer, config: MossRealtimeConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.channels = config.rvq
        for token, expected in ((TEXT_PAD_TOKEN, config.text_pad_id), (AUDIO_PAD_TOKEN, config.audio_pad_id)):
            if tokenizer.token_to_id(token) != expected:
                raise InvalidRequestError(f"the tokenizer maps {token} to {tokenizer.token_to_id(token)}, "
                                          f"the model config to {expected}")

    def rows(self, text: str) -> np.ndarray:
        """`text` tokenised as one string, audio columns all pad."""
        ids = self.tokenizer.encode(text)
        out = np.full((len(ids), 1 + self.channels), self.config.audio_pad_code, dtype=np.int64)
        out[:, 0] = ids
        return out

    def check_codes(self, codes: np.ndarray, name: str) -> np.ndarray:
        """Time-major codes (T, >= channels) cut to the first `channels` codebooks, range-checked."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] < self.channels or codes.shape[0] == 0:
            raise InvalidRequestError(f"{name}: codes must have shape (frames, {self.channels}), got {codes.shape}")
        codes = codes[:, : self.channels].astype(np.int64)
        if codes.min() < 0 or codes.max() >= self.config.audio_pad_code:
            raise InvalidRequestError(f"{name}: codes must lie in 0..{self.config.audio_pad_code - 1}")
        return codes

    # ---- system prompt -------------------------------------------------------------------
    def system(self, voice: np.ndarray | None = None) -> np.ndarray:
        """The TTS system prompt, plus the voice context when `voice` (T, 16) time-major codes are given."""
        if voice is None:
            return self.rows(SYSTEM_PROMPT)
        text = SYSTEM_PROMPT + VOICE_CONTEXT + AUDIO_PAD_TOKEN * len(voice) + "<|im_end|>\n"
        out = self.rows(text)
        where = np.nonzero(out[:, 0] == self.config.audio_pad_id)[0]
        out[where[0] : where[-1] + 1, 1:] = voice
        return out

    def offline(self, voice: np.ndarray | None = None) -> np.ndarray:
        """The offline path's prompt (inferencer.py): system (+ voice) then `<|im_start|>assistant\\n`."""
        return np.concatenate([self.system(voice), self.rows(ASSISTANT_OPEN)])

    # ---- user turns ----------------------------------------------------------------------
    def user_turn(self, text: str, user_codes: np.ndarray) -> np.ndarray:
        """A user turn with the user's audio (U, 16), delayed against its text like the assistant's."""
        cfg, codes = self.config, user_codes
        n = len(self.tokenizer.encode(text))
        start = len(self.tokenizer.encode(USER_OPEN))
        frames = len(codes)
        if n >= DELAY_TOKENS:
            out = self.rows(USER_OPEN + text + TEXT_PAD_TOKEN * (frames + DELAY_TOKENS - n + 1))
            first = start + DELAY_TOKENS
            out[first : first + frames, 1:] = codes
            out[first - 1, 1] = cfg.audio_bos_code
            out[first + frames, 1] = cfg.audio_eos_code
        else:
            out = self.rows(USER_OPEN + text + TEXT_PAD_TOKEN * (frames + 1))
            out[-(frames + 1) : -1, 1:] = codes
            out[-(frames + 2), 1] = cfg.audio_bos_code
            out[-1, 1] = cfg.audio_eos_code
        return np.concatenate([out, self.rows(USER_CLOSE)])

    def text_only_turn(self, text: str) -> np.ndarray:
        """A user turn without audio (the reference servers' layout), tokenised in one piece."""
        return self.rows(USER_OPEN + text + USER_CLOSE)

    # ---- the assistant's start -----------------------------------------------------------
    def prefill(self, text_ids: list[int] | np.ndarray) -> np.ndarray:
        """Rows `[t_j, pad x 16]` for the first text ids given, BOS in codebook 0 of the last one."""
        ids = np.asarray(text_ids, dtype=np.int64)
        if len(ids) == 0:
            raise InvalidRequestError("the assistant text is empty: nothing to prefill")
        out = np.full((len(ids), 1 + self.channels), self.config.audio_pad_code, dtype=np.int64)
        out[:, 0] = ids
        out[-1, 1] = self.config.audio_bos_code
        return out

    def steps(self, text_ids: list[int] | np.ndarray, frames: np.ndarray) -> np.ndarray:
        """The step rows that fed `frames` (F, 16) back: `[x_k, frame_{k-1}]` for k = 1..F, x_k the k-th
        text id after the prefill or `<|text_pad|>` once they are used up (README §5.5)."""
        out = np.full((len(frames), 1 + self.channels), self.config.text_pad_id, dtype=np.int64)
        fed = min(len(text_ids), len(frames))
        out[:fed, 0] = np.asarray(text_ids[:fed], dtype=np.int64)
        out[:, 1:] = frames
        return out


def prefill_length(pending: int, ended: bool) -> int:
    """Text ids the streaming session prefills: all pending once the text has ended (even more than 12),
    else min(pending, 12). The offline path's P = min(n, 12) is `prefill_length(n, ended=False)`."""
    return pending if ended else min(pending, DELAY_TOKENS)

"""`MossTTSDelayConfig` as published (model_type "moss_tts_delay")."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .config_utils import read_json, require
from .qwen3_config import Qwen3Config

TOKEN_ID_FIELDS = (
    "pad_token_id",
    "im_start_token_id",
    "im_end_token_id",
    "audio_start_token_id",
    "audio_end_token_id",
    "audio_user_slot_token_id",
    "audio_assistant_gen_slot_token_id",
    "audio_assistant_delay_slot_token_id",
)
TOKEN_ID_DEFAULTS = dict(zip(TOKEN_ID_FIELDS, (151643, 151644, 151645, 151652, 151653, 151654, 151656, 151662)))


@dataclass(frozen=True)
class MossDelayConfig:
    language: Qwen3Config
    n_vq: int
    audio_vocab_size: int
    audio_pad_code: int
    sampling_rate: int
    pad_token_id: int
    im_start_token_id: int
    im_end_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    audio_user_slot_token_id: int
    audio_assistant_gen_slot_token_id: int
    audio_assistant_delay_slot_token_id: int

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "config.json") -> "MossDelayConfig":
        language = Qwen3Config.from_dict(require(config, "language_config", where), f"{where}: language_config")
        audio_vocab = int(config.get("audio_vocab_size", 1024))
        ids = {name: int(config.get(name, TOKEN_ID_DEFAULTS[name])) for name in TOKEN_ID_FIELDS}
        pad_code = int(config.get("audio_pad_code", audio_vocab))
        if pad_code != audio_vocab:
            raise CheckpointError(f"{where}: audio_pad_code {pad_code} must equal audio_vocab_size {audio_vocab}")
        return cls(
            language=language,
            n_vq=int(require(config, "n_vq", where)),
            audio_vocab_size=audio_vocab,
            audio_pad_code=pad_code,
            sampling_rate=int(config.get("sampling_rate", 24000)),
            **ids,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "MossDelayConfig":
        return cls.from_dict(read_json(Path(path)), str(path))

"""`MossTTSRealtimeConfig` as published (model_type "moss_tts_realtime").

Two Qwen3-style stacks: the backbone (`language_config`) and the local depth transformer
(`local_config`). The local config's rope is written as `linear` with factor 1.0, which is plain
RoPE; any other factor is refused rather than silently mis-rotated. Like the reference's local
config class, the codebook count (16), the audio vocabulary (1027) and the audio pad code (1024)
of the local stack are fixed whatever its JSON says.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .config_utils import read_json, require, rope_type_of
from .qwen3_config import Qwen3Config

LOCAL_RVQ, LOCAL_AUDIO_VOCAB, LOCAL_AUDIO_PAD = 16, 1027, 1024
TEXT_PAD_TOKEN, AUDIO_PAD_TOKEN = "<|text_pad|>", "<|audio_pad|>"


@dataclass(frozen=True)
class MossRealtimeConfig:
    language: Qwen3Config
    local: Qwen3Config
    rvq: int  # codebooks per frame; a row has 1 + rvq columns
    audio_vocab_size: int  # codes 0..1023, then pad, BOS, EOS
    audio_pad_code: int
    audio_bos_code: int
    audio_eos_code: int
    text_pad_id: int  # <|text_pad|>
    audio_pad_id: int  # <|audio_pad|> (the voice-context placeholder)
    sampling_rate: int

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "config.json") -> MossRealtimeConfig:
        language = Qwen3Config.from_dict(require(config, "language_config", where), f"{where}: language_config")
        local = Qwen3Config.from_dict(_plain_rope(require(config, "local_config", where), f"{where}: local_config"),
                                      f"{where}: local_config")
        if local.hidden_size != language.hidden_size:
            raise CheckpointError(f"{where}: local_config.hidden_size {local.hidden_size} must equal the backbone's "
                                  f"{language.hidden_size} (the backbone state enters the local transformer unprojected)")
        rvq = int(config.get("rvq", LOCAL_RVQ))
        vocab = int(config.get("audio_vocab_size", LOCAL_AUDIO_VOCAB))
        pad = int(config.get("audio_pad_token", LOCAL_AUDIO_PAD))
        if (rvq, vocab, pad) != (LOCAL_RVQ, LOCAL_AUDIO_VOCAB, LOCAL_AUDIO_PAD):
            raise CheckpointError(f"{where}: rvq/audio_vocab_size/audio_pad_token must be {LOCAL_RVQ}/{LOCAL_AUDIO_VOCAB}/"
                                  f"{LOCAL_AUDIO_PAD} (the local transformer hard-codes them), got {rvq}/{vocab}/{pad}")
        return cls(
            language=language,
            local=local,
            rvq=rvq,
            audio_vocab_size=vocab,
            audio_pad_code=pad,
            audio_bos_code=pad + 1,
            audio_eos_code=pad + 2,
            text_pad_id=int(config.get("text_pad", 151655)),
            audio_pad_id=int(config.get("reference_audio_pad", 151654)),
            sampling_rate=int(config.get("sampling_rate", 24000)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> MossRealtimeConfig:
        return cls.from_dict(read_json(Path(path)), str(path))


def _plain_rope(local: dict[str, Any], where: str) -> dict[str, Any]:
    """The local config with its `linear` factor-1.0 rope rewritten as the default rope it equals."""
    rope = dict(local.get("rope_parameters") or {})
    rope_type = rope_type_of(local)
    factor = float(rope.get("factor", (local.get("rope_scaling") or {}).get("factor", 1.0)))
    if rope_type not in ("default", "linear") or (rope_type == "linear" and factor != 1.0):
        raise CheckpointError(f"{where}: rope {rope_type!r} with factor {factor} is not supported "
                              "(only plain RoPE: 'default', or 'linear' with factor 1.0)")
    theta = rope.get("rope_theta", local.get("rope_theta"))
    out = {k: v for k, v in local.items() if k not in ("rope_scaling", "rope_type")}
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    out.setdefault("vocab_size", LOCAL_AUDIO_VOCAB)
    return out

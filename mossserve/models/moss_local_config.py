"""The MOSS-TTS-Local-Transformer config as published.

Upstream calls it `MossTTSDelayConfig` (model_type "moss_tts_delay") like the Delay model; the
local-transformer fields are what tell the two apart. The depth transformer's config is derived,
not stored: the language config with the local sizes (heads, kv-heads, head_dim, eps inherited).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config_utils import read_json, require
from .moss_delay_config import MossDelayConfig
from .qwen3_config import Qwen3Config

LOCAL_FIELDS = ("local_num_layers", "local_hidden_size", "local_ffn_hidden_size", "additional_mlp_ffn_hidden_size")


def is_local_config(config: dict[str, Any]) -> bool:
    """A `moss_tts_delay` config.json that describes the Local model (it has a depth transformer)."""
    return "local_num_layers" in config


@dataclass(frozen=True)
class MossLocalConfig(MossDelayConfig):
    local: Qwen3Config  # the depth transformer (no rotary, no embedding)
    bridge_ffn_size: int  # additional_mlp_ffn_hidden_size: the P / Q bridge MLPs

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "config.json") -> MossLocalConfig:
        base = MossDelayConfig.from_dict(config, where)
        sizes = {name: int(require(config, name, where)) for name in LOCAL_FIELDS}
        local = replace(base.language, num_hidden_layers=sizes["local_num_layers"],
                        hidden_size=sizes["local_hidden_size"], intermediate_size=sizes["local_ffn_hidden_size"])
        fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
        return cls(**fields, local=local, bridge_ffn_size=sizes["additional_mlp_ffn_hidden_size"])

    @classmethod
    def from_file(cls, path: str | Path) -> MossLocalConfig:
        return cls.from_dict(read_json(Path(path)), str(path))

    @property
    def channels(self) -> int:
        """Text channel + one per codebook."""
        return 1 + self.n_vq

"""The Qwen3 backbone configuration, as transformers 4.x and 5.x write it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError
from .config_utils import check_heads, require, rope_type_of


@dataclass(frozen=True)
class Qwen3Config:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    max_position_embeddings: int
    qk_norm: bool = True  # RMSNorm of each q and k head (Qwen3); Fish's slow and fast AR may have none

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "language_config") -> "Qwen3Config":
        rope = config.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", config.get("rope_theta"))
        if rope_theta is None:
            raise CheckpointError(f"{where}: missing config field 'rope_theta' (or rope_parameters.rope_theta)")
        rope_type = rope_type_of(config)
        if rope_type != "default":
            raise CheckpointError(f"{where}: rope_type {rope_type!r} is not supported (only 'default')")
        if config.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
        if config.get("attention_bias", False):
            raise CheckpointError(f"{where}: attention_bias=true is not supported")
        if config.get("use_sliding_window", False):
            raise CheckpointError(f"{where}: use_sliding_window=true is not supported")
        heads = int(require(config, "num_attention_heads", where))
        hidden = int(require(config, "hidden_size", where))
        kv_heads = int(config.get("num_key_value_heads") or heads)
        check_heads(heads, kv_heads, where)
        if heads % kv_heads:
            raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        return cls(
            hidden_size=hidden,
            intermediate_size=int(require(config, "intermediate_size", where)),
            num_hidden_layers=int(require(config, "num_hidden_layers", where)),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(require(config, "rms_norm_eps", where)),
            rope_theta=float(rope_theta),
            vocab_size=int(require(config, "vocab_size", where)),
            max_position_embeddings=int(config.get("max_position_embeddings") or 32768),
        )

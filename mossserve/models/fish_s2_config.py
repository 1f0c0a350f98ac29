"""The Fish S2 Pro (`fish_qwen3_omni`) config.json, read the way the reference reads it.

Only the keys the reference uses are read (fixtures/fish_s2_pro/README.md section 2.2); the fast
AR inherits every shape it does not set from the slow AR, and always takes the slow AR's
`rope_base` and `norm_eps` (its own copies are ignored upstream). Both transformers are described
as Qwen3Config so that the shared backbone, attention and KV cache serve them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError
from .config_utils import check_heads, require
from .qwen3_config import Qwen3Config

MODEL_TYPE = "fish_qwen3_omni"


def is_fish_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


@dataclass(frozen=True)
class FishS2Config:
    slow: Qwen3Config
    fast: Qwen3Config
    tie_word_embeddings: bool
    codebook_size: int  # C: fast vocabulary and codebook-embedding stride
    num_codebooks: int  # N codes per frame
    eos_token_id: int  # <|im_end|>
    semantic_start: int  # <|semantic:0|> (the tokenizer's value wins; see with_semantic_range)
    semantic_end: int  # <|semantic:C_sem - 1|>

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "config.json") -> FishS2Config:
        text = require(config, "text_config", where)
        audio = require(config, "audio_decoder_config", where)
        for part, name in ((text, "text_config"), (audio, "audio_decoder_config")):
            if part.get("attention_qkv_bias") or part.get("attention_o_bias"):
                raise CheckpointError(f"{where}: {name}: attention biases are not supported")
            if part.get("use_moe"):
                raise CheckpointError(f"{where}: {name}: use_moe=true is not supported")
        slow = _transformer(text, {}, text, f"{where}: text_config")
        inherited = {**text, "intermediate_size": slow.intermediate_size}  # README 2.2: the slow value, formula or not
        eos = int(require(config, "eos_token_id", where))
        if not 0 <= eos < slow.vocab_size:  # the sampler's mask unmasks it: 10^6 fails, -1 frees the last token
            raise CheckpointError(f"{where}: eos_token_id {eos} is outside the vocabulary (0..{slow.vocab_size - 1})")
        return cls(
            slow=slow,
            fast=_transformer(audio, inherited, text, f"{where}: audio_decoder_config"),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", True)),
            codebook_size=int(require(audio, "vocab_size", f"{where}: audio_decoder_config")),
            num_codebooks=int(require(audio, "num_codebooks", f"{where}: audio_decoder_config")),
            eos_token_id=eos,
            semantic_start=int(require(config, "semantic_start_token_id", where)),
            semantic_end=int(require(config, "semantic_end_token_id", where)),
        )

    def with_semantic_range(self, start: int, end: int) -> FishS2Config:
        """The semantic id range as the tokenizer has it (the reference prefers it over config.json)."""
        from dataclasses import replace

        return replace(self, semantic_start=start, semantic_end=end)

    @property
    def columns(self) -> int:
        return 1 + self.num_codebooks


def _transformer(part: dict[str, Any], inherit: dict[str, Any], text: dict[str, Any], where: str) -> Qwen3Config:
    """One transformer's shapes; missing keys come from `inherit` (the slow config for the fast AR)."""

    def get(key: str, default: Any = None) -> Any:
        if part.get(key) is not None:
            return part[key]
        if inherit.get(key) is not None:
            return inherit[key]
        return default

    dim = int(get("dim") if get("dim") is not None else require(text, "dim", where))
    heads = int(get("n_head") if get("n_head") is not None else require(part, "n_head", where))
    kv_heads = int(get("n_local_heads", -1))
    kv_heads = heads if kv_heads == -1 else kv_heads
    check_heads(heads, kv_heads, where)
    if heads % kv_heads:
        raise CheckpointError(f"{where}: n_head {heads} is not a multiple of n_local_heads {kv_heads}")
    intermediate = get("intermediate_size")
    if intermediate is None:  # the reference's default: 8D/3 rounded up to a multiple of 256
        intermediate = 256 * math.ceil(int(2 * (4 * dim) / 3) / 256)
    layers = require(part, "n_layer", where)
    return Qwen3Config(
        hidden_size=dim,
        intermediate_size=int(intermediate),
        num_hidden_layers=int(layers),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(get("head_dim", 64)),
        rms_norm_eps=float(text.get("norm_eps", 1e-5)),
        rope_theta=float(text.get("rope_base", 10000.0)),
        vocab_size=int(require(part, "vocab_size", where)),
        max_position_embeddings=int(text.get("max_seq_len", 2048)),
        qk_norm=bool(get("attention_qk_norm", False)),
    )

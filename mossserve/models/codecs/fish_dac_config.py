"""Fish Audio's modded DAC (the S2 Pro codec): hyper-parameters from `codec_config.json`.

The file mirrors upstream's `modded_dac_vq.yaml` (same nesting and keys). The published S2 Pro
directory ships no such file, so without one the published codec's own values are used
(`FishDacConfig()`: 44.1 kHz, hop 512, 10 codebooks). Only the keys that shape the network are
read; training-only keys (dropout, quantizer_dropout) are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

from ...errors import CheckpointError


@dataclass(frozen=True)
class WindowTransformerConfig:
    """A causal transformer whose query t attends to keys t - window < s <= t."""

    n_layer: int
    n_head: int
    dim: int
    head_dim: int
    intermediate_size: int
    window: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5


def _published_vq_transformer() -> WindowTransformerConfig:
    return WindowTransformerConfig(n_layer=8, n_head=16, dim=1024, head_dim=64, intermediate_size=3072, window=128)


@dataclass(frozen=True)
class FishDacConfig:
    sample_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    encoder_transformer_layers: tuple[int, ...] = (0, 0, 0, 4)
    # The encoder blocks' transformers: the window is a default upstream (the general config is a
    # partial whose attributes it cannot read); head_dim, rope base and eps come from the file.
    encoder_head_dim: int = 64
    encoder_window: int = 512
    encoder_rope_base: float = 10000.0
    encoder_norm_eps: float = 1e-5
    n_codebooks: int = 9  # residual codebooks, after the semantic one
    codebook_size: int = 1024
    codebook_dim: int = 8
    semantic_codebook_size: int = 4096
    downsample_factor: tuple[int, ...] = (2, 2)
    pre_module: WindowTransformerConfig = field(default_factory=_published_vq_transformer)
    post_module: WindowTransformerConfig = field(default_factory=_published_vq_transformer)

    @property
    def latent_dim(self) -> int:
        return self.encoder_dim * 2 ** len(self.encoder_rates)

    @property
    def hop_length(self) -> int:
        return prod(self.encoder_rates)

    @property
    def frame_length(self) -> int:
        """Samples per code frame: the hop times the quantizer's downsampling."""
        return self.hop_length * prod(self.downsample_factor)

    @property
    def num_quantizers(self) -> int:
        return 1 + self.n_codebooks

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str) -> FishDacConfig:
        """`codec_config.json` as upstream writes it; absent keys keep the published values."""
        try:
            general = config.get("transformer_general_config") or {}
            quantizer = config.get("quantizer") or {}
            default = cls()
            kwargs: dict[str, Any] = {}
            for key in ("sample_rate", "encoder_dim", "decoder_dim"):
                if key in config:
                    kwargs[key] = int(config[key])
            for key in ("encoder_rates", "decoder_rates", "encoder_transformer_layers"):
                if key in config:
                    kwargs[key] = tuple(int(v) for v in config[key])
            if "head_dim" in general:
                kwargs["encoder_head_dim"] = int(general["head_dim"])
            if "rope_base" in general:
                kwargs["encoder_rope_base"] = float(general["rope_base"])
            if "norm_eps" in general:
                kwargs["encoder_norm_eps"] = float(general["norm_eps"])
            for key in ("n_codebooks", "codebook_size", "codebook_dim", "semantic_codebook_size"):
                if key in quantizer:
                    kwargs[key] = int(quantizer[key])
            if "downsample_factor" in quantizer:
                kwargs["downsample_factor"] = tuple(int(v) for v in quantizer["downsample_factor"])
            for key in ("pre_module", "post_module"):
                if key in quantizer:
                    kwargs[key] = _vq_transformer(quantizer[key], getattr(default, key))
            result = cls(**kwargs)
        except (TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{where}: malformed codec config ({e})") from None
        result.validate(where)
        return result

    def validate(self, where: str) -> None:
        if len(self.encoder_transformer_layers) != len(self.encoder_rates):
            raise CheckpointError(f"{where}: encoder_transformer_layers needs one entry per encoder rate")
        for i, layers in enumerate(self.encoder_transformer_layers):
            if layers and (self.encoder_dim << (i + 1)) % self.encoder_head_dim:
                raise CheckpointError(f"{where}: encoder block {i} width {self.encoder_dim << (i + 1)} is not a "
                                      f"multiple of head_dim {self.encoder_head_dim}")
        if self.decoder_dim % 2 ** len(self.decoder_rates):
            raise CheckpointError(f"{where}: decoder_dim {self.decoder_dim} cannot halve {len(self.decoder_rates)} times")
        for name in ("pre_module", "post_module"):
            module = getattr(self, name)
            if module.dim != self.latent_dim:
                raise CheckpointError(f"{where}: quantizer.{name} dim {module.dim} != latent dim {self.latent_dim}")
            if module.head_dim % 2 or module.window < 1:
                raise CheckpointError(f"{where}: quantizer.{name} needs an even head_dim and a window >= 1")


def _vq_transformer(section: dict[str, Any], default: WindowTransformerConfig) -> WindowTransformerConfig:
    inner = section.get("config") or {}
    dim = int(inner.get("dim", default.dim))
    n_head = int(inner.get("n_head", default.n_head))
    if int(inner.get("n_local_heads", -1)) not in (-1, n_head):
        raise ValueError("grouped-query attention is not used by the DAC transformers")
    if int(section.get("input_dim", dim)) != dim:
        raise ValueError("a DAC transformer with input_dim != dim (projections) is not supported")
    return WindowTransformerConfig(
        n_layer=int(inner.get("n_layer", default.n_layer)),
        n_head=n_head,
        dim=dim,
        head_dim=int(inner.get("head_dim", default.head_dim)),
        intermediate_size=int(inner.get("intermediate_size", default.intermediate_size)),
        window=int(section.get("window_size", default.window)),
        rope_base=float(inner.get("rope_base", default.rope_base)),
        norm_eps=float(inner.get("norm_eps", default.norm_eps)),
    )

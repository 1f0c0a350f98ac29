"""MOSS-Audio-Tokenizer config.json (v1 "Cat" and v2 / Nano) read into dataclasses.

Both config classes of the reference are accepted as they write themselves: `model_type` is
`speech_tokenizer` (released file) or `moss-audio-tokenizer`, `sample_rate` is an alias of
`sampling_rate`. A config that names a channel count (`number_channels`, alias
`channels_numbers`) or `enable_channel_interleave` is a v2 config: it interleaves channels into
one stream and rounds (instead of truncating) the attention window of each stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import CheckpointError
from ..config_utils import require

MODEL_TYPES = ("moss-audio-tokenizer", "speech_tokenizer")
ARCHITECTURE = "MossAudioTokenizerModel"
GATING_ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "silu", "mish", "softsign", "identity")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def names_moss_audio_tokenizer(model_type: object, architectures: list[str]) -> bool:
    """Whether config.json's `model_type` (or, with none, its `architectures`) names this codec: the
    loader's test before the weights come down, so it admits only what `from_dict` accepts."""
    return model_type in MODEL_TYPES if model_type is not None else ARCHITECTURE in architectures


@dataclass(frozen=True)
class PatchSpec:
    """Patch (encoder) or unpatch (decoder) by `patch_size`; no parameters."""

    patch_size: int


@dataclass(frozen=True)
class TransformerSpec:
    """One projected causal Transformer stage; `context` is its window in tokens."""

    input_dimension: int
    output_dimension: int
    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    context: int
    causal: bool = False
    norm: str = "layer_norm"
    positional_embedding: str = "sin"
    max_period: float = 10000.0
    positional_scale: float = 1.0
    gating: str = "none"
    layer_scale: float | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


Stage = PatchSpec | TransformerSpec


@dataclass(frozen=True)
class QuantizerSpec:
    quantizer_type: str  # "rlfq" (cosine code choice) or "rvq" (euclidean)
    input_dim: int
    rvq_dim: int
    output_dim: int
    num_quantizers: int
    codebook_size: int
    codebook_dim: int


@dataclass(frozen=True)
class MossAudioTokenizerConfig:
    sampling_rate: int
    downsample_rate: int  # samples per code frame, per channel
    context_duration: float
    encoder: tuple[Stage, ...]
    decoder: tuple[Stage, ...]
    quantizer: QuantizerSpec
    number_channels: int = 1
    enable_channel_interleave: bool = True
    attention_implementation: str = "sdpa"
    compute_dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype = torch.float32

    @property
    def interleaved(self) -> bool:
        return self.number_channels > 1 and self.enable_channel_interleave

    @property
    def frame_rate(self) -> float:
        return self.sampling_rate / self.downsample_rate

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config.json") -> "MossAudioTokenizerConfig":
        model_type = d.get("model_type")
        if model_type is not None and model_type not in MODEL_TYPES:
            raise CheckpointError(f"{where}: model_type {model_type!r} is not a MOSS-Audio-Tokenizer ({MODEL_TYPES})")
        v2 = any(k in d for k in ("number_channels", "channels_numbers", "enable_channel_interleave"))
        channels = int(d.get("number_channels", d.get("channels_numbers", 2 if v2 else 1)))
        interleave = bool(d.get("enable_channel_interleave", True))
        rate = d.get("sampling_rate", d.get("sample_rate", 48000 if v2 else 24000))
        downsample = int(d.get("downsample_rate", 3840 if v2 else 1920))
        duration = float(d.get("causal_transformer_context_duration", 10.0))
        if channels < 1:
            raise CheckpointError(f"{where}: number_channels must be >= 1, got {channels}")

        # Window per stage: walk the stack with the token rate (5.4); v2 starts from the
        # interleaved rate, honours a per-stage context_duration and rounds instead of truncating.
        token_rate = float(rate) * (channels if v2 and channels > 1 and interleave else 1)

        def stages(key: str, down: bool) -> tuple[Stage, ...]:
            nonlocal token_rate
            entries = require(d, key, where)
            if not isinstance(entries, list) or not entries:
                raise CheckpointError(f"{where}: '{key}' must be a non-empty list")
            out: list[Stage] = []
            for i, e in enumerate(entries):
                w = f"{where}: {key}[{i}]"
                kind = require(e, "module_type", w)
                if kind == "PatchedPretransform":
                    h = int(require(e, "patch_size", w))
                    out.append(PatchSpec(h))
                    token_rate = token_rate / h if down else token_rate * h
                elif kind == "Transformer":
                    out.append(_transformer(e, w, token_rate, duration, v2))
                else:
                    raise CheckpointError(f"{w}: unknown module_type {kind!r}")
            return tuple(out)

        encoder = stages("encoder_kwargs", down=True)
        decoder = stages("decoder_kwargs", down=False)
        q = require(d, "quantizer_kwargs", where)
        wq = f"{where}: quantizer_kwargs"
        input_dim = int(require(q, "input_dim", wq))
        qtype = q.get("quantizer_type") or d.get("quantizer_type") or "rlfq"
        if qtype in ("rlfq", "random_prefix_rlfq"):
            qtype = "rlfq"
        elif qtype in ("rvq", "spec_rvq"):
            qtype = "rvq"
        else:
            raise CheckpointError(f"{wq}: unsupported quantizer_type {qtype!r}")
        quantizer = QuantizerSpec(
            quantizer_type=qtype,
            input_dim=input_dim,
            rvq_dim=int(q.get("rvq_dim") or input_dim),
            output_dim=int(q.get("output_dim") or input_dim),
            num_quantizers=int(require(q, "num_quantizers", wq)),
            codebook_size=int(q.get("codebook_size", 4096)),
            codebook_dim=int(require(q, "codebook_dim", wq)),
        )
        config = cls(
            sampling_rate=int(rate),
            downsample_rate=downsample,
            context_duration=duration,
            encoder=encoder,
            decoder=decoder,
            quantizer=quantizer,
            number_channels=channels,
            enable_channel_interleave=interleave,
            attention_implementation=str(d.get("attention_implementation", d.get("attention_backend", "sdpa"))),
            compute_dtype=_dtype(d.get("compute_dtype", d.get("codec_compute_dtype", "fp32")), where),
            weight_dtype=_dtype(d.get("codec_weight_dtype", d.get("codec_load_dtype", "fp32")), where),
        )
        config._check_shapes(where)
        return config

    def _check_shapes(self, where: str) -> None:
        """The stacks must chain: widths match, the decoder inverts the encoder's patching."""
        stream_channels = 1 if self.interleaved else self.number_channels
        hop = self.downsample_rate * (self.number_channels if self.interleaved else 1)
        width = _walk(self.encoder, stream_channels, down=True, where=f"{where}: encoder_kwargs")
        product = _patch_product(self.encoder)
        if product != hop:
            raise CheckpointError(f"{where}: encoder patch sizes multiply to {product}, expected {hop} "
                                  f"(downsample_rate {self.downsample_rate} x {hop // self.downsample_rate} channel(s))")
        if _patch_product(self.decoder) != product:
            raise CheckpointError(f"{where}: decoder patch sizes multiply to {_patch_product(self.decoder)}, "
                                  f"the encoder's to {product}")
        q = self.quantizer
        if width != q.input_dim:
            raise CheckpointError(f"{where}: encoder output width {width} != quantizer input_dim {q.input_dim}")
        out = _walk(self.decoder, q.output_dim, down=False, where=f"{where}: decoder_kwargs")
        if out != stream_channels:
            raise CheckpointError(f"{where}: decoder produces {out} channel(s), expected {stream_channels}")


def _transformer(e: dict[str, Any], where: str, token_rate: float, duration: float, v2: bool) -> TransformerSpec:
    stage_duration = float(e.get("context_duration", duration))
    # v1 truncates the float product (0.3 s at 25 Hz -> 7); v2 rounds (-> 8).
    context = int(round(token_rate * stage_duration)) if v2 else int(token_rate * stage_duration)
    d_model = int(require(e, "d_model", where))
    heads = int(require(e, "num_heads", where))
    if d_model % heads or (d_model // heads) % 2:
        raise CheckpointError(f"{where}: d_model {d_model} must split into {heads} heads of even size")
    if context < 1:
        raise CheckpointError(f"{where}: attention window of {context} tokens (rate {token_rate} Hz)")
    norm = e.get("norm", "layer_norm")
    if norm not in ("layer_norm", "rms_norm", "rms_norm_f32"):
        raise CheckpointError(f"{where}: unsupported norm {norm!r}")
    pos = e.get("positional_embedding", "sin")
    if pos not in ("rope", "sin", "sin_rope", "none"):
        raise CheckpointError(f"{where}: unsupported positional_embedding {pos!r}")
    gating = str(e.get("gating", "none"))
    if gating != "none" and gating not in GATING_ACTIVATIONS:
        raise CheckpointError(f"{where}: unsupported gating {gating!r}")
    if e.get("weights_per_step"):
        raise CheckpointError(f"{where}: weights_per_step is not supported")
    layer_scale = e.get("layer_scale")
    return TransformerSpec(
        input_dimension=int(require(e, "input_dimension", where)),
        output_dimension=int(require(e, "output_dimension", where)),
        d_model=d_model,
        num_heads=heads,
        num_layers=int(require(e, "num_layers", where)),
        dim_feedforward=int(require(e, "dim_feedforward", where)),
        context=context,
        causal=bool(e.get("causal", False)),
        norm=norm,
        positional_embedding=pos,
        max_period=float(e.get("max_period", 10000.0)),
        positional_scale=float(e.get("positional_scale", 1.0)),
        gating=gating,
        layer_scale=None if layer_scale is None else float(layer_scale),
    )


def _patch_product(stages: tuple[Stage, ...]) -> int:
    product = 1
    for s in stages:
        if isinstance(s, PatchSpec):
            product *= s.patch_size
    return product


def _walk(stages: tuple[Stage, ...], width: int, down: bool, where: str) -> int:
    for i, s in enumerate(stages):
        if isinstance(s, PatchSpec):
            if down:
                width *= s.patch_size
            elif width % s.patch_size:
                raise CheckpointError(f"{where}[{i}]: {width} channels do not unpatch by {s.patch_size}")
            else:
                width //= s.patch_size
        else:
            if s.input_dimension != width:
                raise CheckpointError(f"{where}[{i}]: input_dimension {s.input_dimension}, but {width} channels arrive")
            width = s.output_dimension
    return width


def _dtype(name: Any, where: str) -> torch.dtype:
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return _DTYPES[key]

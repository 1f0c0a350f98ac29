"""The modded DAC's quantizer: downsample, pre-transformer, semantic + residual VQ; and back.

Encode (fixture README 8.2): two [strided causal conv, ConvNeXt] stages, the pre transformer,
then per stage a nearest-code search by cosine in the 8-dim projection (the reference's
arithmetic, straight-through sum included, so near ties fall the same way). Stage 0 is the
semantic codebook applied to z; the residual stages apply to z - z_q(semantic), each
subtracting its own z_q. Stages depend on each other, so they run in turn.

Decode (8.3): codes are clamped to each codebook (the LM may emit residual codes up to its own
vocabulary; the reference clamps them, in place: here on a copy), and every stage's embedding
goes through its out_proj in one batched contraction; then the post transformer and two
[causal transposed conv, ConvNeXt] stages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fish_dac_config import FishDacConfig
from .fish_dac_modules import CausalConv, CausalTransposedConv, Conv1d, ConvNeXt, Sequence, StreamStep
from .fish_dac_transformer import WindowTransformer


class VectorQuantizer(nn.Module):
    def __init__(self, dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.in_proj = Conv1d(dim, codebook_dim, 1)
        self.out_proj = Conv1d(codebook_dim, dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim, _weight=torch.empty(codebook_size, codebook_dim))

    def forward(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r (B, dim, T) -> (z_q (B, dim, T), codes (B, T))."""
        z_e = self.in_proj(r)
        B, d, T = z_e.shape
        e = F.normalize(z_e.transpose(1, 2).reshape(B * T, d))
        c = F.normalize(self.codebook.weight)
        dist = e.pow(2).sum(1, keepdim=True) - 2 * e @ c.t() + c.pow(2).sum(1, keepdim=True).t()
        codes = (-dist).max(1)[1].view(B, T)
        z_q = z_e + (self.codebook(codes).transpose(1, 2) - z_e)  # the reference's straight-through sum
        return self.out_proj(z_q), codes


class Quantizers(nn.Module):
    """The checkpoint's `<name>.quantizers.i` list."""

    def __init__(self, n: int, dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.quantizers = nn.ModuleList(VectorQuantizer(dim, codebook_size, codebook_dim) for _ in range(n))


class DownsampleQuantizer(nn.Module):
    def __init__(self, config: FishDacConfig):
        super().__init__()
        dim = config.latent_dim
        self.semantic_quantizer = Quantizers(1, dim, config.semantic_codebook_size, config.codebook_dim)
        self.quantizer = Quantizers(config.n_codebooks, dim, config.codebook_size, config.codebook_dim)
        self.downsample = Sequence(*(Sequence(CausalConv(dim, dim, f, stride=f), ConvNeXt(dim))
                                     for f in config.downsample_factor))
        self.upsample = Sequence(*(Sequence(CausalTransposedConv(dim, dim, f, f), ConvNeXt(dim))
                                   for f in reversed(config.downsample_factor)))
        self.pre_module = WindowTransformer(config.pre_module)
        self.post_module = WindowTransformer(config.post_module)
        self.limits = [config.semantic_codebook_size - 1] + [config.codebook_size - 1] * config.n_codebooks

    @property
    def stages(self) -> list[VectorQuantizer]:
        return [*self.semantic_quantizer.quantizers, *self.quantizer.quantizers]

    def prequant(self, z: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        """Encoder output (B, latent, T) -> the quantizer's input (B, latent, T / 4); offline or one
        streaming chunk."""
        return self.pre_module(self.downsample(z, step), step)

    def encode(self, z: torch.Tensor, n_quantizers: int) -> torch.Tensor:
        """Quantizer input (B, latent, F) -> codes (B, n_quantizers, F)."""
        semantic, *residual = self.stages[:n_quantizers]
        z_q, code = semantic(z)
        r, codes = z - z_q, [code]
        for stage in residual:
            z_q, code = stage(r)
            r = r - z_q
            codes.append(code)
        return torch.stack(codes, dim=1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, k, F), any k <= stages, already checked non-negative -> z (B, latent, F).
        Codes past a codebook's end are clamped to its last entry (on a copy)."""
        k = codes.shape[1]
        stages = self.stages[:k]
        codes = torch.minimum(codes, torch.tensor(self.limits[:k], device=codes.device)[None, :, None])
        tables = [s.codebook.weight for s in stages]
        starts = torch.tensor([0] + [t.shape[0] for t in tables[:-1]], device=codes.device).cumsum(0)
        vectors = F.embedding(codes + starts[None, :, None], torch.cat(tables))  # (B, k, F, d)
        weight = torch.stack([s.out_proj.weight[:, :, 0] for s in stages])  # (k, latent, d)
        bias = torch.stack([s.out_proj.bias for s in stages]).sum(0)
        return torch.einsum("bkfd,kcd->bcf", vectors, weight) + bias[None, :, None]

    def dequantize(self, codes: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        """Codes (B, k, F) -> decoder input (B, latent, 4F); offline or one streaming chunk."""
        return self.upsample(self.post_module(self.embed(codes), step), step)

"""Residual quantizer of the MOSS-Audio-Tokenizer: RLFQ (cosine code choice) or plain RVQ.

The per-stage parameters are stacked (one tensor over the 32 stages) so that decoding is one
gather and one matmul for any number of stages. Encoding is sequential over stages by nature:
each stage quantizes what the previous ones left. Always fp32, whatever the model dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moss_audio_tokenizer_config import QuantizerSpec


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution of x (B, cin, T) by weight (cout, cin): F.conv1d, whose bits the goldens
    hold, except on CUDA, where cuDNN convolves float32 in TF32 by default (about 1e-3 relative,
    enough to move a nearest-codeword choice) while a float32 matmul stays float32 (torch's
    defaults: `cudnn.allow_tf32` on, `cuda.matmul.allow_tf32` off)."""
    if x.device.type == "cuda":
        return pointwise_by_matmul(x, weight, bias)
    return F.conv1d(x, weight[:, :, None], bias)


def pointwise_by_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`pointwise`'s product as a matmul (the same sums in another order)."""
    return torch.matmul(weight, x) + bias[:, None]


class Conv1x1(nn.Module):
    """A weight-normalised 1x1 conv of the checkpoint, folded to W = g * v / |v| at load."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin))
        self.bias = nn.Parameter(torch.empty(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, T) -> (B, cout, T)
        return pointwise(x, self.weight, self.bias)


class ResidualQuantizer(nn.Module):
    def __init__(self, spec: QuantizerSpec):
        super().__init__()
        self.spec = spec
        n, k, cd, rvq = spec.num_quantizers, spec.codebook_size, spec.codebook_dim, spec.rvq_dim
        self.input_proj = Conv1x1(spec.input_dim, rvq) if spec.input_dim != rvq else nn.Identity()
        self.output_proj = Conv1x1(rvq, spec.output_dim) if rvq != spec.output_dim else nn.Identity()
        self.codebooks = nn.Parameter(torch.empty(n, k, cd))
        self.projected = rvq != cd
        if self.projected:
            self.in_proj_weight = nn.Parameter(torch.empty(n, cd, rvq))
            self.in_proj_bias = nn.Parameter(torch.empty(n, cd))
            self.out_proj_weight = nn.Parameter(torch.empty(n, rvq, cd))
            self.out_proj_bias = nn.Parameter(torch.empty(n, rvq))

    def encode(self, e: torch.Tensor, lengths: torch.Tensor, n_quantizers: int) -> torch.Tensor:
        """Encoder output (B, input_dim, T) -> codes (n_quantizers, B, T); frames past a row's
        length see a zero residual (they get the padding code of spec 5.5)."""
        residual = self.input_proj(e.float())
        mask = (torch.arange(residual.shape[2], device=e.device) < lengths[:, None])[:, None, :]
        codes = []
        for i in range(n_quantizers):
            idx = self.nearest(i, self.stage_in(i, residual * mask))
            residual = residual - self.stage_out(i, idx) * mask
            codes.append(idx)
        return torch.stack(codes)

    def stage_in(self, i: int, residual: torch.Tensor) -> torch.Tensor:
        """Stage i's latent z_e (B, codebook_dim, T) of a (masked) residual (B, rvq_dim, T)."""
        if not self.projected:
            return residual
        return pointwise(residual, self.in_proj_weight[i], self.in_proj_bias[i])

    def nearest(self, i: int, z_e: torch.Tensor) -> torch.Tensor:
        """Index (B, T) of the closest codeword: on unit vectors for RLFQ, raw for RVQ."""
        B, cd, T = z_e.shape
        x, book = z_e.transpose(1, 2).reshape(-1, cd), self.codebooks[i]
        if self.spec.quantizer_type == "rlfq":
            x, book = F.normalize(x), F.normalize(book)
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ book.t() + book.pow(2).sum(1, keepdim=True).t()
        return (-dist).max(1)[1].reshape(B, T)

    def stage_out(self, i: int, idx: torch.Tensor) -> torch.Tensor:
        """Stage i's reconstruction (B, rvq_dim, T) of codes (B, T), from the raw codeword."""
        words = F.embedding(idx, self.codebooks[i]).transpose(1, 2)
        if not self.projected:
            return words
        return pointwise(words, self.out_proj_weight[i], self.out_proj_bias[i])

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the first k stages' reconstructions (B, rvq_dim, T) of codes (k, B, T)."""
        k, B, T = codes.shape
        stage = torch.arange(k, device=codes.device)[:, None, None]
        words = self.codebooks[stage, codes]  # (k, B, T, cd)
        if not self.projected:
            return words.sum(0).transpose(1, 2)
        # All stages in one matmul: contract over (stage, codebook_dim) together.
        rvq, cd = self.spec.rvq_dim, self.spec.codebook_dim
        x = words.permute(1, 2, 0, 3).reshape(B, T, k * cd)
        w = self.out_proj_weight[:k].permute(1, 0, 2).reshape(rvq, k * cd)
        return (x @ w.t() + self.out_proj_bias[:k].sum(0)).transpose(1, 2)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (k, B, T), any 1 <= k <= num_quantizers -> decoder input (B, output_dim, T)."""
        return self.output_proj(self.dequantize(codes))

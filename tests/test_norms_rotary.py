"""The fused forms of the Qwen3 layers give the bits of the formulas they replace: RMSNorm through
`F.rms_norm`, q and k normalised in one call, rotation by a signed sin table and one `roll`."""
from __future__ import annotations

import pytest
import torch

from mossserve.layers.attention import Qwen3Attention
from mossserve.layers.norms import RMSNorm
from mossserve.layers.rotary import RotaryEmbedding, rotate

DTYPES = [torch.float32, torch.bfloat16]


def written_out_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm as transformers writes it."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half_formula(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 7, 512), (2, 5, 12, 64), (4, 2048), (1, 1, 8, 128)])
def test_rms_norm_is_the_written_out_formula(dtype, shape) -> None:
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    norm = RMSNorm(shape[-1], 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    assert torch.equal(norm(x), written_out_norm(x, norm.weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotation_is_rotate_half(dtype) -> None:
    rope = RotaryEmbedding(64, 1_000_000.0)
    positions = torch.tensor([[0, 1, 2], [500, 9000, 33]])
    cos, sin = rope.cos_sin(positions, 9001, dtype)
    assert cos.shape == sin.shape == (2, 3, 1, 64)
    angles = positions[..., None].float() * (1.0 / 1_000_000.0 ** (torch.arange(0, 64, 2).float() / 64))
    plain_sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, :, None].to(dtype)
    x = torch.randn(2, 3, 12, 64).to(dtype)
    assert torch.equal(rotate(x, cos, sin), rotate_half_formula(x, cos, plain_sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_q_and_k_normalised_together_equal_their_own_norms(dtype) -> None:
    torch.manual_seed(0)
    attn = Qwen3Attention(hidden=96, heads=4, kv_heads=2, head_dim=16, eps=1e-6).to(dtype)
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.randn(16))
        attn.k_norm.weight.copy_(torch.randn(16))
    qk = (torch.randn(2, 5, 6, 16) * 2).to(dtype)
    together = attn._norm_qk(qk)
    assert torch.equal(together[:, :, :4], attn.q_norm(qk[:, :, :4]))
    assert torch.equal(together[:, :, 4:], attn.k_norm(qk[:, :, 4:]))

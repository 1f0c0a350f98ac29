"""The modded DAC's convolutional building blocks, offline and streaming (fixture README 8.1).

Every block is causal, so the encoder and decoder can run chunk by chunk if each convolution keeps
the last inputs it needs as left context. Streaming blocks read and write that context in a `StreamStep`:
one dict of per-row state tensors (batch first) for a whole decode path, keyed by module name,
which the multi-stream decoder gathers and scatters by row. Chunks of one call may differ in
length (right-padded to the longest): causality keeps padding out of real outputs, and each
row's new context is taken at its own real length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StreamStep:
    """One streaming call for a batch of rows: real code frames per row and the state it advances."""

    frames: torch.Tensor  # (B,) real frames of each row's chunk
    max_frames: int  # padded chunk length of the call
    state: dict[str, torch.Tensor]  # module key -> (B, ...) state, replaced as the call runs

    def lengths(self, x: torch.Tensor) -> torch.Tensor:
        """Real steps per row of a tensor (B, C, T) of this call (T = max_frames times a rate)."""
        return self.frames * (x.shape[-1] // self.max_frames)

    def carry(self, key: str, full: torch.Tensor, lengths: torch.Tensor, n: int) -> None:
        """Keep `full[:, :, L_b : L_b + n]` of each row: the last n real steps once the n-step
        context in front of the chunk is counted."""
        index = (lengths[:, None] + torch.arange(n, device=full.device))[:, None, :].expand(-1, full.shape[1], -1)
        self.state[key] = full.gather(2, index)


class Streamable(nn.Module):
    """A block with streaming state; `key` is its module name, set by the model."""

    key = ""

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """State entries per row: (shape without the batch axis, dtype or None for the model's);
        zero at the start of a stream."""
        return {}


class Conv1d(nn.Conv1d):
    """nn.Conv1d that convolves half-precision input on a CPU in float32 and rounds the result
    back: torch's CPU bf16 conv1d returns garbage for some shapes (torch 2.13: 16 -> 32 channels,
    kernel 16, stride 8, the fixture encoder's strided conv; which shapes is not predictable), so
    every Conv1d of the codec takes this path there (transposed convs measured fine). float32 and
    other devices run nn.Conv1d as is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)


class CausalConv(Streamable):
    """Left-pads K - stride zeros (K the dilated kernel) and right-pads to whole stride windows."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = Conv1d(cin, cout, kernel, stride=stride, dilation=dilation, groups=groups)
        self.stride = stride
        self.pad = (kernel - 1) * dilation + 1 - stride

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        # A strided one (the encoder's) streams chunks of whole stride windows, as whole frames are.
        return {self.key: ((self.conv.in_channels, self.pad), None)} if self.pad else {}

    def forward(self, x: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        if step is None:
            return self.conv(F.pad(x, (self.pad, -x.shape[-1] % self.stride)))
        if self.pad:
            full = torch.cat([step.state[self.key], x], dim=-1)
            step.carry(self.key, full, step.lengths(x), self.pad)
            x = full
        return self.conv(x)


class CausalTransposedConv(Streamable):
    """Transposed convolution with the last kernel - stride samples dropped. Streaming keeps the
    kernel / stride - 1 previous input frames, whose overlap completes this chunk's first outputs."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        if kernel % stride:
            raise ValueError("the kernel of a causal transposed convolution must be a multiple of its stride")
        self.conv = nn.ConvTranspose1d(cin, cout, kernel, stride=stride)
        self.stride = stride
        self.context = kernel // stride - 1

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        return {self.key: ((self.conv.in_channels, self.context), None)} if self.context else {}

    def forward(self, x: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        T, c, s = x.shape[-1], self.context, self.stride
        if step is not None and c:
            full = torch.cat([step.state[self.key], x], dim=-1)
            step.carry(self.key, full, step.lengths(x), c)
            return self.conv(full)[:, :, c * s: (c + T) * s]
        return self.conv(x)[:, :, : T * s]


class Snake(nn.Module):
    """x + sin²(αx) / (α + 1e-9), α per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        # The reference's operations in its order, in place on one temporary (these tensors run
        # at up to 44.1 kHz, where the decoder is memory-bound).
        y = torch.sin(self.alpha * x).square_().mul_((self.alpha + 1e-9).reciprocal())
        return y.add_(x)


class Sequence(nn.Module):
    """Blocks in order under the names 0, 1, ... (the checkpoint's `block.i` / `model.i`)."""

    def __init__(self, *blocks: nn.Module):
        super().__init__()
        for i, block in enumerate(blocks):
            self.add_module(str(i), block)

    def forward(self, x: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        for block in self.children():
            x = block(x, step)
        return x


class Stage(nn.Module):
    """An encoder or decoder block: its layers under `block` (the checkpoint's nesting)."""

    def __init__(self, *blocks: nn.Module):
        super().__init__()
        self.block = Sequence(*blocks)

    def forward(self, x: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        return self.block(x, step)


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv7_dilated(snake(x))))."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.block = Sequence(Snake(channels), CausalConv(channels, channels, 7, dilation=dilation),
                              Snake(channels), CausalConv(channels, channels, 1))

    def forward(self, x: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        return self.block(x, step).add_(x)


class ConvNeXt(nn.Module):
    """Causal depthwise conv7 -> LayerNorm over channels -> Linear 4x -> GELU -> Linear -> γ, plus x."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        h = self.norm(self.dwconv(x, step).transpose(1, 2))
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.transpose(1, 2)


def encoder_block(width: int, stride: int, transformer: nn.Module | None) -> Stage:
    """Residual units on width/2 channels, snake, strided conv to `width`, [transformer]."""
    half = width // 2
    blocks = [ResidualUnit(half, d) for d in (1, 3, 9)]
    blocks += [Snake(half), CausalConv(half, width, 2 * stride, stride=stride)]
    return Stage(*blocks, *([transformer] if transformer is not None else []))


def decoder_block(width: int, stride: int) -> Stage:
    """Snake, transposed conv `width` -> width/2 (upsampling by stride), residual units."""
    half = width // 2
    return Stage(Snake(width), CausalTransposedConv(width, half, 2 * stride, stride),
                    *(ResidualUnit(half, d) for d in (1, 3, 9)))


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W = g · v / ‖v‖, the norm over every axis but the first."""
    v = v.float()
    norm = v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))
    return v * (g.float() / norm)

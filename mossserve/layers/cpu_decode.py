"""A decode step's or a prefill piece's Qwen3 decoder layers in one call of our bf16 CPU kernel
(layers/cpu_kernels.py).

Around its four products a Qwen3 layer runs about sixty small torch ops per decode step (norms,
q/k norms, rotary, cache writes, attention, SwiGLU, residuals), each costing 2-20 us of dispatch
whatever its size: at the bench checkpoint's width they took as long as the products. For bf16
rows written to the slot cache, `cpu_bf16.c` runs every layer of the backbone in one call and one
OpenMP region, rounding to bf16 wherever torch's bf16 layer does, so its output differs from
torch's only by the order of the fp32 sums inside norms and attention (tests/test_cpu_decode.py).
A prefill piece's rows go in the same call where AMX tiles take them: every row's keys and values
are in the cache before any row attends, and each attends to its own position and those before.
float32 keeps torch's layers: its results are to equal the reference's bit for bit.
"""
from __future__ import annotations

import ctypes
import functools
import weakref

import torch
from torch import nn

from .batch_context import BatchContext
from .cpu_kernels import bf16_kernels, kernels_off
from .rotary import RotaryEmbedding

MAX_HEAD_DIM = 512  # cpu_bf16.c keeps a head in a fixed-size buffer
MAX_DECODE_ROWS = 16  # rows the kernel takes on any AVX-512 CPU
# Past 16 rows (a prefill piece, on AMX only) the kernel's products read x's tiles from L2: once x
# (rows x the widest product's k, bf16) outgrows this, torch's layers are faster (docs/performance.md).
PREFILL_X_BYTES = 1_250_000
# Each layer stack's weight Parameters in the kernel's order, gathered once: walking the modules
# took 260 us a call on the bench checkpoint. Loading and dtype or device moves change a
# Parameter's data in place, so the pointers are read again at every call; the checks of dtype and
# layout (25 us for 64 weights) and the kernel's pointer array are redone only when one changed.
_weights_of: weakref.WeakKeyDictionary[nn.ModuleList, tuple[torch.Tensor, ...]] = weakref.WeakKeyDictionary()
_checked: weakref.WeakKeyDictionary[nn.ModuleList, tuple[tuple[int, ...], ctypes.Array | None]] = \
    weakref.WeakKeyDictionary()


def decode_layers(layers: nn.ModuleList, rotary: RotaryEmbedding | None, x: torch.Tensor, ctx: BatchContext,
                  cache_k: torch.Tensor | None, cache_v: torch.Tensor | None) -> torch.Tensor | None:
    """x (B, T, H) through every layer of `layers` (models/qwen3.py's Qwen3DecoderLayer, rotated by
    `rotary`; None for layers without rotary, as MOSS-TTS-Local's depth transformer's) with the
    slot cache (layers, slots, kv_heads, max_len, d), by the kernel; None where it does not apply
    (the caller then runs torch's layers): not CPU bf16, more rows (B x T) than MAX_DECODE_ROWS
    without AMX tiles or than PREFILL_X_BYTES allows with them, no cache, a weight or cache that is
    not contiguous bf16, a head size the kernel does not take, a slot or position outside the cache,
    autograd recording, or the kernels off or unavailable."""
    rows = x.shape[0] * x.shape[1] if x.dim() == 3 else 0  # B x T, each through the layers
    if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or rows == 0 or cache_k is None or ctx.slots is None
            or kernels_off()):
        return None
    attention = layers[0].self_attn
    d, heads, kv_heads = attention.head_dim, attention.heads, attention.kv_heads
    weights = _kernel_weights(layers)
    if (weights is None or d % 2 or d > MAX_HEAD_DIM or heads % kv_heads or cache_k.dim() != 5
            or cache_k.shape[0] != len(layers) or any(t.dtype != torch.bfloat16 or not t.is_contiguous()
                                                       for t in (cache_k, cache_v))
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (*_weights_of[layers], cache_k, cache_v)))):
        return None
    kernels = bf16_kernels()
    widest = max(x.shape[2], heads * d, layers[0].mlp.intermediate)
    if kernels is None or (rows > MAX_DECODE_ROWS and not (kernels.amx and rows * widest * 2 <= PREFILL_X_BYTES)):
        return None
    positions = ctx.positions.reshape(-1).contiguous()
    slots = ctx.slots.contiguous() if x.shape[1] == 1 else ctx.slots.repeat_interleave(x.shape[1])
    if rotary is not None:
        rotary.reserve(ctx.kv_len, x.device)
    out = x.reshape(rows, -1).clone()
    dims = _dims(out.shape[1], heads, kv_heads, d, layers[0].mlp.intermediate, cache_k.shape[1], cache_k.shape[3],
                 int(attention.qk_norm), 0 if rotary is None else len(rotary.cos_table))
    declined = kernels.decode(out.data_ptr(), out.shape[0], weights, len(layers),
                   cache_k.data_ptr(), cache_v.data_ptr(), slots.data_ptr(), positions.data_ptr(),
                   None if rotary is None else rotary.cos_table.data_ptr(),
                   None if rotary is None else rotary.sin_table.data_ptr(), dims.data_ptr(), attention.eps,
                   torch.get_num_threads())
    # A slot or position outside the cache or the rotary tables: the kernel touched nothing, and torch's
    # layers raise the indexing error.
    return None if declined else out.view(x.shape)


@functools.lru_cache(maxsize=64)
def _dims(*sizes: int) -> torch.Tensor:
    """The kernel's Dims struct (cpu_bf16.c), made once per set of sizes."""
    return torch.tensor(sizes, dtype=torch.int64)


def _kernel_weights(layers: nn.ModuleList) -> ctypes.Array | None:
    """The layers' weight pointers as the kernel takes them, or None if one is not contiguous bf16."""
    if layers not in _weights_of:
        _weights_of[layers] = tuple(t for layer in layers for t in _layer_weights(layer))
    tensors = _weights_of[layers]
    pointers = tuple(t.data_ptr() for t in tensors)
    known = _checked.get(layers)
    if known is None or known[0] != pointers:
        usable = all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors)
        known = _checked[layers] = (pointers, (ctypes.c_void_p * len(pointers))(*pointers) if usable else None)
    return known[1]


def _layer_weights(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    """A layer's weights in the order cpu_bf16.c reads them; the q/k norms' places hold the input
    norm's weight (unread) where the model has none."""
    attention, mlp = layer.self_attn, layer.mlp
    q_norm, k_norm = ((attention.q_norm.weight, attention.k_norm.weight) if attention.qk_norm
                      else (layer.input_layernorm.weight,) * 2)
    return (layer.input_layernorm.weight, attention.qkv_proj.weight, q_norm, k_norm, attention.o_proj.weight,
            layer.post_attention_layernorm.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight)

"""MossTTSRealtime: a Qwen3 backbone over 17 summed embeddings, and a local depth transformer.

The backbone reads rows `[text, a_0 .. a_15]` (one text table, sixteen audio tables summed by one
embedding_bag, like the Delay model) and has no output head. The local transformer turns the
backbone's last hidden state `h` into one frame: position 0 reads `h` itself, position i >= 1
reads the local embedding of code a_{i-1}, and head i scores codebook i over 1027 entries. Its
KV cache lives for one frame (16 positions), so it is a plain batch-indexed tensor pair.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.batch_context import BatchContext
from ..layers.code_embedding import sum_code_embeddings
from ..layers.cpu_decode import decode_layers
from ..layers.heads import project
from ..layers.norms import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..loader import build_on_meta, load_weights, weight_files
from .moss_realtime_config import MossRealtimeConfig
from .qwen3 import Qwen3DecoderLayer, Qwen3Model


class RealtimeLocalTransformer(nn.Module):
    """The depth transformer: 16 positions per frame, RoPE positions 0..15, qk-norm, GQA."""

    def __init__(self, config: MossRealtimeConfig) -> None:
        super().__init__()
        c = config.local
        self.rvq, self.codes = config.rvq, config.audio_vocab_size
        self.config = c
        self.embed = nn.Parameter(torch.empty((config.rvq - 1) * self.codes, c.hidden_size))  # table j at rows j*codes
        self.layers = nn.ModuleList(Qwen3DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.heads = nn.Parameter(torch.empty(config.rvq * self.codes, c.hidden_size))  # head i at rows i*codes
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta)

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh per-frame cache (layers, batch, kv_heads, 16, d) for K and V."""
        c = self.config
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, self.rvq, c.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def embed_codes(self, codebook: torch.Tensor | int, codes: torch.Tensor) -> torch.Tensor:
        """Input of position codebook+1: the local embedding of `codes` in table `codebook` (0..14)."""
        return F.embedding(codes + codebook * self.codes, self.embed)

    def head(self, codebook: int, out: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., 1027) fp32 logits of one codebook."""
        return project(out, self.heads[codebook * self.codes : (codebook + 1) * self.codes]).float()

    def step(self, x: torch.Tensor, position: int, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One position for every row: x (B, H) -> logits (B, 1027) of codebook `position`."""
        batch = x.shape[0]
        positions = torch.full((batch, 1), position, dtype=torch.int64, device=x.device)
        ctx = BatchContext.from_positions(positions, torch.arange(batch, device=x.device), position + 1)
        out = self._layers(x[:, None], ctx, *cache)[:, 0]
        return self.head(position, out)

    def teacher_forced(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """All 16 positions at once without a cache: h (B, H), codes (B, 15) -> logits (B, 16, 1027)."""
        batch = h.shape[0]
        tables = torch.arange(self.rvq - 1, device=h.device)
        x = torch.cat([h[:, None], self.embed_codes(tables, codes)], dim=1)
        ctx = BatchContext.build([0] * batch, self.rvq, None, h.device)
        out = self._layers(x, ctx, None, None)
        return torch.stack([self.head(i, out[:, i]) for i in range(self.rvq)], dim=1)

    def _layers(self, x, ctx, cache_k, cache_v) -> torch.Tensor:
        fused = decode_layers(self.layers, self.rotary, x, ctx, cache_k, cache_v)
        if fused is not None:
            return self.norm(fused)
        rotary = self.rotary.cos_sin(ctx.positions, ctx.kv_len, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, rotary, None if cache_k is None else cache_k[i], None if cache_v is None else cache_v[i])
        return self.norm(x)


class MossRealtimeModel(nn.Module):
    def __init__(self, config: MossRealtimeConfig) -> None:
        super().__init__()
        self.config = config
        self.codes = config.audio_vocab_size
        self.language_model = Qwen3Model(config.language)  # its embed_tokens is the text table (published embed_tokens.0)
        self.audio_embed = nn.Parameter(torch.empty(config.rvq * self.codes, config.language.hidden_size))
        self.local = RealtimeLocalTransformer(config)

    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, T, 17) -> (B, T, H): text embedding + the sixteen codebook embeddings."""
        text = self.language_model.embed_tokens(rows[..., 0])
        return text + sum_code_embeddings(rows[..., 1:], self.audio_embed, self.codes)

    def forward(self, rows: torch.Tensor, ctx: BatchContext, cache_k: torch.Tensor | None = None,
                cache_v: torch.Tensor | None = None, hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        return self.language_model(self.embed(rows), ctx, cache_k, cache_v, hidden_states)

    def zero_audio_pad_rows(self) -> None:
        """Row 1024 of every backbone audio table is zero, as the reference's loading leaves it (README §8.6)."""
        with torch.no_grad():
            pads = torch.arange(self.config.rvq, device=self.audio_embed.device) * self.codes + self.config.audio_pad_code
            self.audio_embed[pads] = 0

    def checkpoint_layout(self) -> dict[str, tuple[str, int]]:
        """Published name -> (parameter, first row). `language_model.embed_tokens.weight` is stored but never
        used by the reference; `load_realtime_model` consumes it without keeping it."""
        layout = {
            name: (f"language_model.{param}", row)
            for name, (param, row) in self.language_model.checkpoint_layout("language_model.").items()
            if name != "language_model.embed_tokens.weight"
        }
        layout["embed_tokens.0.weight"] = ("language_model.embed_tokens.weight", 0)
        for k in range(self.config.rvq):
            layout[f"embed_tokens.{k + 1}.weight"] = ("audio_embed", k * self.codes)
            layout[f"local_transformer.local_lm_heads.{k}.weight"] = ("local.heads", k * self.codes)
        for j in range(self.config.rvq - 1):
            layout[f"local_transformer.model.embed_tokens.{j}.weight"] = ("local.embed", j * self.codes)
        # The local layers use Qwen3's names and fusions; Qwen3Model's layout reads nothing but `config`.
        local_layout = Qwen3Model.checkpoint_layout(SimpleNamespace(config=self.local.config), "local_transformer.model.")
        for name, (param, row) in local_layout.items():
            if "embed_tokens" not in name:
                layout[name] = (f"local.{param}", row)
        return layout


def load_realtime_model(model_dir: Path, config: MossRealtimeConfig, device: torch.device | str,
                        dtype: torch.dtype) -> MossRealtimeModel:
    """Strict load of the published layout. The unused `language_model.embed_tokens.weight` is read into a
    meta-device sink, so it is checked (name and shape) but never allocated."""
    model = build_on_meta(lambda: MossRealtimeModel(config), dtype, device)
    holder = nn.Module()
    holder.model = model
    holder.unused_text_embedding = nn.Parameter(
        torch.empty(config.language.vocab_size, config.language.hidden_size, dtype=dtype, device="meta"))
    layout = {name: (f"model.{param}", row) for name, (param, row) in model.checkpoint_layout().items()}
    layout["language_model.embed_tokens.weight"] = ("unused_text_embedding", 0)
    load_weights(holder, weight_files(model_dir), layout)
    model.zero_audio_pad_rows()
    return model.eval().requires_grad_(False)

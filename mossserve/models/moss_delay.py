"""MossTTSDelayModel: a Qwen3 backbone over summed text + audio embeddings, n_vq + 1 heads.

All audio embeddings live in one table (codebook j at rows j*(A+1) ..) so a row's audio
channels are summed by one embedding_bag, and all audio heads are one matmul.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers.batch_context import BatchContext
from ..layers.code_embedding import sum_code_embeddings
from ..layers.heads import project, project_blocks
from .moss_delay_config import MossDelayConfig
from .qwen3 import Qwen3Model


class MossDelayModel(nn.Module):
    def __init__(self, config: MossDelayConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.language.hidden_size
        self.codes_per_head = config.audio_vocab_size + 1
        self.language_model = Qwen3Model(config.language)
        self.audio_embed = nn.Parameter(torch.empty(config.n_vq * self.codes_per_head, hidden))
        self.text_head = nn.Linear(hidden, config.language.vocab_size, bias=False)
        self.audio_head = nn.Linear(hidden, config.n_vq * self.codes_per_head, bias=False)

    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, T, 1 + n_vq) -> (B, T, H): text embedding + every codebook's embedding."""
        text = self.language_model.embed_tokens(rows[..., 0])
        return text + sum_code_embeddings(rows[..., 1:], self.audio_embed, self.codes_per_head)

    def forward(
        self,
        rows: torch.Tensor,
        ctx: BatchContext,
        cache_k: torch.Tensor | None = None,
        cache_v: torch.Tensor | None = None,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self.language_model(self.embed(rows), ctx, cache_k, cache_v, hidden_states)

    def text_logits(self, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(..., H) -> text logits over the vocabulary, or over `ids` only."""
        weight = self.text_head.weight if ids is None else self.text_head.weight[ids]
        return project(hidden, weight).float()

    def audio_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., n_vq, A + 1) with the pad code's logit at -inf, as the reference sets it."""
        logits = project_blocks(hidden, self.audio_head.weight, self.config.n_vq).float()
        logits[..., self.config.audio_pad_code] = float("-inf")
        return logits

    def checkpoint_layout(self) -> dict[str, tuple[str, int]]:
        layout = {
            name: (f"language_model.{param}", row)
            for name, (param, row) in self.language_model.checkpoint_layout("language_model.").items()
        }
        layout["lm_heads.0.weight"] = ("text_head.weight", 0)
        for j in range(self.config.n_vq):
            layout[f"emb_ext.{j}.weight"] = ("audio_embed", j * self.codes_per_head)
            layout[f"lm_heads.{j + 1}.weight"] = ("audio_head.weight", j * self.codes_per_head)
        return layout

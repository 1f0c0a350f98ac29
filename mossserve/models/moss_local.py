"""MOSS-TTS-Local-Transformer: a Qwen3 backbone over summed channel embeddings, plus a depth
transformer that turns the backbone's state into one frame, channel by channel.

Backbone input: the sum of the text embedding and every codebook's embedding of a row. A code of
SKIPPED (-1) is not embedded: that is how a request at reduced depth K makes the backbone ignore
channels above K (upstream embeds only channels 0..K, also for prompt rows holding codes there).

Depth step c (0 = text, c >= 1 codebook c): the depth transformer's output at position c -> the
bridge MLP Q_c -> RMSNorm_c -> head c. Its inputs are P(h) and then P(embedding_c(token_c)), with
the same embedding tables as the backbone and one shared bridge P.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.batch_context import BatchContext
from ..layers.code_embedding import sum_code_embeddings
from ..layers.heads import project
from .moss_local_config import MossLocalConfig
from .moss_local_transformer import BridgeMLPs, DepthCache, LocalTransformer, rms_norm
from .qwen3 import Qwen3Model

SKIPPED = -1  # a code the backbone does not embed (channels above a request's depth)


class MossLocalModel(nn.Module):
    def __init__(self, config: MossLocalConfig) -> None:
        super().__init__()
        self.config = config
        hidden, local = config.language.hidden_size, config.local.hidden_size
        self.codes_per_head = config.audio_vocab_size + 1
        self.language_model = Qwen3Model(config.language)
        self.text_embed = nn.Embedding(config.language.vocab_size, hidden)
        self.audio_embed = nn.Parameter(torch.empty(config.n_vq * self.codes_per_head, hidden))
        self.local_transformer = LocalTransformer(config.local)
        self.bridge_in = BridgeMLPs(1, hidden, config.bridge_ffn_size, local)
        self.bridge_out = BridgeMLPs(config.channels, local, config.bridge_ffn_size, hidden)
        self.head_norms = nn.Parameter(torch.empty(config.channels * hidden))
        self.text_head = nn.Linear(hidden, config.language.vocab_size, bias=False)
        self.audio_head = nn.Parameter(torch.empty(config.n_vq * self.codes_per_head, hidden))

    # ---- backbone --------------------------------------------------------------------------
    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, T, 1 + n_vq) -> (B, T, H): text embedding + the embeddings of every code that is not SKIPPED."""
        codes = rows[..., 1:]
        return self.text_embed(rows[..., 0]) + sum_code_embeddings(codes, self.audio_embed, self.codes_per_head,
                                                                   kept=codes != SKIPPED)

    def forward(
        self,
        rows: torch.Tensor,
        ctx: BatchContext,
        cache_k: torch.Tensor | None = None,
        cache_v: torch.Tensor | None = None,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Final-normed backbone states (B, T, H): what the depth loop starts from."""
        return self.language_model(self.embed(rows), ctx, cache_k, cache_v, hidden_states)

    # ---- depth transformer -----------------------------------------------------------------
    def new_depth_cache(self, batch: int, positions: int) -> DepthCache:
        weight = self.audio_head
        return DepthCache.empty(self.config.local, batch, positions, weight.dtype, weight.device)

    def depth_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """P: backbone-width vectors (B, H) -> depth-transformer inputs (B, Hl)."""
        return self.bridge_in(hidden)

    def token_input(self, channel: int, tokens: torch.Tensor) -> torch.Tensor:
        """The depth input after choosing `tokens` (B,) on `channel`: P(embedding_channel(token))."""
        if channel == 0:
            return self.depth_input(self.text_embed(tokens))
        start = (channel - 1) * self.codes_per_head
        return self.depth_input(F.embedding(tokens + start, self.audio_embed))

    def depth_logits(self, x: torch.Tensor, cache: DepthCache, channel: int) -> torch.Tensor:
        """Feed x (B, Hl) at depth `channel`; the logits of that channel (B, V or A + 1), float32,
        raw (the audio pad code is not masked here)."""
        out = self.local_transformer.step(x, cache, channel)
        hidden = self.config.language.hidden_size
        y = rms_norm(self.bridge_out(out, channel), self.head_norms[channel * hidden : (channel + 1) * hidden],
                     self.config.language.rms_norm_eps)
        if channel == 0:
            return project(y, self.text_head.weight).float()
        start = (channel - 1) * self.codes_per_head
        return project(y, self.audio_head[start : start + self.codes_per_head]).float()

    def teacher_forced_logits(self, hidden: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """Every channel's logits (raw) with the depth inputs forced from `labels` (N, 1 + n_vq):
        channel c sees P(h) and the labels of channels 0..c-1 (upstream's training path)."""
        cache = self.new_depth_cache(hidden.shape[0], self.config.channels)
        x, logits = self.depth_input(hidden), []
        for channel in range(self.config.channels):
            logits.append(self.depth_logits(x, cache, channel))
            if channel + 1 < self.config.channels:
                x = self.token_input(channel, labels[:, channel])
        return logits

    # ---- loading ---------------------------------------------------------------------------
    def checkpoint_layout(self) -> dict[str, tuple[str, int]]:
        cfg = self.config
        layout = {
            f"model.{name}": (f"language_model.{param}", row)
            for name, (param, row) in self.language_model.checkpoint_layout("language_model.").items()
        }
        layout.update({
            name: (f"local_transformer.{param}", row)
            for name, (param, row) in self.local_transformer.checkpoint_layout("local_transformer.").items()
        })
        layout["model.embedding_list.0.weight"] = ("text_embed.weight", 0)
        layout["lm_heads.0.weight"] = ("text_head.weight", 0)
        for j in range(cfg.n_vq):
            layout[f"model.embedding_list.{j + 1}.weight"] = ("audio_embed", j * self.codes_per_head)
            layout[f"lm_heads.{j + 1}.weight"] = ("audio_head", j * self.codes_per_head)
        layout.update(self.bridge_in.checkpoint_layout(["speech_embedding_to_local_mlp"], "bridge_in."))
        layout.update(self.bridge_out.checkpoint_layout(
            [f"local_to_speech_embedding_mlps.{c}" for c in range(cfg.channels)], "bridge_out."))
        for c in range(cfg.channels):
            layout[f"layer_norm_before_lm_heads.{c}.weight"] = ("head_norms", c * cfg.language.hidden_size)
        return layout

    def drop_unused_weights(self) -> None:
        """Free Qwen3's own embedding once loaded: upstream stores it but always passes embeddings."""
        self.language_model.embed_tokens = None

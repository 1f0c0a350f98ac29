"""The sum of a row's codebook embeddings, every family's backbone input besides its text token.

All codebooks' tables live in one (K * codes_per_head, H) table, codebook j at rows
j * codes_per_head .., so a row's K codes are summed by one embedding_bag.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sum_code_embeddings(codes: torch.Tensor, table: torch.Tensor, codes_per_head: int,
                        kept: torch.Tensor | None = None) -> torch.Tensor:
    """codes (B, T, K) -> (B, T, H). `kept` (B, T, K) bool: False marks codes left out of the sum."""
    batch, length, books = codes.shape
    offsets = torch.arange(books, device=codes.device) * codes_per_head
    if kept is None:
        return F.embedding_bag((codes + offsets).reshape(batch * length, -1), table, mode="sum").view(batch, length, -1)
    ids = (torch.where(kept, codes, 0) + offsets).reshape(batch * length, -1)
    weights = kept.reshape(batch * length, -1).to(table.dtype)
    return F.embedding_bag(ids, table, per_sample_weights=weights, mode="sum").view(batch, length, -1)

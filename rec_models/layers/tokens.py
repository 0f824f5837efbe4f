"""Field tokens for the token-level methods: "a feature field's embedding is a token".

``PublicTokens`` looks up the public user and item fields once (one FieldEmbeddings, so
teachers and students can share it); ``TokenEncoder`` is a small pre-norm transformer
whose layers can return their attention maps (cross-encoder attention, VIRT, ERNIE-Search
distil them).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from rec_models.layers.embeddings import FieldEmbeddings
from rec_models.spec import FeatureSpec

Batch = Mapping[str, torch.Tensor]


class PublicTokens(nn.Module):
    """Public user fields -> [B, Fu, D] and item fields -> [B, Fi, D]; privileged never."""

    def __init__(self, spec: FeatureSpec, dim: int, embeddings: Optional[FieldEmbeddings] = None):
        super().__init__()
        user, item = spec.user_features, spec.item_features
        if not user or not item:
            raise ValueError("token models need at least one user and one item feature")
        self.user_names = [f.name for f in user]
        self.item_names = [f.name for f in item]
        owners = [spec.embedding_table_owner(f).name for f in (*user, *item)]
        spec.assert_public(self.user_names + self.item_names + owners, "public field tokens")
        self.embeddings = embeddings or FieldEmbeddings(spec, (*user, *item), dim)
        spec.assert_public(self.embeddings.names + self.embeddings.table_owners, "public field tokens")
        self.dim = dim

    def user(self, batch: Batch) -> torch.Tensor:
        return self.embeddings.tokens(batch, self.user_names)

    def item(self, batch: Batch) -> torch.Tensor:
        return self.embeddings.tokens(batch, self.item_names)


class AttentionLayer(nn.Module):
    """Pre-norm transformer layer; ``forward`` returns (tokens, attention [B, H, T, T])."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding_dim {dim} is not divisible by {heads} attention heads")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        h = self.norm1(x)
        out, weights = self.attn(h, h, h, need_weights=need_weights, average_attn_weights=False)
        x = x + out
        return x + self.ff(self.norm2(x)), weights


class TokenEncoder(nn.Module):
    """A stack of ``AttentionLayer``s; returns (tokens, last layer's attention or None)."""

    def __init__(self, dim: int, layers: int = 1, heads: int = 2, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(AttentionLayer(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        weights = None
        for i, layer in enumerate(self.layers):
            x, weights = layer(x, need_weights=need_weights and i == len(self.layers) - 1)
        return self.norm(x), weights

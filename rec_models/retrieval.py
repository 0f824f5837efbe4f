"""Exact top-K retrieval by inner product, in bounded memory.

Users come in batches and items in chunks: each chunk's top-K is merged into a running
top-K, so memory is O(users_batch x (K + chunk)), never users x items.
"""
from __future__ import annotations

import numpy as np
import torch


def top_k(users: torch.Tensor, items: torch.Tensor, k: int, item_chunk: int = 262_144,
          exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [U, k] of the k items with the largest <u, v>, best first.

    ``exclude``: optional [U, I] boolean mask of items not to return (e.g. seen in training);
    only sensible for small catalogues, so the chunked path takes it by slicing.
    """
    k = min(k, items.shape[0])
    best_scores = torch.full((users.shape[0], 0), float("-inf"), dtype=users.dtype)
    best_idx = torch.zeros((users.shape[0], 0), dtype=torch.long)
    for start in range(0, items.shape[0], item_chunk):
        scores = users @ items[start:start + item_chunk].T
        if exclude is not None:
            scores = scores.masked_fill(exclude[:, start:start + item_chunk], float("-inf"))
        idx = torch.arange(start, start + scores.shape[1]).expand_as(scores)
        scores = torch.cat([best_scores, scores], dim=1)
        idx = torch.cat([best_idx, idx], dim=1)
        best_scores, pos = scores.topk(min(k, scores.shape[1]), dim=1)
        best_idx = idx.gather(1, pos)
    return best_idx


def pair_keys(user_rows: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """One int64 per (user row, item index) pair, for vectorised set membership."""
    return user_rows.astype(np.int64) * np.int64(n_items) + items.astype(np.int64)

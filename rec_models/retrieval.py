"""Exact top-K retrieval from stored vectors (any score kind), in bounded memory.

Users come in batches and items in chunks: each chunk's top-K is merged into a running
top-K, so memory is O(users_batch x (K + chunk)), never users x items.
"""
from __future__ import annotations

import torch

from rec_models.scoring import score_all

_BUDGET_ELEMENTS = 1 << 27   # about 512 MiB of float32 intermediate scores


def top_k(users: torch.Tensor, items: torch.Tensor, k: int, item_chunk: int = 262_144,
          exclude: torch.Tensor | None = None, score_kind: str = "dot") -> torch.Tensor:
    """Indices [U, k] of the k items with the best score (``rec_models.scoring``), best first.

    ``exclude``: optional [U, I] boolean mask of items not to return (e.g. seen in training);
    only sensible for small catalogues, so the chunked path takes it by slicing.
    """
    k = min(k, items.shape[0])
    # multi-vector kinds materialise U x chunk x (token pairs) similarities: bound that
    per_pair = 1 if score_kind == "dot" else max(1, (users[0].numel() * items[0].numel()) // users.shape[-1])
    item_chunk = max(1, min(item_chunk, _BUDGET_ELEMENTS // max(1, users.shape[0] * per_pair)))
    best_scores = torch.full((users.shape[0], 0), float("-inf"), dtype=users.dtype)
    best_idx = torch.zeros((users.shape[0], 0), dtype=torch.long)
    for start in range(0, items.shape[0], item_chunk):
        scores = score_all(score_kind, users, items[start:start + item_chunk])
        if exclude is not None:
            scores = scores.masked_fill(exclude[:, start:start + item_chunk], float("-inf"))
        idx = torch.arange(start, start + scores.shape[1]).expand_as(scores)
        scores = torch.cat([best_scores, scores], dim=1)
        idx = torch.cat([best_idx, idx], dim=1)
        best_scores, pos = scores.topk(min(k, scores.shape[1]), dim=1)
        best_idx = idx.gather(1, pos)
    return best_idx

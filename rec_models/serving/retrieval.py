"""Exact top-K retrieval from stored vectors (any score kind), in bounded memory.

Users come in batches and items in chunks: each chunk's top-K is merged into a running
top-K, so memory is O(users_batch x (K + chunk)), never users x items. Items a user must
not get back (e.g. seen in training) are given as sparse (row, item) pairs, sorted by item
once, so each chunk sets its own pairs to -inf with one slice and one index_put.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from rec_models.config import check_ks
from rec_models.metrics import ndcg_at_k, recall_at_k, recommended_mask
from rec_models.serving.scoring import score_all

_BUDGET_ELEMENTS = 1 << 27   # about 512 MiB of float32 intermediate scores

Exclusion = Union[torch.Tensor, Sequence]   # dense bool [U, I] mask, or (rows, items) index arrays


def top_k(users: torch.Tensor, items: torch.Tensor, k: int, item_chunk: int = 262_144,
          exclude: Optional[Exclusion] = None, score_kind: str = "dot") -> torch.Tensor:
    """Indices [U, min(k, I)] of the items with the best score (``rec_models.serving.scoring``), best first.

    ``exclude``: items not to return, as ``(rows, items)`` index arrays (user row in
    ``users``, item index) -- memory O(pairs), so it scales to any catalogue -- or a
    dense bool [U, I] mask (small catalogues). A user with fewer than k items left gets
    -1 in the remaining columns.
    """
    k = min(k, items.shape[0])
    excl = _exclusion_pairs(exclude, users.shape[0], items.shape[0])
    # multi-vector kinds materialise U x chunk x (token pairs) similarities: bound that
    per_pair = 1 if score_kind == "dot" else max(1, (users[0].numel() * items[0].numel()) // users.shape[-1])
    item_chunk = max(1, min(item_chunk, _BUDGET_ELEMENTS // max(1, users.shape[0] * per_pair)))
    best_scores = torch.full((users.shape[0], 0), float("-inf"), dtype=users.dtype)
    best_idx = torch.zeros((users.shape[0], 0), dtype=torch.long)
    for start in range(0, items.shape[0], item_chunk):
        scores = score_all(score_kind, users, items[start:start + item_chunk])
        if excl is not None:
            rows, cols = excl
            lo, hi = torch.searchsorted(cols, torch.tensor([start, start + scores.shape[1]])).tolist()
            if hi > lo:   # score_all returns a fresh tensor: safe to write into
                scores[rows[lo:hi], cols[lo:hi] - start] = float("-inf")
        idx = torch.arange(start, start + scores.shape[1]).expand_as(scores)
        scores = torch.cat([best_scores, scores], dim=1)
        idx = torch.cat([best_idx, idx], dim=1)
        best_scores, pos = scores.topk(min(k, scores.shape[1]), dim=1)
        best_idx = idx.gather(1, pos)
    if excl is not None:
        best_idx = best_idx.masked_fill(best_scores == float("-inf"), -1)
    return best_idx


def _exclusion_pairs(exclude, n_users: int, n_items: int):
    """(rows, items) as long tensors sorted by item, so a chunk's pairs are one slice."""
    if exclude is None:
        return None
    if isinstance(exclude, torch.Tensor):
        if exclude.dtype != torch.bool or tuple(exclude.shape) != (n_users, n_items):
            raise ValueError(f"a dense exclude mask must be bool [{n_users}, {n_items}], "
                             f"got {exclude.dtype} {tuple(exclude.shape)}")
        rows, cols = exclude.nonzero(as_tuple=True)
    else:
        if len(exclude) != 2:
            raise ValueError("exclude must be a bool mask or a (rows, items) pair of index arrays")
        rows, cols = (torch.as_tensor(np.asarray(a), dtype=torch.long).reshape(-1) for a in exclude)
        if rows.shape != cols.shape:
            raise ValueError(f"exclude: {rows.numel()} rows but {cols.numel()} items")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_users
                             or int(cols.min()) < 0 or int(cols.max()) >= n_items):
            raise ValueError(f"exclude: rows must lie in [0, {n_users}) and items in [0, {n_items})")
    order = torch.argsort(cols, stable=True)
    return rows[order], cols[order]


def retrieval_from_arrays(users: np.ndarray, items: np.ndarray, score_kind: str, positives: np.ndarray,
                          seen: Optional[np.ndarray], ks: Sequence[int], user_batch: int = 4096,
                          item_chunk: int = 262_144) -> dict:
    """Recall@K, NDCG@K (means over users with a positive) and coverage@K (distinct items in
    all evaluated users' top-K / catalogue), by exact top-K in user batches.

    ``positives`` / ``seen``: sorted distinct packed keys ``user * n_items + item`` (rows of
    ``users`` / ``items``). ``seen`` pairs are masked out of the top-K and out of the
    positives; ``seen=None`` ranks every item.
    """
    ks = check_ks(ks)
    n_items = items.shape[0]
    positives = np.asarray(positives, dtype=np.int64)
    if seen is not None:
        seen = np.asarray(seen, dtype=np.int64)
        positives = positives[~np.isin(positives, seen, assume_unique=True)]
    eval_users = np.unique(positives // max(1, n_items))
    items_t = torch.from_numpy(np.ascontiguousarray(items))
    sums = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg") for k in ks}
    covered = {k: np.zeros(n_items, dtype=bool) for k in ks}
    for start in range(0, eval_users.size, user_batch):
        batch = eval_users[start:start + user_batch]
        exclude = _pairs_of(seen, batch, n_items) if seen is not None else None
        top = top_k(torch.from_numpy(users[batch]), items_t, max(ks), item_chunk, exclude=exclude,
                    score_kind=score_kind).numpy()
        pos = _pairs_of(positives, batch, n_items)
        for k in ks:   # every user of the batch has a positive: batch mean x size = batch sum
            sums[f"recall@{k}"] += recall_at_k(top, pos, k) * batch.size
            sums[f"ndcg@{k}"] += ndcg_at_k(top, pos, k) * batch.size
            covered[k] |= recommended_mask(top, n_items, k)
    n = eval_users.size
    out = {key: (v / n if n else float("nan")) for key, v in sums.items()}
    out.update({f"coverage@{k}": (float(covered[k].mean()) if n and n_items else float("nan")) for k in ks})
    out.update({"users": int(n), "items": int(n_items), "positives": int(positives.size),
                "exclude_seen": seen is not None})
    return out


def _pairs_of(keys: np.ndarray, users: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(row in ``users``, item) of the packed ``keys`` belonging to the sorted ``users``."""
    lo = np.searchsorted(keys, users * n_items)
    hi = np.searchsorted(keys, (users + 1) * n_items)
    counts = hi - lo
    rows = np.repeat(np.arange(users.size), counts)
    idx = np.arange(counts.sum()) + np.repeat(lo - (np.cumsum(counts) - counts), counts)
    return rows, keys[idx] % n_items

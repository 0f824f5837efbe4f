"""Offline metrics: ranking-model AUC / GAUC / logloss and retrieval recall@K / NDCG@K / coverage@K.

Retrieval metrics are vectorised over users: (row, item) pairs are packed into one int64
key, row * n_keys + item, and membership of the top-K keys among the positive keys is
one ``np.isin`` (sort-based), no Python loop over users.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from sklearn.metrics import roc_auc_score


def auc(labels, scores) -> float:
    """Exact ROC AUC (ties count 1/2); nan when the labels hold a single class."""
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.size == 0 or np.unique(labels).size < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """-mean[ y log p + (1 - y) log(1 - p) ], p clipped to [eps, 1 - eps]."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def per_user_auc(users, labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, AUC, impressions) of every user with both a positive and a negative.

    Mann-Whitney per user from within-user ranks (ties averaged, so a tie counts 1/2 as in
    ``auc``): one pandas groupby-rank and a few bincounts, no loop over users.
    """
    import pandas as pd

    users = np.asarray(users).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not users.shape == y.shape == s.shape:
        raise ValueError(f"users, labels and scores differ in length: {users.size}, {y.size}, {s.size}")
    codes, uniques = pd.factorize(users, use_na_sentinel=False)
    ranks = pd.Series(s).groupby(codes).rank(method="average").to_numpy()
    n = np.bincount(codes, minlength=len(uniques)).astype(np.float64)
    n_pos = np.bincount(codes, weights=y, minlength=len(uniques))
    n_neg = n - n_pos
    rank_pos = np.bincount(codes, weights=ranks * y, minlength=len(uniques))
    both = (n_pos > 0) & (n_neg > 0)
    aucs = (rank_pos[both] - n_pos[both] * (n_pos[both] + 1) / 2) / (n_pos[both] * n_neg[both])
    return np.asarray(uniques)[both], aucs, n[both].astype(np.int64)


def gauc(users, labels, scores) -> float:
    """Group AUC: per-user AUC averaged over users having both classes, each weighted by
    its number of impressions (rows), as in Zhou et al. (DIN, KDD 2018): heavy users carry
    more of the ranking traffic. nan when no user has both classes."""
    _, aucs, weights = per_user_auc(users, labels, scores)
    if not aucs.size:
        return float("nan")
    return float(np.average(aucs, weights=weights))


def recommended_mask(topk_items: np.ndarray, n_items: int, k: Optional[int] = None) -> np.ndarray:
    """bool [n_items]: the items that appear in some user's top-k (-1 padding ignored).

    OR the masks of user batches to get the catalogue coverage of all users.
    """
    top = np.asarray(topk_items)
    if top.ndim != 2:
        raise ValueError(f"topk_items must be [users, K], got shape {top.shape}")
    top = top[:, :k] if k is not None else top
    mask = np.zeros(n_items, dtype=bool)
    mask[top[top >= 0]] = True
    return mask


def _hits(topk_items: np.ndarray, positives, k: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """hits [U, K] bool (rank r of user row u is a positive) and n_pos [U] (distinct positives)."""
    topk = np.asarray(topk_items)
    if topk.ndim != 2:
        raise ValueError(f"topk_items must be [users, K], got shape {topk.shape}")
    if k is not None:
        topk = topk[:, :k]
    topk = topk.astype(np.int64, copy=False)
    rows = np.asarray(positives[0], dtype=np.int64).ravel()
    items = np.asarray(positives[1], dtype=np.int64).ravel()
    if rows.shape != items.shape:
        raise ValueError("positives: user row and item arrays differ in length")
    n_users = topk.shape[0]
    if rows.size and (rows.min() < 0 or rows.max() >= n_users):
        raise ValueError(f"positives: user rows must lie in [0, {n_users})")
    if topk.shape[1] > 1:  # a repeated item would be counted twice
        s = np.sort(topk, axis=1)
        if np.any((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)):
            raise ValueError("topk_items repeats an item within a user's row")
    # one key per (row, item); negative items in topk are padding (fewer than K candidates)
    n_keys = int(max(topk.max(initial=-1), items.max(initial=-1))) + 1
    pos_keys = np.unique(rows * n_keys + items)
    n_pos = np.bincount(pos_keys // n_keys, minlength=n_users)
    top_keys = np.arange(n_users, dtype=np.int64)[:, None] * n_keys + topk
    hits = np.isin(top_keys, pos_keys) & (topk >= 0)
    return hits, n_pos


def recall_at_k(topk_items: np.ndarray, positives, k: Optional[int] = None) -> float:
    """mean over users with >= 1 positive of |topK(u) & P(u)| / |P(u)|.

    ``topk_items`` [U, K]: item ids ranked best first per user row (-1 = no candidate);
    ``positives``: (user_row_idx, item) arrays, rows indexing ``topk_items``; ``k``: use
    the first k columns only. nan when no user has a positive.
    """
    hits, n_pos = _hits(topk_items, positives, k)
    has = n_pos > 0
    if not has.any():
        return float("nan")
    return float(np.mean(hits[has].sum(1) / n_pos[has]))


def ndcg_at_k(topk_items: np.ndarray, positives, k: Optional[int] = None) -> float:
    """mean over users with >= 1 positive of DCG@K / IDCG@K, binary relevance:

    DCG@K = sum_{r < K, topK_r in P(u)} 1 / log2(r + 2);  IDCG@K = sum_{r < min(|P(u)|, K)} 1 / log2(r + 2)
    """
    hits, n_pos = _hits(topk_items, positives, k)
    has = n_pos > 0
    if not has.any():
        return float("nan")
    width = hits.shape[1]
    discount = 1.0 / np.log2(np.arange(width, dtype=np.float64) + 2.0)
    dcg = hits[has] @ discount
    ideal = np.concatenate([[0.0], np.cumsum(discount)])[np.minimum(n_pos[has], width)]
    return float(np.mean(dcg / ideal))

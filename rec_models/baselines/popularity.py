"""Most popular: every user gets the items with the most training clicks.

As vectors, so that the students' retrieval code scores it unchanged: users ``[U, 1]`` of
ones and items ``[I, 1]`` of click counts, whose dot product is the item's count.
"""
from __future__ import annotations

import numpy as np


def item_click_counts(click_keys: np.ndarray, n_items: int) -> np.ndarray:
    """Clicks per item, float32 ``[n_items]``, from packed keys ``user * n_items + item``, one
    per clicked row (a pair clicked twice counts twice)."""
    keys = np.asarray(click_keys, dtype=np.int64)
    if keys.size and (keys.min() < 0):
        raise ValueError("click keys must be non-negative packed keys user * n_items + item")
    return np.bincount(keys % max(1, n_items), minlength=n_items).astype(np.float32)


def popularity_vectors(counts: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(users ``[n_users, 1]`` of ones, items ``[I, 1]`` = counts), float32: dot = the count."""
    counts = np.asarray(counts, dtype=np.float32).reshape(-1, 1)
    return np.ones((n_users, 1), dtype=np.float32), np.ascontiguousarray(counts)

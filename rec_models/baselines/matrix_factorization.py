"""Matrix factorisation baselines with PyPI ``implicit`` (CPU models): ALS and BPR.

- **ALS** (Hu, Koren, Volinsky, ICDM 2008): weighted least squares on the user x item
  click-count matrix, confidence ``1 + alpha * count``.
- **BPR** (Rendle et al., UAI 2009): pairwise ranking with sampled negatives; implicit
  appends an item bias column (users' last factor is 1).

Protocol (``tune_and_refit``): each setting of a small grid is fit on the train clicks and
scored by the caller's ``evaluate`` on the valid clicks, train pairs excluded; the best
valid Recall@K (K=50 by default; first setting on ties) is refit on train + valid. The
chosen setting's train-only factors are kept too: they saw the same clicks as the students,
which train on train and only select their epoch on valid. The test split never reaches this
module: the caller scores both on it. Seeded
(``random_state``); ALS is the same for any thread count, BPR (Hogwild SGD) only with one
thread.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from rec_models.errors import BadInputError, ConfigError

KINDS = ("als", "bpr")


@dataclass(frozen=True)
class MFSetting:
    factors: int = 64
    regularization: float = 0.01
    iterations: int = 15
    learning_rate: float = 0.01   # BPR only
    alpha: float = 1.0            # ALS only: confidence 1 + alpha * count

    def params(self, kind: str) -> dict:
        """The setting's parameters that ``kind`` uses (what a report shows)."""
        skip = {"als": ("learning_rate",), "bpr": ("alpha",)}[kind]
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# A few seconds on the synthetic default (2,000 x 1,000) and on MovieLens 100K, 2 cores.
# ALS's alpha is fixed at 5: on both data sets' valid splits it matched or beat alpha=1 at
# nearly every factors x regularisation, so the grid's fits go to those two instead.
GRIDS: dict[str, tuple[MFSetting, ...]] = {
    "als": tuple(MFSetting(factors=f, regularization=r, alpha=5.0, iterations=15)
                 for f in (8, 16, 32) for r in (0.1, 10.0)),
    "bpr": tuple(MFSetting(factors=f, learning_rate=lr, regularization=0.01, iterations=100)
                 for f in (32, 64) for lr in (0.005, 0.01)),
}


@dataclass
class MFFit:
    """The refit model's factors (score = users @ items.T), the chosen setting's train-only
    factors, and how they were chosen."""
    kind: str
    users: np.ndarray        # [U, d] float32
    items: np.ndarray        # [I, d] float32
    chosen: dict             # the setting's params + its valid score
    grid: list[dict] = field(default_factory=list)   # every setting's params + valid score
    tune_seconds: float = 0.0
    fit_seconds: float = 0.0
    train_users: Optional[np.ndarray] = None   # the chosen setting fit on train only
    train_items: Optional[np.ndarray] = None


def interaction_matrix(click_keys: np.ndarray, n_users: int, n_items: int):
    """CSR ``[n_users, n_items]`` float32 of click counts from packed keys ``user * n_items +
    item`` (one per clicked row; a pair's rows add up)."""
    from scipy.sparse import csr_matrix

    keys = np.asarray(click_keys, dtype=np.int64)
    if keys.size and (keys.min() < 0 or keys.max() >= n_users * n_items):
        raise ValueError(f"click keys must lie in [0, {n_users} * {n_items})")
    m = csr_matrix((np.ones(keys.size, np.float32), (keys // n_items, keys % n_items)),
                   shape=(n_users, n_items), dtype=np.float32)
    m.sum_duplicates()
    return m


def fit_factors(kind: str, matrix, setting: MFSetting, seed: int, num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(user factors, item factors), float32, of ``kind`` fit on the CSR user x item ``matrix``."""
    if kind not in KINDS:
        raise ConfigError(f"unknown matrix factorisation '{kind}'; known: {', '.join(KINDS)}")
    import implicit.cpu.als  # noqa: F401  loads its BLAS before the limit below, so the limit covers it
    import implicit.cpu.bpr  # noqa: F401

    with threadpool_limits(1, "blas"):   # implicit's own threads; BLAS threads under them only slow it down
        model = _model(kind, setting, seed, num_threads)
        model.fit(matrix.tocsr().astype(np.float32), show_progress=False)
    return (np.ascontiguousarray(model.user_factors, dtype=np.float32),
            np.ascontiguousarray(model.item_factors, dtype=np.float32))


def _model(kind: str, setting: MFSetting, seed: int, num_threads: int):
    if kind == "als":
        from implicit.cpu.als import AlternatingLeastSquares

        model = AlternatingLeastSquares(factors=setting.factors, regularization=setting.regularization,
                                        alpha=setting.alpha, iterations=setting.iterations,
                                        num_threads=num_threads, random_state=seed)
    else:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        model = BayesianPersonalizedRanking(factors=setting.factors, learning_rate=setting.learning_rate,
                                            regularization=setting.regularization, iterations=setting.iterations,
                                            num_threads=num_threads, random_state=seed)
    return model


Evaluate = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], float]


def tune_and_refit(kind: str, train_keys: np.ndarray, valid_keys: np.ndarray, n_users: int, n_items: int,
                   evaluate: Evaluate, seed: int, grid: Optional[Sequence[MFSetting]] = None,
                   num_threads: int = 1, score_name: str = "valid_recall@50") -> MFFit:
    """Choose a setting of ``grid`` on valid, refit it on train + valid.

    ``train_keys`` / ``valid_keys``: packed keys ``user * n_items + item`` of each split's
    clicked rows. ``evaluate(users, items, positives, seen)`` scores factors on sorted
    distinct ``positives`` with ``seen`` pairs excluded (the caller's Recall@K); here it is
    only ever given the valid clicks, with the train clicks as ``seen``.
    """
    grid = tuple(GRIDS[kind] if grid is None else grid)
    if not grid:
        raise ConfigError(f"{kind}: an empty grid of settings")
    train_keys = np.asarray(train_keys, dtype=np.int64)
    train = interaction_matrix(train_keys, n_users, n_items)
    if not train.nnz:
        raise BadInputError(f"{kind}: the train split has no click to fit on")
    valid_pos = np.unique(np.asarray(valid_keys, dtype=np.int64))
    seen = np.unique(train_keys)
    started, scored, kept = time.perf_counter(), [], None
    for i, setting in enumerate(grid):
        users, items = fit_factors(kind, train, setting, seed, num_threads)
        scored.append({**setting.params(kind), score_name: float(evaluate(users, items, valid_pos, seen))})
        if np.isfinite(scored[-1][score_name]) and (kept is None or scored[-1][score_name] > scored[kept[0]][score_name]):
            kept = (i, users, items)   # the best so far (first of equals): one model in memory
    if kept is None:
        raise BadInputError(f"{kind}: no valid click of a user outside the train pairs, nothing to choose "
                            "the setting on: the valid split is empty or repeats train")
    best = kept[0]
    tune_seconds = time.perf_counter() - started
    started = time.perf_counter()
    both = interaction_matrix(np.concatenate([train_keys, np.asarray(valid_keys, dtype=np.int64)]),
                              n_users, n_items)
    users, items = fit_factors(kind, both, grid[best], seed, num_threads)
    return MFFit(kind, users, items, dict(scored[best]), scored, tune_seconds, time.perf_counter() - started,
                 train_users=kept[1], train_items=kept[2])

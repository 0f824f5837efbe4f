"""Retrieval baselines on the pinned samples snapshot, scored by the students' metric code.

- **most_popular**: items ranked by their train clicks (label 1 rows of the train split).
- **als**, **bpr** (``implicit``): factors, regularisation (BPR: learning rate) chosen on the
  valid split's Recall@50 (train clicks excluded) over ``rec_models.baselines.GRIDS``,
  then refit on train + valid; seeded by ``run.seed``.
- **als_train**, **bpr_train**: the same chosen setting fit on train only, the clicks the
  students train on (they use valid only to pick their epoch): the like-for-like rows.

Every model is scored on the test clicks with ``evaluation.retrieval_from_arrays``, as the
students' embedding tables are: users and items of the feature tables (the rows the
embedding job writes), exact top-K over all items, items the user clicked in train/valid
masked and dropped from the user's test positives. Test users without a train/valid
click (new users under the global split) get popularity's ranking from most_popular, and
an uninformed one from ALS (zero vector) and BPR (its random init): ``cold_users`` says
how many. Only the clicks' (user, item) keys are read, from the Parquet files of the
snapshot the spec pins; no Spark.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from etl import delta_io
from orchestration.artifacts import load_spec, pinned_version
from orchestration.evaluation import _strings, click_keys, positive_pairs, retrieval_from_arrays, split_files
from rec_models.baselines import GRIDS, item_click_counts, popularity_vectors, tune_and_refit
from rec_models.config import Config, ConfigError

log = logging.getLogger(__name__)
SELECT_K = 50   # the setting of ALS/BPR with the best valid Recall@SELECT_K is kept


def retrieval_baselines(cfg: Config, models: tuple[str, ...] = ("most_popular", "als", "bpr")) -> dict:
    """``{model: test metrics}`` for most_popular, als and bpr (keys of the students'
    ``student_retrieval``; als/bpr add ``chosen``, ``grid``, ``tune_seconds``, ``fit_seconds``),
    and ``als_train`` / ``bpr_train``: the chosen setting's train-only fit."""
    unknown = [m for m in models if m != "most_popular" and m not in GRIDS]
    if unknown:
        raise ConfigError(f"unknown retrieval baseline(s) {unknown}; known: most_popular, {', '.join(GRIDS)}")
    data = retrieval_clicks(cfg, load_spec(cfg))
    n_users, n_items = len(data.user_ids), len(data.item_ids)
    clicks, seen, test = data.clicks, data.seen, data.test
    ks = cfg.eval.k
    threads = cfg.train.num_threads or 1

    def score(users, items, positives, excluded, at=ks) -> dict:
        return retrieval_from_arrays(users, items, "dot", positives, excluded, at,
                                     cfg.eval.user_batch_size, cfg.eval.item_chunk_size)

    def on_valid(users, items, positives, train_seen) -> float:
        return score(users, items, positives, train_seen, [SELECT_K])[f"recall@{SELECT_K}"]

    test_users = np.unique(test[~np.isin(test, seen, assume_unique=True)] // max(1, n_items))
    cold = int((~np.isin(test_users, seen // max(1, n_items))).sum())
    out = {}
    for name in models:
        started = time.perf_counter()
        if name == "most_popular":
            users, items = popularity_vectors(item_click_counts(clicks["train"], n_items), n_users)
            extra = {"fit_seconds": time.perf_counter() - started}
        else:
            fit = tune_and_refit(name, clicks["train"], clicks["valid"], n_users, n_items, on_valid,
                                 seed=cfg.run.seed, grid=GRIDS[name], num_threads=threads,
                                 score_name=f"valid_recall@{SELECT_K}")
            users, items = fit.users, fit.items
            extra = {"chosen": fit.chosen, "grid": fit.grid, "tune_seconds": fit.tune_seconds,
                     "fit_seconds": fit.fit_seconds}
        out[name] = {**score(users, items, test, seen), "test_clicks": int(test.size), "cold_users": cold, **extra}
        if name != "most_popular":
            out[f"{name}_train"] = {**score(fit.train_users, fit.train_items, test, seen), "test_clicks": int(test.size),
                                    "cold_users": cold, "chosen": fit.chosen,
                                    "fit_seconds": fit.tune_seconds / len(fit.grid)}   # one grid fit, on average
        log.info("baseline %s in %.1fs: %s", name, time.perf_counter() - started,
                 {k: round(v, 4) for k, v in out[name].items() if k.startswith("recall@")})
    return out


@dataclass(frozen=True)
class RetrievalClicks:
    """What a ranking of every item is fit and scored on, as the students' tables are: the
    feature tables' users and items (the rows of a score matrix), and clicks as packed keys
    ``user_pos * n_items + item_pos``."""
    user_ids: pd.Index              # user keys as strings (the embedding tables' ``id``), table order
    item_ids: pd.Index
    clicks: dict[str, np.ndarray]   # "train", "valid": one key per click
    seen: np.ndarray                # sorted distinct train + valid clicks: masked out at test
    test: np.ndarray                # sorted distinct test clicks
    test_files: list[str]


def retrieval_clicks(cfg: Config, spec) -> RetrievalClicks:
    """The clicks of the samples snapshot ``spec`` pins, over its feature tables' entities."""
    version, label = pinned_version(spec, "samples"), cfg.spec.label.name
    user_ids, item_ids = (_keys(cfg, f"{side}_features", f"{side}_key", pinned_version(spec, f"{side}_features"))
                          for side in ("user", "item"))
    clicks = {s: click_keys(split_files(cfg, s, version), label, user_ids, item_ids) for s in ("train", "valid")}
    test_files = split_files(cfg, "test", version)
    return RetrievalClicks(user_ids, item_ids, clicks, np.unique(np.concatenate([clicks["train"], clicks["valid"]])),
                           positive_pairs(test_files, label, user_ids, item_ids), test_files)


def _keys(cfg: Config, table: str, column: str, version: Optional[int]) -> pd.Index:
    """The entity keys of a feature table at its pinned version, as strings (the embedding
    tables' ``id``), in table order."""
    # a missing table or pinned version is an InputNotFoundError naming the job to run
    keys = delta_io.read_arrow(cfg.warehouse.uri(table), [column], version=version).column(column)
    return pd.Index(_strings(keys))

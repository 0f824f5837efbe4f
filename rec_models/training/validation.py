"""What the training loop needs besides the samples: the item table, as a bank of corpus
negatives (``student.objective=mixed``) and as the catalogue of the validation retrieval
that selects a student's epochs.

Validation retrieval measures each epoch's towers as the embedding tables will be used:
exact top-K over every item of the item feature table, for users with a click in the valid
split, their training clicks excluded from the ranking and from the positives (as the
test evaluation, ``rec_models.serving.retrieval.retrieval_from_arrays``). A user's tower
input is the user's first valid row (its point-in-time history: what the user looked like
when the valid period began). At most ``eval.valid_users`` users, chosen by a hash of the
key (the same ones every epoch and every run), bound its memory and time; the files are
streamed with only the needed columns.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from rec_models.config import BadInputError, Config
from rec_models.loaders.arrow import arrow_to_tensors, scan_parquet
from rec_models.objectives import ItemBank
from rec_models.serving.retrieval import retrieval_from_arrays
from rec_models.spec import FeatureSpec

log = logging.getLogger(__name__)

def _read(files: list[str], columns: list[str], keep=None) -> pa.Table:
    """``columns`` of ``files`` as one table; ``keep(batch) -> bool mask`` filters as it streams."""
    parts, schema = [], None
    for batch in scan_parquet(files, columns):
        schema = batch.schema
        if keep is not None:
            batch = batch.filter(keep(batch))
        if batch.num_rows:
            parts.append(batch)
    if not parts:
        return schema.empty_table() if schema is not None else pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.Table.from_batches(parts)


def feature_rows(files: list[str], spec: FeatureSpec, side: str, columns: list[str]) -> tuple[pd.Index, dict]:
    """(keys, tower inputs) of every row of the ``side`` ("user" or "item") feature table."""
    if not files:
        raise BadInputError(f"the {side} feature table has no files: rerun jobs/build_features.py")
    table = _read(files, [f"{side}_key", *columns])
    if not table.num_rows:
        raise BadInputError(f"the {side} feature table has no rows: rerun jobs/build_features.py")
    keys = pd.Index(table.column(f"{side}_key").cast(pa.string()).to_numpy(zero_copy_only=False))
    return keys, arrow_to_tensors(table, spec, columns)


def item_table(files: list[str], spec: FeatureSpec, columns: list[str]) -> tuple[pd.Index, dict[str, torch.Tensor]]:
    """(item keys, tower inputs and the item id) of every row of the item feature table."""
    return feature_rows(files, spec, "item", list(dict.fromkeys([*columns, spec.keys.item])))


@torch.no_grad()
def encode_rows(encode, tensors: dict[str, torch.Tensor], batch_size: int, device) -> np.ndarray:
    """``encode`` (a tower) over feature rows in batches, as float32 numpy."""
    n = next(iter(tensors.values())).shape[0]
    parts = [encode({k: v[s:s + batch_size].to(device) for k, v in tensors.items()}).float().cpu()
             for s in range(0, n, batch_size)]
    return torch.cat(parts).numpy()


def load_item_bank(files: list[str], spec: FeatureSpec, columns: list[str]) -> ItemBank:
    """Every item's tower inputs and id, for uniform corpus negatives."""
    _, tensors = item_table(files, spec, columns)
    ids = tensors[spec.keys.item].long()
    return ItemBank({k: v for k, v in tensors.items() if k in columns}, ids)


def has_towers(model: nn.Module) -> bool:
    student = getattr(model, "student", None)
    return student is not None and all(hasattr(student, a) for a in
                                       ("encode_user", "encode_item", "user_input_names", "item_input_names"))


class RetrievalValidation:
    """Recall@K / NDCG@K of a student's towers on the valid clicks, over the whole catalogue."""

    def __init__(self, files: dict[str, list[str]], spec: FeatureSpec, student: nn.Module, cfg: Config):
        label = spec.label.name
        self.ks = sorted(set(cfg.eval.k) | {cfg.eval.select_k})
        self.batch_size = cfg.train.eval_batch_size
        self.user_names = list(student.user_input_names)
        self.item_keys, self.items = item_table(files["items"], spec, list(student.item_input_names))
        n_items = len(self.item_keys)

        clicked = lambda b: pc.greater(b.column(label), 0.5)   # noqa: E731
        users = np.unique(_read(files["valid"], ["user_key", label], clicked)
                          .column("user_key").cast(pa.string()).to_numpy(zero_copy_only=False))
        if users.size > cfg.eval.valid_users:   # the same users every epoch and every run
            order = np.argsort(pd.util.hash_array(users.astype(object)), kind="stable")
            users = np.sort(users[order[:cfg.eval.valid_users]])
        self.user_keys = pd.Index(users)
        chosen = pa.array(users, type=pa.string())
        mine = lambda b: pc.is_in(b.column(0).cast(pa.string()), value_set=chosen)   # noqa: E731
        ts = spec.keys.timestamp
        cols = list(dict.fromkeys(["user_key", "item_key", label, *([ts] if ts else []), *self.user_names]))
        valid = _read(files["valid"], cols, mine)
        if valid.num_rows:
            # each user's first valid row: the tower input as the valid period began
            valid = valid.sort_by([("user_key", "ascending"), *([(ts, "ascending")] if ts else [])])
            codes = self.user_keys.get_indexer(valid.column("user_key").cast(pa.string()).to_numpy(zero_copy_only=False))
            _, first = np.unique(codes, return_index=True)
            self.users = arrow_to_tensors(valid.take(pa.array(first)), spec, self.user_names)
        else:
            self.users = {}
        self.positives = self._keys(valid, label, n_items)
        self.seen = self._keys(_read(files["train"], ["user_key", "item_key", label], mine), label, n_items)
        self.score_kind = getattr(student, "score_kind", "dot")
        log.info("valid retrieval: %d users, %d items, %d valid clicks, %d training clicks excluded",
                 len(self.user_keys), n_items, self.positives.size, self.seen.size)

    def _keys(self, table: pa.Table, label: str, n_items: int) -> np.ndarray:
        """Sorted distinct packed keys user * n_items + item of the clicked rows."""
        if not table.num_rows:
            return np.zeros(0, np.int64)
        table = table.filter(pc.greater(table.column(label), 0.5))
        u = self.user_keys.get_indexer(table.column("user_key").cast(pa.string()).to_numpy(zero_copy_only=False))
        i = self.item_keys.get_indexer(table.column("item_key").cast(pa.string()).to_numpy(zero_copy_only=False))
        known = (u >= 0) & (i >= 0)
        return np.unique(u[known].astype(np.int64) * n_items + i[known])

    def __call__(self, student: nn.Module, device) -> dict[str, float]:
        """{"student_recall@K", "student_ndcg@K"} of ``student`` as it is now."""
        if not self.positives.size:
            return {}
        was_training = student.training
        student.eval()
        try:
            users = encode_rows(student.encode_user, self.users, self.batch_size, device)
            items = encode_rows(student.encode_item, self.items, self.batch_size, device)
        finally:
            student.train(was_training)
        out = retrieval_from_arrays(users, items, self.score_kind, self.positives, self.seen, self.ks)
        return {f"student_{k}": v for k, v in out.items() if k.startswith(("recall@", "ndcg@"))}

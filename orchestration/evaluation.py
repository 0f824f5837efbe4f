"""Evaluation of a trained model and its embedding tables: what ``jobs/evaluate.py`` runs.

- **Pointwise** (every head of the checkpoint: teacher, student, ...): AUC, LogLoss and
  GAUC on the test split of ``samples`` at the snapshot version pinned in the model's
  spec, the split it was trained against. ``predict`` streams it in batches through the
  ArrowBatchLoader; only (user, label, score) arrays of the test split are kept.
- **Retrieval** (the student, from the embedding tables): exact top-K over the whole item
  table, Recall@K, NDCG@K and coverage@K. Items a user clicked in the train or valid split
  are masked before top-K (recommending them again says nothing about the model) and are
  dropped from that user's test positives (they could never be hit). Interactions are
  streamed from the Parquet files and kept as packed int64 keys ``user * n_items + item``,
  sorted, so a user batch's pairs are found by binary search.
- **Results**: long-format rows (one metric, K, epoch per row) in the Delta ``metrics``
  table, partitioned by (model_name, model_version, method): a rerun replaces its own
  partition in one commit, other models' rows stay. The run's training history
  (metrics.json beside the checkpoint) goes in with it, so the report of any model can
  draw every evaluated run's curves from the table alone. Also ``evaluation.json`` and a
  Markdown report with PNG plots under ``runs/<name>/<version>/``.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from etl import delta_io
from rec_models.config import BadInputError, Config, InputNotFoundError
from rec_models.loaders.arrow import open_parquet, scan_parquet
from rec_models.state_files import write_json_atomic
from rec_models.serving.retrieval import retrieval_from_arrays  # noqa: F401  (re-exported: baselines, tests)

log = logging.getLogger(__name__)

METRICS_SCHEMA = ("run_id string, model_name string, model_version string, method string, dataset string, "
                  "split string, head string, metric string, k int, epoch int, value double, "
                  "evaluated_at timestamp")
METRICS_PARTITIONS = ["model_name", "model_version", "method"]
POINTWISE = ("auc", "logloss", "gauc")
RETRIEVAL = ("recall", "ndcg", "coverage")
_SCAN_ROWS = 1 << 18


# ---------------------------------------------------------------- the job

def evaluate_model(cfg: Config, checkpoint: Optional[str] = None, spark=None) -> dict:
    """Evaluate the checkpoint of run.name/run.version (or ``checkpoint``); write the results.

    Inputs are checked before any scoring, and Spark (``spark``, else the active or a new
    session; only the metrics table write needs it) starts after that, so a missing
    checkpoint, embedding table or test split fails in seconds with the job to run.
    """
    from orchestration.artifacts import pinned_version, run_dir
    from rec_models.training.loop import load_checkpoint, load_trained

    ks = cfg.eval.k   # validated (sorted, distinct, >= 1) by the config
    name, version = cfg.run.name, cfg.run.version
    path = os.path.abspath(checkpoint or run_dir(cfg, cfg.distill.method, "checkpoints", "last.pt"))
    if not os.path.exists(path):
        if checkpoint:
            raise InputNotFoundError(f"no checkpoint at {path} (--checkpoint)")
        raise InputNotFoundError(
            f"no checkpoint at {path}: train model {name} version {version} first "
            f"(spark-submit jobs/distill.py --method {cfg.distill.method} --set run.name={name} "
            f"--set run.version={version}) or pass --checkpoint PATH")
    ckpt = load_checkpoint(path)
    method, tags = ckpt["kind"], ckpt.get("tags") or {}
    del ckpt
    if (tags.get("name"), tags.get("version")) not in ((name, version), (None, None)):
        log.warning("checkpoint %s was trained as %s/%s; its metrics are filed under run.name/run.version "
                    "%s/%s", path, tags.get("name"), tags.get("version"), name, version)
    model, spec, _ = load_trained(path)
    samples_version = pinned_version(spec, "samples")
    test_files = split_files(cfg, "test", samples_version)

    retrieval_note, emb = None, None
    if hasattr(model, "student"):
        emb = load_embeddings(cfg, name, version, method)   # raises when missing: before scoring
        if tags.get("run_id") and emb.run_id != tags["run_id"]:
            raise BadInputError(
                f"the committed embeddings of model {name} version {version} ({cfg.warehouse.uri('model_versions')}) "
                f"are run {emb.run_id}'s, but {path} was trained by run {tags['run_id']}: its embedding write did "
                f"not finish; rerun jobs/write_embeddings.py --set run.name={name} --set run.version={version}")
        retrieval_note = _bundle_mismatch(run_dir(cfg, "student.pt"), model, path)
        if retrieval_note:
            log.warning("%s", retrieval_note)
            emb = None
    else:
        retrieval_note = f"model kind '{method}' has no student towers, hence no embeddings"

    pointwise = pointwise_metrics(cfg, model, spec, test_files)
    del model
    if emb is not None:
        retrieval = retrieval_from_tables(cfg, emb, samples_version, ks)
    else:
        retrieval = {"skipped": retrieval_note}
    history = _history(path)
    run_id = tags.get("run_id") or (emb.run_id if emb is not None else None) or "unknown"

    evaluated_at = dt.datetime.now(dt.timezone.utc)
    rows = metric_rows(pointwise, retrieval if emb is not None else None, history, ks)
    table = table_rows(rows, run_id, name, version, method, cfg.data.name, evaluated_at)
    uri = cfg.warehouse.uri("metrics")
    if spark is None:
        from etl.spark import get_spark

        spark = get_spark(cfg.spark)
    table_version = write_metrics(spark, cfg, table, name, version, method)

    out_dir = run_dir(cfg)
    result = {"run_id": run_id, "model": {"name": name, "version": version}, "method": method,
              "dataset": cfg.data.name, "checkpoint": path, "samples_version": samples_version,
              "evaluated_at": evaluated_at.isoformat(), "test": pointwise, "retrieval": retrieval,
              "tables": {"metrics": uri}, "metrics_table_version": table_version,
              "metric_rows": len(rows)}
    report = build_report(cfg, os.path.join(out_dir, "report"), (name, version, method))
    result["report"] = report
    os.makedirs(out_dir, exist_ok=True)
    result["json"] = os.path.join(out_dir, "evaluation.json")
    write_json_atomic(result["json"], result, default=str)
    return result


def split_files(cfg: Config, split: str, version: Optional[int]) -> list[str]:
    """The ``split`` files of samples at ``version``; an empty split is an error naming the job."""
    uri = cfg.warehouse.uri("samples")
    try:
        files = delta_io.snapshot_files(uri, [("split", "=", split)], version)
    except FileNotFoundError as exc:   # no samples table, or its pinned version is gone
        raise InputNotFoundError(str(exc)) from None
    if not files or not sum(_num_rows(f) for f in files):
        raise BadInputError(f"the {split} split of {uri} (version {version}) is empty: "
                            f"rerun spark-submit jobs/build_features.py, then retrain")
    return files


def _bundle_mismatch(bundle: str, model, checkpoint: str) -> Optional[str]:
    """Why the embedding tables are not ``model``'s student (None: they are, or unknown).

    The tables hold the vectors of the student exported to the run's ``bundle``; retrieval
    metrics filed under another checkpoint (``--checkpoint`` a baseline or an early epoch)
    would be mislabelled. Weights are compared, not paths: run folders may be moved.
    """
    if not os.path.exists(bundle):
        return None
    import torch

    exported = torch.load(bundle, map_location="cpu", weights_only=True)["state_dict"]
    mine = model.student.state_dict()
    if exported.keys() == mine.keys() and all(torch.equal(exported[k], mine[k].cpu()) for k in mine):
        return None
    return (f"retrieval skipped: the embedding tables hold the student exported to {bundle}, whose "
            f"weights differ from {checkpoint}'s; write that checkpoint's embeddings first "
            f"(jobs/write_embeddings.py --bundle) under another run.name/run.version to evaluate them")


def _history(checkpoint: str) -> list[dict]:
    """Per-epoch history of the training run that wrote ``checkpoint`` (its metrics.json):
    beside a run's own ``checkpoints/<run_id>/last.pt``, or for the published
    ``checkpoints/last.pt`` the training folder's (the last finished run's)."""
    path = os.path.join(os.path.dirname(checkpoint), "metrics.json")
    if not os.path.exists(path):
        path = os.path.join(os.path.dirname(os.path.dirname(checkpoint)), "metrics.json")
    if not os.path.exists(path):
        log.info("no training history at %s: curves left out", path)
        return []
    with open(path) as fh:
        return json.load(fh).get("history", [])


# ---------------------------------------------------------------- pointwise metrics

def pointwise_metrics(cfg: Config, model, spec, files: list[str]) -> dict:
    """AUC, LogLoss and GAUC of each head of ``model`` over ``files`` (streamed by predict).

    GAUC weights each user's AUC by the user's impressions in the split (see
    ``rec_models.metrics.gauc``).
    """
    import torch

    from rec_models.metrics import auc, logloss, per_user_auc
    from rec_models.training.loop import predict

    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    labels, probs = predict(model.to(device), files, spec, cfg, device)
    users = _user_codes(files, labels.size)
    out = {"rows": int(labels.size), "positive_rate": float(labels.mean()), "heads": {}}
    for head, p in sorted(probs.items()):
        _, aucs, weights = per_user_auc(users, labels, p)
        out["heads"][head] = {
            "auc": auc(labels, p), "logloss": logloss(labels, p),
            "gauc": float(np.average(aucs, weights=weights)) if aucs.size else float("nan"),
            "gauc_users": int(aucs.size)}
    return out


def _user_codes(files: list[str], expected: int) -> np.ndarray:
    """int codes of ``user_key`` for every row of ``files``, in the order predict reads them
    (files as given, row groups in file order)."""
    keys = [b.column(0) for b in scan_parquet(files, ["user_key"], _SCAN_ROWS)]
    codes = pc.dictionary_encode(pa.chunked_array(keys).combine_chunks()).indices.to_numpy(zero_copy_only=False)
    if codes.size != expected:
        raise RuntimeError(f"read {codes.size} user keys but predict scored {expected} rows: "
                           "were the test files rewritten during evaluation?")
    return codes


# ---------------------------------------------------------------- retrieval metrics

@dataclass
class Embeddings:
    user_ids: pd.Index
    users: np.ndarray       # [U, *shape] float32
    item_ids: pd.Index
    items: np.ndarray       # [I, *shape] float32
    score_kind: str
    run_id: str


def load_embeddings(cfg: Config, name: str, version: str, method: Optional[str] = None) -> Embeddings:
    """Both embedding tables' rows of one model version (vectors as matrices), as the
    ``model_versions`` table commits them: one run's user and item vectors, never a mix."""
    from orchestration.artifacts import EmbeddingsNotCommitted, read_committed_embeddings

    try:
        users, items, pair = read_committed_embeddings(cfg, name, version,
                                                       ["id", "vector", "score_kind", "shape", "run_id"])
    except EmbeddingsNotCommitted as exc:
        how = f"spark-submit jobs/distill.py --method {method}" if method else "spark-submit jobs/distill.py"
        raise EmbeddingsNotCommitted(f"{exc} (e.g. {how})") from None
    for side, t in (("user", users), ("item", items)):
        if not t.num_rows:
            raise BadInputError(f"{cfg.warehouse.uri(side + '_embeddings')} holds no rows of model {name} version "
                             f"{version} (run {pair.run_id}): rerun jobs/write_embeddings.py")
    return Embeddings(pd.Index(users["id"].to_numpy(zero_copy_only=False)),
                      _matrix(users["vector"], users["shape"][0].as_py()),
                      pd.Index(items["id"].to_numpy(zero_copy_only=False)),
                      _matrix(items["vector"], items["shape"][0].as_py()),
                      users["score_kind"][0].as_py(), users["run_id"][0].as_py())


def retrieval_metrics(cfg: Config, name: str, version: str, samples_version: Optional[int] = None,
                      exclude_seen: bool = True) -> dict:
    """Recall/NDCG/coverage@K of one model version's embedding tables on the test clicks.

    ``samples_version``: the samples snapshot (default: the one the warehouse's spec pins).
    """
    from orchestration.artifacts import load_spec, pinned_version

    if samples_version is None:
        samples_version = pinned_version(load_spec(cfg), "samples")
    return retrieval_from_tables(cfg, load_embeddings(cfg, name, version), samples_version,
                                 cfg.eval.k, exclude_seen)


def retrieval_of_checkpoint(cfg: Config, checkpoint: str, samples_version: Optional[int] = None) -> dict:
    """Recall/NDCG@K of a checkpoint's student computed in this process, without embedding
    tables: its towers over the same feature tables the embedding job reads, scored on the
    same test clicks as ``retrieval_from_tables``. For students whose vectors are not
    written (the undistilled baseline beside a distillation run)."""
    import torch

    from orchestration.artifacts import pinned_version
    from rec_models.training.loop import load_trained
    from rec_models.training.validation import encode_rows, feature_rows

    model, spec, _ = load_trained(checkpoint)
    student, vectors, keys = model.student, {}, {}
    for side, names in (("user", student.user_input_names), ("item", student.item_input_names)):
        table = f"{side}_features"
        files = delta_io.snapshot_files(cfg.warehouse.uri(table), None, pinned_version(spec, table))
        keys[side], rows = feature_rows(files, spec, side, list(names))
        encode = student.encode_user if side == "user" else student.encode_item
        vectors[side] = encode_rows(encode, rows, cfg.train.eval_batch_size, torch.device("cpu"))
    if samples_version is None:
        samples_version = pinned_version(spec, "samples")
    emb = Embeddings(keys["user"], vectors["user"], keys["item"], vectors["item"],
                     getattr(student, "score_kind", "dot"), run_id="")
    return retrieval_from_tables(cfg, emb, samples_version, cfg.eval.k)


def retrieval_from_tables(cfg: Config, emb: Embeddings, samples_version: Optional[int], ks: list[int],
                          exclude_seen: bool = True) -> dict:
    label = cfg.spec.label.name
    n_items = len(emb.item_ids)
    test = positive_pairs(split_files(cfg, "test", samples_version), label, emb.user_ids, emb.item_ids)
    seen = None
    if exclude_seen:
        seen = np.unique(np.concatenate([
            positive_pairs(split_files(cfg, s, samples_version), label, emb.user_ids, emb.item_ids)
            for s in ("train", "valid")]))
    out = retrieval_from_arrays(emb.users, emb.items, emb.score_kind, test, seen, ks,
                                cfg.eval.user_batch_size, cfg.eval.item_chunk_size)
    out["test_clicks"] = int(test.size)
    log.info("retrieval over %d users x %d items (%s seen): %s", out["users"], n_items,
             "excluding" if exclude_seen else "keeping", {k: round(v, 4) for k, v in out.items()
                                                         if k.startswith("recall@")})
    return out


def positive_pairs(files: list[str], label: str, user_ids: pd.Index, item_ids: pd.Index) -> np.ndarray:
    """Sorted distinct keys ``user_pos * n_items + item_pos`` of the clicks (label > 0.5) in
    ``files`` whose user and item have embeddings; streamed, 8 bytes per distinct pair."""
    return click_keys(files, label, user_ids, item_ids, distinct=True)


def click_keys(files: list[str], label: str, user_ids: pd.Index, item_ids: pd.Index,
               distinct: bool = False) -> np.ndarray:
    """Packed keys ``user_pos * n_items + item_pos``, one per clicked row (label > 0.5) of
    ``files`` whose user and item are known; ``distinct``: sorted and deduplicated (each
    batch as it is read, so memory follows the distinct pairs, not the clicks)."""
    n_items, parts = len(item_ids), [np.zeros(0, np.int64)]
    for batch in scan_parquet(files, ["user_key", "item_key", label], _SCAN_ROWS):
        batch = batch.filter(pc.greater(batch.column(2), 0.5))
        if not batch.num_rows:
            continue
        u = user_ids.get_indexer(_strings(batch.column(0)))
        i = item_ids.get_indexer(_strings(batch.column(1)))
        known = (u >= 0) & (i >= 0)
        keys = u[known].astype(np.int64) * n_items + i[known]
        parts.append(np.unique(keys) if distinct else keys)
    keys = np.concatenate(parts)
    return np.unique(keys) if distinct else keys


def _matrix(vectors: pa.ChunkedArray, shape: list[int]) -> np.ndarray:
    flat = pc.list_flatten(vectors).to_numpy(zero_copy_only=False)
    return np.array(flat, dtype=np.float32).reshape(len(vectors), *shape)  # a writable copy for torch


def _strings(col) -> np.ndarray:
    return col.cast(pa.string()).to_numpy(zero_copy_only=False)


def _num_rows(path: str) -> int:
    with open_parquet(path) as fh:
        return pq.read_metadata(fh).num_rows


# ---------------------------------------------------------------- the metrics table

def metric_rows(pointwise: dict, retrieval: Optional[dict], history: list[dict],
                ks: Sequence[int]) -> list[tuple]:
    """(split, head, metric, k, epoch, value) rows: test metrics, then the training history."""
    rows = []
    for head, m in pointwise["heads"].items():
        rows += [("test", head, metric, None, None, float(m[metric])) for metric in POINTWISE]
    if retrieval is not None:
        rows += [("test", "student", metric, k, None, float(retrieval[f"{metric}@{k}"]))
                 for metric in RETRIEVAL for k in ks]
    for rec in history:
        epoch = int(rec["epoch"])
        for key, value in rec.items():
            if not isinstance(value, (int, float)) or key in ("epoch", "steps"):
                continue
            if key.startswith("train_"):
                rows.append(("train", None, key[len("train_"):], None, epoch, float(value)))
            elif key.startswith("valid_"):
                head, _, metric = key[len("valid_"):].rpartition("_")
                if head and metric in ("auc", "logloss"):
                    rows.append(("valid", head, metric, None, epoch, float(value)))
    return rows


def table_rows(rows: list[tuple], run_id: str, name: str, version: str, method: str, dataset: str,
                  evaluated_at: dt.datetime) -> list[tuple]:
    """Rows in METRICS_SCHEMA's column order."""
    return [(run_id, name, version, method, dataset, split, head, metric, k, epoch, value, evaluated_at)
            for split, head, metric, k, epoch, value in rows]


def write_metrics(spark, cfg: Config, rows: list[tuple], name: str, version: str, method: str) -> int:
    """Replace this model version's and method's partition of the metrics table (one commit)."""
    df = spark.createDataFrame(rows, METRICS_SCHEMA).coalesce(1)
    return delta_io.write_table(df, cfg.warehouse.uri("metrics"), mode="overwrite",
                                partition_by=METRICS_PARTITIONS, writer=cfg.warehouse.writer,
                                replace_partitions={"model_name": name, "model_version": version,
                                                    "method": method},
                                commit_metadata={"job": "evaluate", "model": f"{name}/{version}/{method}"})


# ---------------------------------------------------------------- the report

def build_report(cfg: Config, out_dir: str, evaluated: tuple[str, str, str]) -> dict:
    """Markdown + PNGs from the whole metrics table: every evaluated model compared, and the
    training curves of each. Rewritten on every evaluation, so it grows with the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    df = delta_io.read_arrow(cfg.warehouse.uri("metrics")).to_pandas()
    df["model"] = df["model_name"] + "/" + df["model_version"] + " (" + df["method"] + ")"
    os.makedirs(out_dir, exist_ok=True)
    test = df[df["split"] == "test"]
    point = test[test["metric"].isin(POINTWISE)]
    retr = test[test["metric"].isin(RETRIEVAL)]
    plots = {}

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("auc", "gauc")):
        sub = point[point["metric"] == metric].pivot_table(index="model", columns="head", values="value",
                                                           aggfunc="last")
        _bars(ax, sub, f"test {metric.upper()} by head", ylim_from=0.5)
    plots["auc"] = _save(fig, out_dir, "comparison_auc.png")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, metric in zip(axes, RETRIEVAL):
        sub = retr[retr["metric"] == metric].pivot_table(index="model", columns="k", values="value",
                                                         aggfunc="last")
        sub.columns = [f"@{int(k)}" for k in sub.columns]
        _bars(ax, sub, f"{metric}@K (train/valid clicks excluded)")
    plots["recall"] = _save(fig, out_dir, "comparison_recall.png")

    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    hist = df[df["epoch"].notna()]
    for model, g in hist.groupby("model"):
        loss = g[(g["split"] == "train") & (g["metric"] == "loss")].sort_values("epoch")
        if len(loss):
            loss_ax.plot(loss["epoch"], loss["value"], marker="o", label=model)
        valid = g[(g["split"] == "valid") & (g["metric"] == "auc")]
        for head, h in valid.groupby("head"):
            h = h.sort_values("epoch")
            auc_ax.plot(h["epoch"], h["value"], marker="o", label=f"{model} {head}")
    for ax, title in ((loss_ax, "train loss"), (auc_ax, "valid AUC")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax.transAxes)
    plots["curves"] = _save(fig, out_dir, "training_curves.png")

    md = os.path.join(out_dir, "report.md")
    with open(md + ".tmp", "w") as fh:
        fh.write(_markdown(test, evaluated, plots))
    os.replace(md + ".tmp", md)
    return {"markdown": md, "plots": sorted(plots.values())}


def _bars(ax, table: pd.DataFrame, title: str, ylim_from: Optional[float] = None) -> None:
    if table.empty:
        ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
    else:
        table.plot.bar(ax=ax, rot=20)
        for label in ax.get_xticklabels():
            label.set_ha("right")
        if ylim_from is not None and np.nanmin(table.to_numpy()) > ylim_from:
            ax.set_ylim(ylim_from, min(1.0, np.nanmax(table.to_numpy()) + 0.05))
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.set_xlabel("")


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def _markdown(test: pd.DataFrame, evaluated: tuple[str, str, str], plots: dict) -> str:
    name, version, method = evaluated
    test = test.assign(column=np.where(test["k"].isna(), test["head"].fillna("") + " " + test["metric"],
                                       test["metric"] + "@" + test["k"].fillna(0).astype(int).astype(str)))
    wide = test.pivot_table(index="model", columns="column", values="value", aggfunc="last")
    when = test.groupby("model")["evaluated_at"].max()
    order = {m: i for i, m in enumerate(POINTWISE + RETRIEVAL)}

    def rank(col: str):   # heads' pointwise metrics first, then retrieval by metric and numeric K
        if "@" in col:
            metric, k = col.split("@")
            return (1, "", order.get(metric, 99), int(k))
        head, _, metric = col.rpartition(" ")
        return (0, head, order.get(metric, 99), 0)

    cols = sorted(wide.columns, key=rank)
    wide = wide[cols]
    lines = [f"# Evaluation report", "",
             f"Last evaluated: **{name}/{version} ({method})**. Every model in the metrics table is "
             "compared; test split of `samples` at the snapshot each model was trained on. GAUC: "
             "per-user AUC weighted by the user's test impressions. Retrieval: exact top-K over the whole "
             "item table, items the user clicked in train/valid excluded.", "",
             "| model | evaluated at | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for model, row in wide.iterrows():
        cells = ["-" if pd.isna(v) else f"{v:.4f}" for v in row]
        lines.append(f"| {model} | {pd.Timestamp(when[model]).strftime('%Y-%m-%d %H:%M')} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Method comparison", "", f"![AUC and GAUC]({os.path.basename(plots['auc'])})", "",
              f"![Recall, NDCG and coverage at K]({os.path.basename(plots['recall'])})", "",
              "## Training curves", "", f"![Training curves]({os.path.basename(plots['curves'])})", ""]
    return "\n".join(lines)

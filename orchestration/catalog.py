"""The project's tables as catalog tables: names, comments and properties.

``register_tables`` registers each table a job wrote as ``warehouse.table_name(key)``
(``<catalog>.<schema>.<table>``; locally ``recsys.<table>`` in Spark's session catalog)
with a table comment and column comments that say what it holds, and properties that
link it to the model, the FeatureSpec and the MLflow run (``dtt.*``). It needs a session
with native Delta (Databricks, or ``spark.delta: true`` locally); elsewhere it registers
nothing and says so once.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Optional

from etl import catalog, delta_io
from rec_models.config import Config
from rec_models.state_files import read_bytes

log = logging.getLogger(__name__)
_WARNED = False

EMBEDDING_COLUMNS = {
    "id": "the user's / item's raw id (user_key / item_key of the feature table)",
    "vector": "the student tower's output, float32, flattened row-major from `shape`; score it by `score_kind`",
    "score_kind": "how a user and an item vector are scored: dot (inner product), late_interaction, inttower, "
                  "mvke, dot+late (rec_models.serving.scoring)",
    "shape": "the tensor shape of `vector` before flattening ([dim] for one vector)",
    "model_name": "partition: run.name of the model (its MLflow registered model name)",
    "model_version": "partition: run.version of the model",
    "run_id": "the project's run id that wrote the rows (MLflow tag dtt_run_id)",
    "created_at": "when the embedding job wrote the rows (UTC)",
}
MODEL_VERSIONS_COLUMNS = {
    "model_name": "partition: run.name", "model_version": "partition: run.version",
    "run_id": "the run whose vectors this model version serves",
    "user_table_version": "the user_embeddings Delta version holding them (read it VERSION AS OF this)",
    "item_table_version": "the item_embeddings Delta version holding them",
    "score_kind": "how the vectors are scored", "bundle": "the exported student bundle",
    "created_at": "when the pair was committed (UTC)",
}
METRICS_COLUMNS = {
    "run_id": "the project's run id", "split": "test, or train / valid for the training history",
    "head": "the model head (student, teacher, ...)", "metric": "auc, logloss, gauc, recall, ndcg, coverage, ...",
    "k": "the cut-off of a top-K metric", "epoch": "the epoch of a training-history row", "value": "the metric's value",
}


def spec_hash(cfg: Config) -> Optional[str]:
    try:
        return hashlib.sha256(read_bytes(cfg.warehouse.spec_path)).hexdigest()
    except OSError:
        return None


def _feature_columns(cfg: Config, key: str) -> dict[str, str]:
    out = {"user_key": "the raw user id", "item_key": "the raw item id", "split": "partition: train / valid / test",
           "timestamp": "event time (UTC)"}
    for f in cfg.spec.features:
        role = "privileged: the teacher's only, never a student's" if f.role == "privileged" else f"{f.role} feature"
        out[f.name] = f"{role}, {f.kind}" + (" (encoded)" if f.kind != "numeric" else "")
    return out


def _embedding_facts(cfg: Config) -> dict[str, str]:
    """Model version, dimension and score kind of this conf's model, from model_versions."""
    name, version = cfg.run.name, cfg.run.version
    uri = cfg.warehouse.uri("model_versions")
    if not delta_io.table_exists(uri):
        return {}
    part = [("model_name", "=", name), ("model_version", "=", version)]
    rows = delta_io.read_arrow(uri, None, part).to_pylist()
    if not rows:
        return {}
    row = rows[0]
    shape = delta_io.read_arrow(cfg.warehouse.uri("user_embeddings"), ["shape"], part,
                                version=int(row["user_table_version"])).slice(0, 1).to_pylist()
    dim = math.prod(shape[0]["shape"]) if shape else None
    return {"dtt.model_name": name, "dtt.model_version": version, "dtt.run_id": row["run_id"],
            "dtt.score_kind": row["score_kind"], "dtt.embedding_dim": str(dim),
            "dtt.user_table_version": str(row["user_table_version"]),
            "dtt.item_table_version": str(row["item_table_version"])}


def describe(cfg: Config, key: str, links: dict[str, str]) -> tuple[str, dict[str, str], dict[str, str]]:
    """(table comment, properties, column comments) of table ``key``."""
    h = spec_hash(cfg)
    props = {"dtt.table": key, "dtt.dataset": cfg.data.name, **({"dtt.feature_spec_sha256": h} if h else {})}
    props.update({f"dtt.{k}": str(v) for k, v in links.items() if v is not None})
    spec_text = f"FeatureSpec sha256 {h[:16]}" if h else "FeatureSpec unknown"
    if key in ("user_embeddings", "item_embeddings", "model_versions"):
        facts = _embedding_facts(cfg)
        props.update(facts)
        last = (f"last written: model {facts['dtt.model_name']} version {facts['dtt.model_version']} "
                f"(run {facts['dtt.run_id']}), embedding dim {facts['dtt.embedding_dim']}, score_kind "
                f"{facts['dtt.score_kind']}, {spec_text}") if facts else spec_text
        if links.get("mlflow_run_id"):
            last += f", MLflow run {links['mlflow_run_id']}"
        if links.get("registered_model_version"):
            last += f", registered model {links['registered_model']} version {links['registered_model_version']}"
        if key == "model_versions":
            return (f"One row per model version: the run it serves and the user/item embedding table versions "
                    f"holding its vectors; {last}", props, MODEL_VERSIONS_COLUMNS)
        side = key.split("_")[0]
        return (f"{side.capitalize()} embeddings of two-tower students, one partition per (model_name, "
                f"model_version); read a model version at the table version {cfg.warehouse.table_name('model_versions') or 'model_versions'} "
                f"names; {last}", props, EMBEDDING_COLUMNS)
    if key == "metrics":
        return (f"Evaluation metrics, one row per metric (and K, epoch), partitioned by model_name, model_version, "
                f"method; {spec_text}", props, METRICS_COLUMNS)
    what = {"user_features": "one row per user", "item_features": "one row per item",
            "samples": "one row per event and sampled negative, partitioned by split"}.get(key, "")
    return (f"{key} of dataset {cfg.data.name} ({what}), built by jobs/build_features.py; {spec_text}",
            props, _feature_columns(cfg, key))


def register_tables(spark, cfg: Config, keys: Optional[list[str]] = None,
                    links: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Register the tables ``keys`` (default: every project table that exists) as catalog
    tables; returns ``{key: catalog name}``. Nothing without a schema or native Delta."""
    global _WARNED
    if cfg.warehouse.schema_name is None:
        return {}
    if not delta_io.has_native_delta(spark):
        if not _WARNED:
            log.info("no catalog names for the tables: the session has no native Delta "
                     "(spark.delta: true locally, or Databricks)")
            _WARNED = True
        return {}
    keys = list(keys) if keys is not None else list(type(cfg.warehouse.tables).model_fields)
    names = {}
    for key in keys:
        uri, name = cfg.warehouse.uri(key), cfg.warehouse.table_name(key)
        if name is None or "/" in getattr(cfg.warehouse.tables, key) or not delta_io.table_exists(uri):
            continue
        comment, props, columns = describe(cfg, key, links or {})
        names[key] = catalog.register_table(spark, name, uri, comment, props, columns)
    return names

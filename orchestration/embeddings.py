"""The embedding job: Spark runs an exported student's towers over the feature tables.

Each executor loads the student bundle once (broadcast bytes), encodes Arrow batches with
``encode_user`` / ``encode_item`` (vectorised torch, no per-row Python) and yields
``(id, vector, score_kind, shape, model_name, model_version, run_id, created_at)``: a
multi-vector student (ColBERT, IntTower, MVKE) stores its [*shape] tensor flattened, and
``rec_models.serving.scoring`` scores it by ``score_kind``. The tables are partitioned
by (model_name, model_version): a rerun of the same version replaces its partition in one
Delta commit, other models' rows stay. Only the tower's own input columns are selected
from the feature tables, and those are checked against the spec's privileged set first.

The two tables are two commits. A third, committed last, makes them one model version:
the ``model_versions`` row (run id, the version of each table that holds the run's
vectors). Readers go through it (``orchestration.artifacts.read_committed_embeddings``),
so a job killed between the two tables leaves readers on the previous complete pair.
"""
from __future__ import annotations

import datetime as dt
import io
import logging

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession

from etl import delta_io
from orchestration.artifacts import CommittedEmbeddings, ModelTag
from rec_models.config import Config

log = logging.getLogger(__name__)

EMBEDDING_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("vector", pa.list_(pa.float32()), nullable=False),
    pa.field("score_kind", pa.string(), nullable=False),
    pa.field("shape", pa.list_(pa.int32()), nullable=False),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
])
SPARK_SCHEMA = ("id string, vector array<float>, score_kind string, shape array<int>, model_name string, "
                "model_version string, run_id string, created_at timestamp")
MODEL_VERSIONS_SCHEMA = ("model_name string, model_version string, run_id string, user_table_version long, "
                         "item_table_version long, score_kind string, bundle string, created_at timestamp")
SIDES = {"user": ("user_features", "user_embeddings", "user_key", "encode_user", "user_input_names"),
         "item": ("item_features", "item_embeddings", "item_key", "encode_item", "item_input_names")}


def write_embeddings(spark: SparkSession, cfg: Config, bundle_path: str, tag: ModelTag,
                     links: dict[str, str] | None = None) -> dict[str, str]:
    """Write user and item embeddings of the student in ``bundle_path``, then commit the
    pair in ``model_versions``; returns the three tables' URIs. ``links`` (the MLflow run,
    the registered model and its version: ``orchestration.tracking``) go into each
    commit's metadata, so every table version records the registered model version."""
    metadata = {**(links or {}), "run_id": tag.run_id}
    from rec_models.serving.export import load_student

    student, spec, _ = load_student(bundle_path)
    with open(bundle_path, "rb") as fh:
        payload = spark.sparkContext.broadcast(fh.read())
    created = dt.datetime.now(dt.timezone.utc)
    uris, versions = {}, {}
    for side, (features_table, out_table, key, encode, inputs) in SIDES.items():
        columns = list(getattr(student, inputs))
        spec.assert_public(columns, "the embedding job")
        # the feature snapshot the model was trained on: its indices match the model's tables
        version = (spec.table_versions or {}).get(features_table)
        source = delta_io.read_table(spark, cfg.warehouse.uri(features_table), columns=[key] + columns,
                                     version=version)
        encoded = encode_frame(source, payload, key, encode, columns, tag, created, cfg.eval.user_batch_size)
        uri = cfg.warehouse.uri(out_table)
        versions[side] = delta_io.write_table(
            encoded, uri, mode="overwrite", partition_by=["model_name", "model_version"],
            replace_partitions={"model_name": tag.name, "model_version": tag.version}, writer=cfg.warehouse.writer,
            commit_metadata=metadata)
        uris[out_table] = uri
    pair = CommittedEmbeddings(tag.name, tag.version, tag.run_id, versions["user"], versions["item"],
                               getattr(student, "score_kind", "dot"))
    uris["model_versions"] = commit_model_version(spark, cfg, pair, bundle_path, created, metadata)
    log.info("committed model %s version %s: run %s, user_embeddings v%d, item_embeddings v%d", tag.name,
             tag.version, tag.run_id, pair.user_table_version, pair.item_table_version)
    return uris


def commit_model_version(spark: SparkSession, cfg: Config, pair: CommittedEmbeddings, bundle_path: str,
                         created: dt.datetime, metadata: dict[str, str] | None = None) -> str:
    """Replace the ``model_versions`` row of ``pair``'s model version: the last commit of
    the embedding job, after which readers see the new pair."""
    uri = cfg.warehouse.uri("model_versions")
    row = [(pair.name, pair.version, pair.run_id, pair.user_table_version, pair.item_table_version,
            pair.score_kind, str(bundle_path), created.replace(tzinfo=None))]
    delta_io.write_table(spark.createDataFrame(row, MODEL_VERSIONS_SCHEMA).coalesce(1), uri, mode="overwrite",
                         partition_by=["model_name", "model_version"],
                         replace_partitions={"model_name": pair.name, "model_version": pair.version},
                         writer=cfg.warehouse.writer, commit_metadata={**(metadata or {}), "run_id": pair.run_id})
    return uri


def encode_frame(source: DataFrame, payload, key: str, encode: str, columns: list[str], tag: ModelTag,
                 created: dt.datetime, batch_rows: int) -> DataFrame:
    def run(batches):
        import numpy as np
        import torch

        from rec_models.loaders.arrow import arrow_to_tensors

        student, spec = _student(payload, tag)
        tower = getattr(student, encode)
        kind = getattr(student, "score_kind", "dot")
        for rb in batches:
            for start in range(0, rb.num_rows, batch_rows):
                part = rb.slice(start, batch_rows)
                with torch.no_grad():
                    vectors = tower(arrow_to_tensors(part, spec, columns)).float().numpy()
                n, shape = vectors.shape[0], list(vectors.shape[1:])
                d = int(np.prod(shape))
                flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), pa.float32())
                yield pa.RecordBatch.from_arrays([
                    part.column(key).cast(pa.string()),
                    pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32)), flat),
                    pa.array([kind] * n, pa.string()),
                    pa.array([shape] * n, pa.list_(pa.int32())),
                    pa.array([tag.name] * n, pa.string()),
                    pa.array([tag.version] * n, pa.string()),
                    pa.array([tag.run_id] * n, pa.string()),
                    pa.array(np.full(n, np.datetime64(created.replace(tzinfo=None), "us")), pa.timestamp("us", tz="UTC")),
                ], schema=EMBEDDING_SCHEMA)

    return source.mapInArrow(run, SPARK_SCHEMA)


_CACHE: dict = {}


def _student(payload, tag: ModelTag):
    """One load per Python worker (workers are reused across tasks), not one per batch."""
    if tag not in _CACHE:
        import torch

        from rec_models.serving.export import load_student

        torch.set_num_threads(1)
        student, spec, _ = load_student(io.BytesIO(payload.value))
        _CACHE.clear()
        _CACHE[tag] = (student, spec)
    return _CACHE[tag]

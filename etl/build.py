"""Build the feature tables and training samples from raw inputs, all in Spark.

    raw events / users / items
      -> validate (every problem named, before anything is written)
      -> encode entity tables (vocabularies with OOV, numeric normalisation or buckets,
         multi-valued categoricals)                        -> user_features, item_features
      -> rows = events (+ sampled negatives for implicit feedback), split by time:
         one global cut or each user's last events (etl/splits.py)
      -> point-in-time history and privileged statistics (etl/point_in_time.py)
      -> join public entity features                       -> samples (partitioned by split)
      -> the resolved FeatureSpec (sizes, statistics, split times) beside the tables

Statistics of event-level columns are fitted on the training split only. Each table write
is one atomic Delta commit; the spec file, written last, records the version of each
table, and readers pin those versions: a rebuild that fails half-way leaves the previous
spec and the table versions it names readable and consistent.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from etl import delta_io
from etl.encoders import build_vocab, encode_categorical, encode_multi, encode_numeric, numeric_stats, pad_list
from etl.point_in_time import add_history, add_privileged, history_as_of
from etl.randomness import uniform
from etl.sources import InputError, load_sources
from etl.splits import TEST_START, assign_split
from etl.validation import DWELL, check_unknown_ids, group_columns, validate_inputs, value_columns
from rec_models.config import Config
from rec_models.spec import OOV_INDEX, Feature, FeatureSpec, Kind, Role

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


@dataclass
class BuildResult:
    spec: FeatureSpec
    tables: dict[str, str]
    counts: dict[str, int]


def build_features(spark: SparkSession, cfg: Config) -> BuildResult:
    spec, data = cfg.spec, cfg.data
    label = spec.label.name
    events, users, items = load_sources(spark, data)
    validate_inputs(events, users, items, spec, data.source.implicit)
    if users is not None:
        check_unknown_ids(events, users, spec.keys.user, "users", data.unknown_ids)
    if items is not None:
        check_unknown_ids(events, items, spec.keys.item, "items", data.unknown_ids)

    stats: dict[str, dict] = {}
    user_enc = _encode_entity(events, users, spec, Role.user, "users", stats)
    item_enc = _encode_entity(events, items, spec, Role.item, "items", stats)
    group_cols = group_columns(spec)
    item_groups = items.select(F.col(spec.keys.item).alias("item_key"),
                               *[F.col(g).cast("string").alias(f"__group_{g}") for g in group_cols]) if group_cols else None

    rows = _event_rows(events, spec, data.source.implicit)
    if data.source.implicit:
        rows = rows.unionByName(_sample_negatives(rows, item_enc, cfg), allowMissingColumns=True)
    rows = rows.withColumn("row_id", F.monotonically_increasing_id())
    rows, split_times = assign_split(rows, data.split, spec.keys.timestamp)

    # event-side encodings: ids through the entity vocabularies (unseen -> OOV)
    item_index = item_enc.select("item_key", F.col(spec.keys.item).alias("__item_idx"))
    rows = rows.join(item_index, "item_key", "left").withColumn(
        "__item_idx", F.coalesce("__item_idx", F.lit(OOV_INDEX)))
    if item_groups is not None:
        rows = rows.join(item_groups, "item_key", "left")
    cached = rows = rows.cache()

    rows = add_privileged(rows, spec, label, {g: f"__group_{g}" for g in group_cols})
    for f in spec.features:
        if f.kind == Kind.sequence:
            rows = add_history(rows, f, spec.keys.timestamp, label, "__item_idx", data.history_lookback)
    train_rows = rows.where(F.col("split") == "train")
    for f in spec.features:
        if f.source in ("events", "derived") and f.kind == Kind.numeric:
            stats[f.name] = numeric_stats(train_rows, f)
        elif f.source == "events" and f.kind == Kind.categorical:
            vocab, size = build_vocab(train_rows.select(f.name), f.name, f.min_count)
            rows = encode_categorical(rows, f.name, vocab)
            stats[f.name] = {"vocab_size": size}
    resolved = spec.resolve(stats)
    event_numeric = [resolved.get(f.name) for f in spec.features
                     if f.source in ("events", "derived") and f.kind == Kind.numeric]
    rows = rows.select("*", *[encode_numeric(f).alias(f"__enc_{f.name}") for f in event_numeric])
    for f in event_numeric:
        rows = rows.drop(f.name).withColumnRenamed(f"__enc_{f.name}", f.name)

    counts = {r["split"]: r["count"] for r in rows.groupBy("split").count().collect()}
    for split in SPLITS:
        if not counts.get(split):
            raise InputError(f"the {split} split is empty: too few events or distinct timestamps to split by time")
    samples = _samples(rows, user_enc, item_enc, resolved, data.unknown_ids)
    user_table = _user_table(user_enc, rows, resolved)
    uris, versions = write_feature_tables(cfg, user_table, item_enc, samples)
    resolved = resolved.model_copy(update={"split_times": split_times, "split": data.split.model_dump(),
                                           "table_versions": versions})
    resolved.save(cfg.warehouse.spec_path)
    cached.unpersist()
    log.info("built features: %s", counts)
    return BuildResult(resolved, uris, counts)


def write_feature_tables(cfg: Config, user_table: DataFrame, item_table: DataFrame,
                         samples: DataFrame) -> tuple[dict[str, str], dict[str, int]]:
    """Overwrite the three feature tables; (their URIs, the Delta version each write made).

    Each table is one atomic commit; the caller saves the versions in the spec, which is
    what readers pin, so a failure part-way leaves the previous spec's snapshot readable.
    """
    uris = {name: cfg.warehouse.uri(name) for name in ("user_features", "item_features", "samples")}
    writer = cfg.warehouse.writer
    versions = {
        "user_features": delta_io.write_table(user_table, uris["user_features"], mode="overwrite", writer=writer),
        "item_features": delta_io.write_table(item_table, uris["item_features"], mode="overwrite", writer=writer),
        "samples": delta_io.write_table(samples, uris["samples"], mode="overwrite", partition_by=["split"],
                                        writer=writer),
    }
    return uris, versions


def _event_rows(events: DataFrame, spec: FeatureSpec, implicit: bool) -> DataFrame:
    k, label = spec.keys, spec.label.name
    cols = [F.col(k.user).alias("user_key"), F.col(k.item).alias("item_key"), F.col(k.timestamp),
            (F.lit(1) if implicit else F.col(label).cast("int")).alias(label),
            (F.col(DWELL).cast("double") if DWELL in events.columns else F.lit(None).cast("double")).alias(DWELL),
            F.lit(True).alias("is_event")]
    cols += [F.col(f.name) for f in spec.features if f.source == "events" and f.kind in (Kind.categorical, Kind.numeric)]
    if spec.weight is not None:
        cols.append(F.col(spec.weight.name))
    cols += [F.col(c).cast("double").alias(c) for c in value_columns(spec)]
    return events.select(*cols)


def _sample_negatives(rows: DataFrame, item_enc: DataFrame, cfg: Config) -> DataFrame:
    """Implicit feedback: ``per_positive`` uniformly drawn items per event, same user and time."""
    neg = cfg.data.negatives
    catalogue = item_enc.select("item_key").withColumn("__pick", F.row_number().over(Window.orderBy("item_key")) - 1)
    n_items = catalogue.count()
    label = cfg.spec.label.name
    draws = (rows.withColumn("__event", F.monotonically_increasing_id())
             .select("user_key", cfg.spec.keys.timestamp, "__event",
                     F.explode(F.sequence(F.lit(1), F.lit(neg.per_positive))).alias("__k")))
    draws = draws.withColumn("__pick", F.floor(uniform(neg.seed, "neg", "user_key", cfg.spec.keys.timestamp, "__event", "__k")
                                               * n_items).cast("int"))
    return (draws.join(catalogue, "__pick")
            .select("user_key", "item_key", cfg.spec.keys.timestamp, F.lit(0).alias(label),
                    F.lit(None).cast("double").alias(DWELL), F.lit(False).alias("is_event")))


def _encode_entity(events: DataFrame, table: Optional[DataFrame], spec: FeatureSpec, role: Role,
                   source: str, stats: dict) -> DataFrame:
    """Encode one entity table; ``<role>_key`` keeps the raw id for joins and serving."""
    key = spec.keys.user if role == Role.user else spec.keys.item
    if table is None:
        table = events.select(key).distinct()
    raw_key = f"{role.value}_key"
    df = table.withColumn(raw_key, F.col(key))
    for f in spec.by_role(role):
        if f.source != source or f.kind == Kind.sequence:
            continue
        if f.kind == Kind.categorical:
            vocab, size = build_vocab(df.select(f.name), f.name, f.min_count if f.name != key else 1)
            df = encode_categorical(df, f.name, vocab)
            stats[f.name] = {"vocab_size": size}
        elif f.kind == Kind.multi_categorical:
            df, size = encode_multi(df, raw_key, f)
            stats[f.name] = {"vocab_size": size}
        elif f.kind == Kind.numeric:
            stats[f.name] = numeric_stats(df, f)
            df = df.withColumn(f.name, encode_numeric(f.model_copy(update=stats[f.name])))
    keep = [raw_key] + [f.name for f in spec.by_role(role) if f.source == source and f.kind != Kind.sequence]
    return df.select(*keep)


def _samples(rows: DataFrame, user_enc: DataFrame, item_enc: DataFrame, spec: FeatureSpec, unknown_ids: str) -> DataFrame:
    joined = rows.join(user_enc, "user_key", "left").join(item_enc.drop(spec.keys.item), "item_key", "left")
    joined = joined.withColumn(spec.keys.item, F.col("__item_idx"))
    if unknown_ids == "oov":
        joined = _fill_missing(joined, spec, spec.keys.user)
    cols = [F.col(f.name) for f in spec.features if f.role not in (Role.label,)]
    return joined.select(
        "user_key", "item_key", spec.keys.timestamp, *cols,
        F.col(spec.label.name).cast("float").alias(spec.label.name), "split")


def _fill_missing(df: DataFrame, spec: FeatureSpec, key: str) -> DataFrame:
    """Rows whose entity was unknown: OOV id, padded lists, zero numerics."""
    for f in spec.input_features():
        if f.name not in df.columns:
            continue
        if f.name in (spec.keys.user, spec.keys.item):
            default = F.lit(OOV_INDEX)
        elif f.is_list:
            default = pad_list(F.array().cast("array<int>"), f.max_len)
        elif f.is_categorical:
            default = F.lit(0)
        else:
            default = F.lit(0.0).cast("float")
        df = df.withColumn(f.name, F.coalesce(F.col(f.name), default))
    return df


def _user_table(user_enc: DataFrame, rows: DataFrame, spec: FeatureSpec) -> DataFrame:
    """Serving snapshot of the users: public features + history as of the user's test start
    (a user without test events: all of their events)."""
    as_of = F.coalesce(F.col(TEST_START), F.lit(2**63 - 1))
    out = user_enc
    for f in spec.user_features:
        if f.kind == Kind.sequence:
            hist = history_as_of(rows, f, spec.keys.timestamp, spec.label.name, "__item_idx", as_of)
            out = out.join(hist, "user_key", "left").withColumn(
                f.name, F.coalesce(F.col(f.name), pad_list(F.array().cast("array<int>"), f.max_len)))
    return out.select("user_key", *[f.name for f in spec.user_features])

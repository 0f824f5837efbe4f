"""Build the feature tables and training samples from raw inputs, all in Spark.

    raw events / users / items
      -> validate (every problem named, before anything is written); non-finite numeric
         values (an error, or missing: data.non_finite) and duplicate events
         (data.duplicates) are handled by policy and counted in the build report
      -> encode entity tables (vocabularies with OOV, numeric normalisation or buckets,
         multi-valued categoricals)                        -> user_features, item_features
      -> rows = events, split by time (one global cut or each user's last events) or at
         random (data without time) (etl/splits.py)
         (+ sampled negatives for implicit feedback, never an item the user interacted
         with in the negative's split or an earlier one)
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
from dataclasses import dataclass, field
from typing import Optional

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from etl import delta_io
from etl.encoders import build_vocab, encode_categorical, encode_multi, encode_numeric, numeric_stats, pad_list
from etl.point_in_time import add_history, add_privileged, history_as_of
from etl.randomness import uniform
from etl.sources import InputError, load_sources
from etl.splits import TEST_START, assign_split
from etl.validation import DWELL, check_unknown_ids, clean_numeric, group_columns, validate_inputs, value_columns
from rec_models.config import Config
from rec_models.spec import OOV_INDEX, Feature, FeatureSpec, Kind, Role

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


@dataclass
class BuildResult:
    spec: FeatureSpec
    tables: dict[str, str]
    counts: dict[str, int]
    # what the build did to the data, also logged: 'numeric' (per table and column: values
    # non_finite, imputed, clamped), 'duplicates' and, for implicit feedback, 'negatives'
    report: dict = field(default_factory=dict)


def build_features(spark: SparkSession, cfg: Config) -> BuildResult:
    # the input checks, statistics and vocabularies each read the sources again (about 20
    # jobs on the default): kept once, in memory or spilled to disk, a generated or parsed
    # source is not computed again for each of them
    sources = [df.persist(StorageLevel.MEMORY_AND_DISK) if df is not None else None
               for df in load_sources(spark, cfg.data)]
    try:
        return _build_features(cfg, *sources)
    finally:
        for df in sources:
            if df is not None:
                df.unpersist()


def _build_features(cfg: Config, events: DataFrame, users: Optional[DataFrame],
                    items: Optional[DataFrame]) -> BuildResult:
    spec, data = cfg.spec, cfg.data
    label = spec.label.name
    has_time = spec.keys.timestamp in events.columns   # absent only under data.split.scheme=random
    if not has_time:
        _refuse_point_in_time(spec)
        events = events.withColumn(spec.keys.timestamp, F.lit(None).cast("long"))
    validate_inputs(events, users, items, spec, data.source.implicit, has_time)
    if users is not None:
        check_unknown_ids(events, users, spec.keys.user, "users", data.unknown_ids)
    if items is not None:
        check_unknown_ids(events, items, spec.keys.item, "items", data.unknown_ids)
    report: dict = {"numeric": {}}
    events, report["numeric"]["events"] = clean_numeric(events, "events", spec, data.non_finite)
    if users is not None:
        users, report["numeric"]["users"] = clean_numeric(users, "users", spec, data.non_finite)
    if items is not None:
        items, report["numeric"]["items"] = clean_numeric(items, "items", spec, data.non_finite)
    report["numeric"] = {t: cols for t, cols in report["numeric"].items() if cols}

    stats: dict[str, dict] = {}
    user_enc = _encode_entity(events, users, spec, Role.user, "users", stats)
    item_enc = _encode_entity(events, items, spec, Role.item, "items", stats)
    group_cols = group_columns(spec)
    item_groups = items.select(F.col(spec.keys.item).alias("item_key"),
                               *[F.col(g).cast("string").alias(f"__group_{g}") for g in group_cols]) if group_cols else None

    rows = _event_rows(events, spec, data.source.implicit)
    rows, report["duplicates"] = _handle_duplicates(rows, spec, data.duplicates)
    rows = rows.withColumn("row_id", F.monotonically_increasing_id())
    rows, split_times = assign_split(rows, data.split, spec.keys.timestamp)
    if data.source.implicit:
        # negatives take their event's split, so they can skip the user's items of that split
        # and earlier ones; row ids are then drawn again over events and negatives
        rows = rows.unionByName(_sample_negatives(rows, item_enc, cfg), allowMissingColumns=True)
        rows = rows.drop("row_id").withColumn("row_id", F.monotonically_increasing_id())

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
    event_numeric = [f for f in spec.features if f.source in ("events", "derived") and f.kind == Kind.numeric]
    stats.update(numeric_stats(train_rows, event_numeric))
    for f in spec.features:
        if f.source == "events" and f.kind == Kind.categorical:
            vocab, size = build_vocab(train_rows.select(f.name), f.name, f.min_count)
            rows = encode_categorical(rows, f.name, vocab)
            stats[f.name] = {"vocab_size": size}
    resolved = spec.resolve(stats)
    event_numeric = [resolved.get(f.name) for f in event_numeric]
    rows = rows.select("*", *[encode_numeric(f).alias(f"__enc_{f.name}") for f in event_numeric])
    for f in event_numeric:
        rows = rows.drop(f.name).withColumnRenamed(f"__enc_{f.name}", f.name)

    by_kind = rows.groupBy("split", "is_event").count().collect()
    counts: dict[str, int] = {}
    for r in by_kind:
        counts[r["split"]] = counts.get(r["split"], 0) + r["count"]
    if data.source.implicit:
        n_events = sum(r["count"] for r in by_kind if r["is_event"])
        sampled = sum(r["count"] for r in by_kind if not r["is_event"])
        requested = n_events * data.negatives.per_positive
        report["negatives"] = {"per_positive": data.negatives.per_positive, "requested": requested,
                               "sampled": sampled, "short": requested - sampled,
                               "excluded": "items the user interacted with in the same or an earlier split"}
    _log_report(report)
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
    return BuildResult(resolved, uris, counts, report)


def _refuse_point_in_time(spec: FeatureSpec) -> None:
    """Without event times there is no 'before': history sequences and derived privileged
    statistics cannot be built point-in-time, so they are refused by name."""
    needs_time = [f.name for f in spec.features if f.kind == Kind.sequence or f.source == "derived"]
    if needs_time:
        raise InputError(
            f"the events table has no time column '{spec.keys.timestamp}', so the point-in-time feature(s) "
            f"{', '.join(needs_time)} (history sequences, derived privileged statistics) cannot be built: "
            f"remove them from data.feature_spec.features, or provide the event time")


def _handle_duplicates(rows: DataFrame, spec: FeatureSpec, policy: str) -> tuple[DataFrame, dict]:
    """Events repeated on the event key (user, item, timestamp): counted, then dropped (one
    row of each kept: the highest label, then the other columns, so it is deterministic),
    kept, or an error (``data.duplicates``)."""
    key = ["user_key", "item_key", spec.keys.timestamp]
    names = f"({spec.keys.user}, {spec.keys.item}, {spec.keys.timestamp})"
    extra = rows.groupBy(*key).count().agg(F.sum(F.col("count") - 1).alias("extra")).first()["extra"] or 0
    out = {"policy": policy, "key": [spec.keys.user, spec.keys.item, spec.keys.timestamp],
           "duplicates": int(extra), "dropped": 0}
    if extra and policy == "error":
        raise InputError(f"events table has {extra} duplicate row(s) on the event key {names}; remove them, "
                         f"or set data.duplicates=drop (keep one row of each) or data.duplicates=keep")
    if extra and policy == "drop":
        order = [F.col(c).desc_nulls_last() for c in rows.columns if c not in key]
        first = Window.partitionBy(*key).orderBy(*order)
        rows = rows.withColumn("__dup", F.row_number().over(first)).where(F.col("__dup") == 1).drop("__dup")
        out["dropped"] = int(extra)
    return rows, out


def _log_report(report: dict) -> None:
    """Log what the build did to the data; anything it changed is a warning."""
    for table, columns in report.get("numeric", {}).items():
        for column, n in columns.items():
            if n["non_finite"]:
                log.warning("%s.%s: %d non-finite value(s) treated as missing (data.non_finite=missing)",
                            table, column, n["non_finite"])
            if n["imputed"]:
                log.warning("%s.%s: %d missing value(s) imputed (0 after normalisation, bucket 0)",
                            table, column, n["imputed"])
            if n["clamped"]:
                log.warning("%s.%s: %d negative value(s) clamped to 0 by log_standard", table, column, n["clamped"])
    dup = report.get("duplicates", {})
    if dup.get("duplicates"):
        log.warning("events: %d duplicate row(s) on %s, policy %s: %d dropped", dup["duplicates"],
                    "/".join(dup["key"]), dup["policy"], dup["dropped"])
    neg = report.get("negatives")
    if neg and neg["short"]:
        log.warning("sampled negatives: %d of %d requested could not be drawn (users who interacted with "
                    "every item)", neg["short"], neg["requested"])
    log.info("build report: %s", report)


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
    """Implicit feedback: ``per_positive`` items per event (same user, time and split),
    drawn uniformly from the catalogue minus the items the user interacted with in the
    event's split or an earlier one.

    Exact without rejection and without a collect: items get catalogue positions 0..n-1;
    per user and split, the sorted positions of the excluded items are joined to the
    draws; a draw j in [0, n - excluded) is mapped to the j-th free position by walking
    those positions (``p = j; for e in excluded: if e <= p: p += 1``). A user who
    interacted with every item gets no negatives (counted as ``short`` in the report).
    """
    neg, ts, label = cfg.data.negatives, cfg.spec.keys.timestamp, cfg.spec.label.name
    catalogue = item_enc.select("item_key").withColumn(
        "__pos", (F.row_number().over(Window.orderBy("item_key")) - 1).cast("int"))
    n_items = catalogue.count()
    rank = F.when(F.col("split") == "train", 0).when(F.col("split") == "valid", 1).otherwise(2)
    seen = (rows.select("user_key", "item_key", rank.alias("__rank")).join(catalogue, "item_key")
            .groupBy("user_key", "__pos").agg(F.min("__rank").alias("__first")))
    # an item first seen in split r is excluded from the negatives of r and every later split
    excluded = (seen.select("user_key", "__pos", F.explode(F.sequence(F.col("__first"), F.lit(2))).alias("__rank"))
                .groupBy("user_key", "__rank").agg(F.sort_array(F.collect_list("__pos")).alias("__excl")))
    draws = (rows.select("user_key", F.col("item_key").alias("__event_item"), ts, "split", TEST_START,
                         rank.alias("__rank"),
                         F.explode(F.sequence(F.lit(1), F.lit(neg.per_positive))).alias("__k"))
             .join(excluded, ["user_key", "__rank"], "left")
             .withColumn("__excl", F.coalesce("__excl", F.array().cast("array<int>")))
             .withColumn("__free", F.lit(n_items) - F.size("__excl"))
             .where(F.col("__free") > 0))
    u = uniform(neg.seed, "neg", "user_key", "__event_item", ts, "__k")
    draws = draws.withColumn("__j", F.least(F.floor(u * F.col("__free")).cast("int"), F.col("__free") - 1))
    draws = draws.withColumn("__pos", F.aggregate(
        "__excl", F.col("__j"), lambda p, e: F.when(e <= p, p + 1).otherwise(p)))
    return (draws.join(catalogue, "__pos")
            .select("user_key", "item_key", ts, F.lit(0).alias(label),
                    F.lit(None).cast("double").alias(DWELL), F.lit(False).alias("is_event"), "split", TEST_START))


def _encode_entity(events: DataFrame, table: Optional[DataFrame], spec: FeatureSpec, role: Role,
                   source: str, stats: dict) -> DataFrame:
    """Encode one entity table; ``<role>_key`` keeps the raw id for joins and serving."""
    key = spec.keys.user if role == Role.user else spec.keys.item
    if table is None:
        table = events.select(key).distinct()
    raw_key = f"{role.value}_key"
    df = table.withColumn(raw_key, F.col(key))
    stats.update(numeric_stats(table, [f for f in spec.by_role(role) if f.source == source and f.kind == Kind.numeric]))
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

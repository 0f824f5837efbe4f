"""The IntTower paper's MovieLens protocol (Li et al., "IntTower: the Next Generation of
Two-Tower Model for Pre-Ranking System", CIKM 2022, Table 2), as Spark ETL.

What the paper's code (train_movielens_*.py) does, and what this module does with it:

- drop ratings of 3, label = rating > 3: the dataset conf's ``data.source.label_from``
  (``drop_values: [3]``, ``positive_min: 4`` on whole stars), applied by
  :func:`etl.sources.load_sources` while reading with :func:`etl.movielens.read_movielens`;
- random split, 20% test, then 20% of the rest as validation (its ``validation_split``):
  ``data.split.test_fraction`` / ``valid_fraction`` of all rows, drawn per row from a hash
  of (user, item, timestamp, seed) -- reproducible whatever Spark's partitioning, and the
  split does not depend on the ratings;
- ``user_mean_rating`` / ``item_mean_rating``: in the paper the mean of the *binarised*
  rating (the label) per user / item, computed separately over its train split and over
  its test split, each row's own label included -- the test rows' features average the
  test labels (a leak). Two variants here:

  ``leaky``      as the paper: train and valid rows (the paper's train split) get means
                 over those rows, test rows means over the test rows;
  ``leak_free``  means over the train split only, for every row; a user or item with no
                 train row gets the global train mean. Test ratings cannot reach them.

Deliberate deviations: the paper's inner merge also drops, per split, the rows of users
with no positive in that split; they are kept (so both variants score the same test rows)
and counted in ``PreparedData.paper_merge_would_drop``. Numeric features are standardised
with train-row statistics (the paper min-max scales).

Entity features are encoded once (:func:`load_inputs`, reusing etl/build.py's entity
encoder); each (seed, variant) then only splits, averages and writes (:func:`prepare`):
``user_features`` / ``item_features`` / ``samples`` through :mod:`etl.delta_io`, plus the
resolved FeatureSpec, so training reads them like any build (``orchestration.pipeline.train``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from etl.build import SPLITS, _encode_entity, _samples, write_feature_tables
from etl.encoders import encode_numeric, numeric_stats
from etl.randomness import uniform
from etl.sources import InputError, load_sources
from etl.validation import check_unknown_ids, validate_inputs
from rec_models.config import Config
from rec_models.spec import OOV_INDEX, FeatureSpec, Kind, Role

log = logging.getLogger(__name__)

VARIANTS = ("leaky", "leak_free")
USER_MEAN, ITEM_MEAN = "user_mean_rating", "item_mean_rating"
SPLIT_SALT = "inttower_paper_split"


@dataclass
class ProtocolInputs:
    """Labelled event rows and encoded entity tables, shared by every (seed, variant)."""
    rows: DataFrame        # user_key, item_key, timestamp, label, __item_idx (cached)
    user_enc: DataFrame    # user_key + encoded user features from the users table (cached)
    item_enc: DataFrame    # item_key + encoded item features (cached)
    stats: dict            # entity features' vocabulary sizes
    num_rows: int

    def unpersist(self) -> None:
        for df in (self.rows, self.user_enc, self.item_enc):
            df.unpersist()


@dataclass
class MeanFeatures:
    rows: DataFrame        # the input rows with raw (unencoded) user_mean_rating / item_mean_rating
    users: DataFrame       # user_key -> train-side mean: the value a server would hold
    items: DataFrame       # item_key -> train-side mean
    global_mean: float     # train-side label mean: the value of a user / item without one


@dataclass
class PreparedData:
    spec: FeatureSpec
    tables: dict[str, str]
    counts: dict[str, int]                 # rows per split
    positive_rate: dict[str, float]        # label mean per split
    paper_merge_would_drop: dict[str, int] = field(default_factory=dict)  # rows, per paper split
    seconds: float = 0.0


def check_spec(spec: FeatureSpec) -> None:
    """The spec must declare the two mean features as numeric user / item features read
    from the events (the protocol fills those columns)."""
    for name, role in ((USER_MEAN, Role.user), (ITEM_MEAN, Role.item)):
        try:
            f = spec.get(name)
        except KeyError:
            raise InputError(f"the IntTower protocol fills '{name}': declare it in the FeatureSpec "
                             f"(role {role.value}, kind numeric, source events)") from None
        if f.role != role or f.kind != Kind.numeric or f.source != "events":
            raise InputError(f"feature '{name}' must be role {role.value}, kind numeric, source events "
                             f"(got {f.role.value}, {f.kind.value}, {f.source})")
    other = [f.name for f in spec.features if f.source in ("events", "derived")
             and f.name not in (USER_MEAN, ITEM_MEAN) and f.role != Role.label]
    if other:
        raise InputError(f"the IntTower protocol builds only the paper's features; it cannot fill {other}")


def load_inputs(spark: SparkSession, cfg: Config) -> ProtocolInputs:
    """Read, label (dropping 3s), validate, and encode the entity tables once."""
    data, spec = cfg.data, cfg.spec
    if data.source.label_from is None:
        raise InputError("the IntTower protocol labels ratings: set data.source.label_from "
                         "(the paper: drop_values [3], positive_min 4)")
    check_spec(spec)
    events, users, items = load_sources(spark, data)
    validate_inputs(events, users, items, spec, implicit=False)
    if users is not None:
        check_unknown_ids(events, users, spec.keys.user, "users", data.unknown_ids)
    if items is not None:
        check_unknown_ids(events, items, spec.keys.item, "items", data.unknown_ids)
    stats: dict[str, dict] = {}
    user_enc = _encode_entity(events, users, spec, Role.user, "users", stats).cache()
    item_enc = _encode_entity(events, items, spec, Role.item, "items", stats).cache()
    k, label = spec.keys, spec.label.name
    rows = events.select(F.col(k.user).alias("user_key"), F.col(k.item).alias("item_key"),
                         F.col(k.timestamp), F.col(label).cast("int").alias(label))
    item_index = item_enc.select("item_key", F.col(k.item).alias("__item_idx"))
    rows = (rows.join(item_index, "item_key", "left")
            .withColumn("__item_idx", F.coalesce("__item_idx", F.lit(OOV_INDEX)))).cache()
    n = rows.count()
    return ProtocolInputs(rows, user_enc, item_enc, stats, n)


def assign_splits(rows: DataFrame, seed: int, valid_fraction: float, test_fraction: float,
                  timestamp: str = "timestamp") -> DataFrame:
    """``split`` per row: test with probability ``test_fraction``, valid ``valid_fraction``,
    else train; a hash of the row's keys and ``seed``, not ``rand()``."""
    u = uniform(seed, SPLIT_SALT, "user_key", "item_key", timestamp)
    return rows.withColumn("split", F.when(u < test_fraction, "test")
                           .when(u < test_fraction + valid_fraction, "valid").otherwise("train"))


def _paper_part(split: str = "split"):
    """The paper's two splits: its train split is our train + valid."""
    return F.when(F.col(split) == "test", "test").otherwise("train")


def _group_means(rows: DataFrame, key: str, name: str, label: str) -> DataFrame:
    return rows.groupBy(key, "__group").agg(F.avg(F.col(label).cast("double")).alias(name))


def add_mean_features(rows: DataFrame, variant: str, label: str = "label") -> MeanFeatures:
    """Add raw ``user_mean_rating`` / ``item_mean_rating`` to ``rows`` (which carry ``split``).

    Each row averages the labels of its *statistics group*: ``leaky``: its own paper split
    (train+valid, or test); ``leak_free``: the train split, whatever the row's split.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; known: {', '.join(VARIANTS)}")
    if variant == "leaky":
        fit = rows.withColumn("__group", _paper_part())
        rows = rows.withColumn("__group", _paper_part())
    else:
        fit = rows.where(F.col("split") == "train").withColumn("__group", F.lit("train"))
        rows = rows.withColumn("__group", F.lit("train"))
    users = _group_means(fit, "user_key", USER_MEAN, label)
    items = _group_means(fit, "item_key", ITEM_MEAN, label)
    glob = {r["__group"]: r["m"] for r in fit.groupBy("__group").agg(
        F.avg(F.col(label).cast("double")).alias("m")).collect()}
    if glob.get("train") is None:
        raise InputError("the train split is empty: nothing to average the mean-rating features over")
    fill = F.when(F.col("__group") == "train", F.lit(glob["train"])).otherwise(F.lit(glob.get("test")))
    out = (rows.join(users, ["user_key", "__group"], "left").join(items, ["item_key", "__group"], "left")
           .withColumn(USER_MEAN, F.coalesce(USER_MEAN, fill))
           .withColumn(ITEM_MEAN, F.coalesce(ITEM_MEAN, fill)).drop("__group"))
    train_side = F.col("__group") == "train"
    return MeanFeatures(out, users.where(train_side).drop("__group"), items.where(train_side).drop("__group"),
                        float(glob["train"]))


def prepare(cfg: Config, inputs: ProtocolInputs, seed: int, variant: str) -> PreparedData:
    """Split with ``seed``, add the ``variant``'s mean features, encode, and write the three
    tables and the resolved spec under ``cfg.warehouse`` (one (seed, variant) build)."""
    t0 = time.perf_counter()
    spec, label = cfg.spec, cfg.spec.label.name
    split = cfg.data.split
    rows = assign_splits(inputs.rows, seed, split.valid_fraction, split.test_fraction, spec.keys.timestamp)
    means = add_mean_features(rows, variant, label)
    rows = means.rows.cache()
    train_rows = rows.where(F.col("split") == "train")
    stats = dict(inputs.stats)
    stats.update(numeric_stats(train_rows, [spec.get(USER_MEAN), spec.get(ITEM_MEAN)]))
    resolved = spec.resolve(stats)

    summary = rows.groupBy("split").agg(F.count(F.lit(1)).alias("n"), F.avg(label).alias("p")).collect()
    counts = {r["split"]: int(r["n"]) for r in summary}
    for s in SPLITS:
        if not counts.get(s):
            raise InputError(f"the {s} split is empty: too few rows for the random split "
                             f"(valid {split.valid_fraction}, test {split.test_fraction})")
    dropped = (rows.groupBy("user_key", _paper_part().alias("part"))
               .agg(F.max(label).alias("any_pos"), F.count(F.lit(1)).alias("n"))
               .where(F.col("any_pos") == 0).groupBy("part").agg(F.sum("n").alias("n")).collect())

    encoded = rows
    for name in (USER_MEAN, ITEM_MEAN):
        encoded = encoded.withColumn(name, encode_numeric(resolved.get(name)))
    samples = _samples(encoded, inputs.user_enc, inputs.item_enc, resolved, cfg.data.unknown_ids)
    user_table = _with_serving_mean(inputs.user_enc, means.users, "user_key", resolved.get(USER_MEAN),
                                    means.global_mean).select("user_key", *resolved.columns(resolved.user_features))
    item_table = _with_serving_mean(inputs.item_enc, means.items, "item_key", resolved.get(ITEM_MEAN),
                                    means.global_mean).select("item_key", *resolved.columns(resolved.item_features))
    uris, versions = write_feature_tables(cfg, user_table, item_table, samples)
    resolved = resolved.model_copy(update={"table_versions": versions})
    resolved.save(cfg.warehouse.spec_path)
    rows.unpersist()
    out = PreparedData(resolved, uris, counts, {r["split"]: float(r["p"]) for r in summary},
                       {r["part"]: int(r["n"]) for r in dropped}, time.perf_counter() - t0)
    log.info("IntTower protocol seed %d %s: %s in %.1fs", seed, variant, counts, out.seconds)
    return out


def _with_serving_mean(entity: DataFrame, means: DataFrame, key: str, feature, global_mean: float) -> DataFrame:
    """The entity table with its serving mean (train-side; the global one when absent), encoded."""
    return (entity.join(means, key, "left")
            .withColumn(feature.name, F.coalesce(feature.name, F.lit(global_mean)))
            .withColumn(feature.name, encode_numeric(feature)))

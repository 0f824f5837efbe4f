"""Encoding raw columns into the FeatureSpec's layout (see rec_models/spec.py).

Vocabularies: values seen at least ``min_count`` times get indices from 2 by descending
frequency (ties by value, so indices are deterministic); 0 is padding / missing, 1 is the
out-of-vocabulary bucket. Statistics (vocabulary sizes, mean / std, bucket boundaries)
come back as a dict that resolves the FeatureSpec.
"""
from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from rec_models.spec import FIRST_INDEX, OOV_INDEX, PAD_INDEX, Feature


def build_vocab(values: DataFrame, column: str, min_count: int) -> tuple[DataFrame, int]:
    """(value -> index) frame and the embedding table size (known values + pad + OOV)."""
    counts = values.where(F.col(column).isNotNull()).groupBy(column).count().where(F.col("count") >= min_count)
    # a global order is needed for stable indices; vocabularies are small next to events
    ordered = Window.orderBy(F.desc("count"), F.asc(column))
    vocab = counts.select(column, (F.row_number().over(ordered) + (FIRST_INDEX - 1)).cast("int").alias("index"))
    vocab = vocab.cache()
    size = vocab.count() + FIRST_INDEX
    return vocab, size


def encode_categorical(df: DataFrame, column: str, vocab: DataFrame, out: str | None = None) -> DataFrame:
    """Replace ``column`` by its index: null -> PAD, unseen -> OOV."""
    out = out or column
    v = vocab.withColumnRenamed(column, "__value").withColumnRenamed("index", "__index")
    # no broadcast hint: the vocabulary is cached, so Spark knows its size and broadcasts
    # small ones by itself while item-id vocabularies of millions stay a shuffle join
    joined = df.join(v, df[column] == v["__value"], "left")
    index = (F.when(F.col(column).isNull(), F.lit(PAD_INDEX))
              .otherwise(F.coalesce(F.col("__index"), F.lit(OOV_INDEX))).cast("int"))
    return joined.withColumn(out, index).drop("__value", "__index")


def split_tokens(column: Column, separator: str) -> Column:
    """A string 'a|b|c' or an array column -> array<string> without empties."""
    return F.filter(F.split(column, _regex_escape(separator)), lambda t: F.length(t) > 0)


def _regex_escape(s: str) -> str:
    return "".join("\\" + ch if ch in r".^$*+?{}[]\|()" else ch for ch in s)


def encode_multi(df: DataFrame, key: str, feature: Feature) -> tuple[DataFrame, int]:
    """Multi-valued categorical of an entity table -> array<int> padded to max_len."""
    name = feature.name
    tokens = df.select(key, F.posexplode_outer(_as_array(df, name, feature.separator)).alias("pos", name))
    vocab, size = build_vocab(tokens.select(name), name, feature.min_count)
    indexed = encode_categorical(tokens.where(F.col(name).isNotNull()), name, vocab)
    lists = (indexed.groupBy(key)
             .agg(F.sort_array(F.collect_list(F.struct("pos", name))).alias("__pairs"))
             .select(key, pad_list(F.transform("__pairs", lambda p: p[name]), feature.max_len).alias(name)))
    empty = pad_list(F.array().cast("array<int>"), feature.max_len)
    return (df.drop(name).join(lists, key, "left")
            .withColumn(name, F.coalesce(F.col(name), empty))), size


def _as_array(df: DataFrame, name: str, separator: str) -> Column:
    if df.schema[name].dataType.simpleString().startswith("array"):
        return F.col(name).cast("array<string>")
    return split_tokens(F.col(name).cast("string"), separator)


def pad_list(arr: Column, max_len: int) -> Column:
    """Keep the last ``max_len`` elements and right-pad with PAD to exactly ``max_len``."""
    n = F.size(arr)
    kept = F.when(n > max_len, F.slice(arr, -max_len, max_len)).otherwise(arr)
    pad = F.array_repeat(F.lit(PAD_INDEX), F.greatest(F.lit(0), F.lit(max_len) - F.size(kept)))
    return F.concat(kept.cast("array<int>"), pad.cast("array<int>"))


def numeric_stats(df: DataFrame, features: list[Feature]) -> dict[str, dict]:
    """``{name: statistics}`` of numeric features over ``df`` (the training rows or the
    entity table), in one pass over ``df`` for all means and standard deviations and one
    per bucket count for the quantiles: ``df`` is often a long lineage (the point-in-time
    windows over every event) that a job per feature would compute again each time."""
    out: dict[str, dict] = {f.name: {} for f in features if f.transform == "none"}
    scaled = [f for f in features if f.transform in ("standard", "log_standard")]
    if scaled:
        row = df.agg(*[agg(_prepared(F.col(f.name), f)).alias(f"{stat}{i}") for i, f in enumerate(scaled)
                       for stat, agg in (("mean", F.avg), ("std", F.stddev_pop))]).first()
        for i, f in enumerate(scaled):
            mean, std = row[f"mean{i}"], row[f"std{i}"]
            out[f.name] = {"mean": float(mean) if mean is not None else 0.0,
                           "std": float(std) if std is not None and std > 1e-12 else 1.0}
    bucketed = [f for f in features if f.transform == "bucketize"]
    for buckets in sorted({f.num_buckets for f in bucketed}):
        group = [f for f in bucketed if f.num_buckets == buckets]
        probs = [i / buckets for i in range(1, buckets)]
        # approxQuantile leaves each column's nulls (and NaNs, nulls once prepared) out
        qs = df.select(*[_prepared(F.col(f.name), f).alias(f"x{i}") for i, f in enumerate(group)]).approxQuantile(
            [f"x{i}" for i in range(len(group))], probs, 1e-3)
        for f, q in zip(group, qs):
            out[f.name] = {"boundaries": tuple(sorted(set(float(v) for v in q)))}
    return out


def _prepared(x: Column, feature: Feature) -> Column:
    x = x.cast("double")
    x = F.when(F.isnan(x), None).otherwise(x)
    if feature.transform == "log_standard":
        return F.log1p(F.greatest(x, F.lit(0.0)))
    return x


def encode_numeric(feature: Feature) -> Column:
    """The encoded column for a resolved numeric feature (nulls -> 0 / bucket 0)."""
    x = _prepared(F.col(feature.name), feature)
    if feature.transform == "bucketize":
        bucket = F.lit(1)
        for b in feature.boundaries or ():
            bucket = bucket + F.when(x > F.lit(b), 1).otherwise(0)
        return F.when(x.isNull(), F.lit(PAD_INDEX)).otherwise(bucket).cast("int").alias(feature.name)
    if feature.transform in ("standard", "log_standard"):
        x = (x - F.lit(feature.mean)) / F.lit(feature.std)
    return F.coalesce(x, F.lit(0.0)).cast("float").alias(feature.name)

"""Train / valid / test by time: one global cut, or each user's own last events.

``global``: two cut-off times over all events; the last ``test_fraction`` of all events is
  the test split. This is an offline replay of a model deployed at the cut, and it
  includes users who arrive after it. On MovieLens 100K, 86% of the test ratings belong to
  users with no training rating, which makes it a cold-start benchmark.
``per_user``: each user's own chronologically last ``test_fraction`` of events is test,
  and the ``valid_fraction`` before them is valid ("leave last out", the usual protocol
  for warm users). Every test user has a training history. Another user's training event
  may be later than a test event; features stay point-in-time either way. Users with too
  few events to give one test event (fewer than 1 / test_fraction) stay in training.

``random``: for data without a time column (or when a time split is not wanted): each
  event's split is drawn from a hash of (user, item, time) and ``seed``, so it does not
  depend on partitioning. ``random_by: global`` draws every event on its own (test with
  probability ``test_fraction``); ``random_by: per_user`` holds out a random
  ``floor(n * test_fraction)`` of each user's n events as test and the
  ``floor(n * valid_fraction)`` before them in the drawn order as valid.

Ties: under the time schemes, events of one user in the same second always fall in the
same split. Sampled negatives take the split of the event they were drawn for.
"""
from __future__ import annotations

from typing import Optional

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from etl.randomness import uniform
from rec_models.config import SplitConf

TEST_START = "__test_start"   # per row: the first test timestamp of the row's user (null: none)


def assign_split(rows: DataFrame, conf: SplitConf, ts: str) -> tuple[DataFrame, Optional[dict[str, int]]]:
    """``rows`` with ``split`` and ``TEST_START``; the global cut times (None per user)."""
    if conf.scheme == "random":
        return _random_split(rows, conf, ts), None
    if conf.scheme == "global":
        q = rows.where("is_event").approxQuantile(
            ts, [1 - conf.valid_fraction - conf.test_fraction, 1 - conf.test_fraction], 1e-4)
        t_valid, t_test = int(q[0]), int(q[1])
        rows = rows.withColumn("__valid_start", F.lit(t_valid).cast("long")) \
                   .withColumn(TEST_START, F.lit(t_test).cast("long"))
        times = {"valid": t_valid, "test": t_test}
    else:
        rows = rows.join(_per_user_starts(rows, conf, ts), "user_key", "left")
        times = None
    split = (F.when(F.col(ts) >= F.col(TEST_START), "test")
             .when(F.col(ts) >= F.col("__valid_start"), "valid").otherwise("train"))
    return rows.withColumn("split", split).drop("__valid_start"), times


def _per_user_starts(rows: DataFrame, conf: SplitConf, ts: str) -> DataFrame:
    """(user_key, __valid_start, __test_start): the timestamps of the user's first valid
    and first test event. With n events, the last floor(n * test_fraction) are test and
    the floor(n * valid_fraction) before them valid."""
    ranked = rows.where("is_event").select(
        "user_key", F.col(ts).cast("long").alias("__t"),
        F.row_number().over(Window.partitionBy("user_key").orderBy(ts, "row_id")).alias("__r"),
        F.count(F.lit(1)).over(Window.partitionBy("user_key")).alias("__n"))
    n_test = F.floor(F.col("__n") * conf.test_fraction)
    n_held = n_test + F.floor(F.col("__n") * conf.valid_fraction)
    return ranked.groupBy("user_key").agg(
        F.min(F.when(F.col("__r") > F.col("__n") - n_held, F.col("__t"))).alias("__valid_start"),
        F.min(F.when(F.col("__r") > F.col("__n") - n_test, F.col("__t"))).alias(TEST_START))


def _random_split(rows: DataFrame, conf: SplitConf, ts: str) -> DataFrame:
    """Seeded random split of the event rows; ``TEST_START``: the user's first test time
    (null without time), so a serving history stops before the user's test events."""
    u = uniform(conf.seed, "split", "user_key", "item_key", ts)
    if conf.random_by == "global":
        split = (F.when(u < conf.test_fraction, "test")
                 .when(u < conf.test_fraction + conf.valid_fraction, "valid").otherwise("train"))
        rows = rows.withColumn("split", split)
    else:
        by_user = Window.partitionBy("user_key")
        rows = (rows.withColumn("__u", u)
                .withColumn("__r", F.row_number().over(by_user.orderBy("__u", "row_id")))
                .withColumn("__n", F.count(F.lit(1)).over(by_user)))
        n_test = F.floor(F.col("__n") * conf.test_fraction)
        n_held = n_test + F.floor(F.col("__n") * conf.valid_fraction)
        split = (F.when(F.col("__r") > F.col("__n") - n_test, "test")
                 .when(F.col("__r") > F.col("__n") - n_held, "valid").otherwise("train"))
        rows = rows.withColumn("split", split).drop("__u", "__r", "__n")
    starts = (rows.where(F.col("split") == "test").groupBy("user_key")
              .agg(F.min(F.col(ts).cast("long")).alias(TEST_START)))
    return rows.join(starts, "user_key", "left")

"""Point-in-time features: privileged user x item statistics and history sequences.

Every value of a row at time t is computed from events strictly before t: windows end at
``-1`` second (range frames on integer-second timestamps), so neither the row's own event
nor any event in the same second or later can leak into it. Sampled negatives
(``is_event = false``) get features but never contribute to anyone's statistics.
"""
from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from etl.encoders import pad_list
from rec_models.spec import Feature, FeatureSpec

CTR_PRIOR_STRENGTH = 5.0  # pseudo-impressions of the smoothed CTR


def _frame(partition: list[str], ts: str, window_days: float | None):
    w = Window.partitionBy(*partition).orderBy(ts)
    start = -int(window_days * 86400) if window_days else Window.unboundedPreceding
    return w.rangeBetween(start, -1)


def add_privileged(rows: DataFrame, spec: FeatureSpec, label: str, group_columns: dict[str, str],
                   prior_ctr: float) -> DataFrame:
    """Add every derived privileged column (raw, before normalisation).

    ``group_columns`` maps an item grouping column (e.g. 'category') to the column of
    ``rows`` holding the raw group value.
    """
    ts, user, item = spec.keys.timestamp, "user_key", "item_key"
    event = F.col("is_event")
    click = F.when(event, F.col(label)).otherwise(0)
    for f in spec.features:
        if f.derive is None:
            continue
        if f.derive == "user_item_impressions":
            frame = _frame([user, item], ts, f.window_days)
            value = F.sum(F.when(event, 1).otherwise(0)).over(frame)
        else:
            frame = _frame([user, group_columns[f.group_by]], ts, f.window_days)
            value = _category_statistic(f, frame, event, click, prior_ctr)
        rows = rows.withColumn(f.name, F.coalesce(value.cast("double"), _empty_value(f, prior_ctr)))
    return rows


def _category_statistic(f: Feature, frame, event: Column, click: Column, prior_ctr: float) -> Column:
    if f.derive == "user_category_clicks":
        return F.sum(click).over(frame)
    if f.derive == "user_category_ctr":
        clicks = F.sum(click).over(frame)
        shown = F.sum(F.when(event, 1).otherwise(0)).over(frame)
        return (clicks + CTR_PRIOR_STRENGTH * prior_ctr) / (shown + CTR_PRIOR_STRENGTH)
    if f.derive == "user_category_mean_dwell":
        return F.avg(F.when(event & (click == 1), F.log1p(F.col("dwell_time")))).over(frame)
    raise ValueError(f"feature '{f.name}': unknown derivation '{f.derive}'")


def _empty_value(f: Feature, prior_ctr: float) -> Column:
    """Value when the window holds no event: zero counts, the prior CTR, or null dwell."""
    if f.derive == "user_category_ctr":
        return F.lit(prior_ctr)
    if f.derive == "user_category_mean_dwell":
        return F.lit(None).cast("double")  # encoded as 0 after standardisation: the mean
    return F.lit(0.0)


def add_history(rows: DataFrame, feature: Feature, ts: str, label: str, item_index: str, lookback: int) -> DataFrame:
    """Clicked items before each row, oldest first, the last ``max_len`` of them.

    The frame scans the previous ``lookback`` rows of the user (bounded work per row);
    the filter on the timestamp keeps only events strictly earlier than the row.
    """
    w = (Window.partitionBy("user_key").orderBy(ts, "row_id").rowsBetween(-lookback, -1))
    clicked = F.when(F.col("is_event") & (F.col(label) == 1), F.struct(F.col(ts).alias("t"), F.col(item_index).alias("i")))
    past = F.collect_list(clicked).over(w)
    items = F.transform(F.filter(past, lambda x: x["t"] < F.col(ts)), lambda x: x["i"])
    return rows.withColumn(feature.name, pad_list(items, feature.max_len))


def history_as_of(rows: DataFrame, feature: Feature, ts: str, label: str, item_index: str, as_of: int) -> DataFrame:
    """(user_key, sequence) of the last ``max_len`` clicks before ``as_of``, for serving."""
    recent = (rows.where(F.col("is_event") & (F.col(label) == 1) & (F.col(ts) < as_of))
              .withColumn("__rank", F.row_number().over(
                  Window.partitionBy("user_key").orderBy(F.desc(ts), F.desc("row_id"))))
              .where(F.col("__rank") <= feature.max_len))
    return (recent.groupBy("user_key")
            .agg(F.sort_array(F.collect_list(F.struct(F.col(ts), F.col("row_id"), F.col(item_index).alias("i"))))
                 .alias("__h"))
            .select("user_key", pad_list(F.transform("__h", lambda x: x["i"]), feature.max_len).alias(feature.name)))

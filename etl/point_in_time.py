"""Point-in-time features: privileged user x item statistics and history sequences.

Every value of a row at time t is computed from events strictly before t: windows end at
``-1`` second (range frames on integer-second timestamps), so neither the row's own event
nor any event in the same second or later can leak into it. Sampled negatives
(``is_event = false``) get features but never contribute to anyone's statistics.
"""
from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from etl.encoders import pad_list, split_tokens
from rec_models.config import ConfigError
from rec_models.spec import Feature, FeatureSpec

CTR_PRIOR_STRENGTH = 5.0   # pseudo-impressions of the smoothed CTR
MEAN_PRIOR_STRENGTH = 5.0  # pseudo-events of the smoothed mean statistics (e.g. ratings)
_EXPLODED = ("user_group_count", "user_group_mean")


def _frame(partition: list[str], ts: str, window_days: float | None):
    w = Window.partitionBy(*partition).orderBy(ts)
    start = -int(window_days * 86400) if window_days else Window.unboundedPreceding
    return w.rangeBetween(start, -1)


def add_privileged(rows: DataFrame, spec: FeatureSpec, label: str, group_columns: dict[str, str]) -> DataFrame:
    """Add every derived privileged column (raw, before normalisation).

    ``group_columns`` maps an item grouping column (e.g. 'category') to the column of
    ``rows`` holding the raw group value. Smoothed statistics shrink towards a prior that
    is itself point-in-time: the mean over all events of the days before the row's day.
    """
    ts, user, item = spec.keys.timestamp, "user_key", "item_key"
    event = F.col("is_event")
    click = F.when(event, F.col(label)).otherwise(0)
    averaged = [label] + sorted({f.value_column for f in spec.features if f.value_column})
    rows = _add_running_priors(rows, averaged, ts)
    priors = {c: F.col(f"__prior_{c}") for c in averaged}
    for f in spec.features:
        if f.derive is None or f.derive in _EXPLODED:
            continue
        if f.derive == "user_item_impressions":
            frame = _frame([user, item], ts, f.window_days)
            value = F.sum(F.when(event, 1).otherwise(0)).over(frame)
        elif f.derive == "item_mean":
            frame = _frame([item], ts, f.window_days)
            value = _smoothed_mean(F.sum(F.when(event, F.col(f.value_column))).over(frame),
                                   F.sum(F.when(event, 1).otherwise(0)).over(frame), priors[f.value_column])
        else:
            frame = _frame([user, group_columns[f.group_by]], ts, f.window_days)
            value = _category_statistic(f, frame, event, click, priors[label])
        rows = rows.withColumn(f.name, F.coalesce(value.cast("double"), _empty_value(f, priors, label)))
    for group in sorted({f.group_by for f in spec.features if f.derive in _EXPLODED}):
        features = [f for f in spec.features if f.derive in _EXPLODED and f.group_by == group]
        # a group column that is also a declared multi-valued feature splits as that feature does
        declared = {f.name: f for f in spec.features}
        sep = declared[group].separator if group in declared else features[0].separator
        rows = _add_multi_group_statistics(rows, features, group_columns[group], sep, ts, priors, label)
    return rows.drop(*[f"__prior_{c}" for c in averaged])


def _add_running_priors(rows: DataFrame, columns: list[str], ts: str) -> DataFrame:
    """``__prior_<c>``: the mean of ``c`` over all events of the days before the row's day.

    Daily sums are tiny (one row a day), so the running total over them is cheap; events
    earlier on the row's own day are left out, so the prior never sees the row's future.
    Null on the first day (no past at all).
    """
    day = F.floor(F.col(ts) / 86400).alias("__day")
    daily = (rows.where(F.col("is_event")).groupBy(day)
             .agg(*[F.sum(c).alias(f"__s_{c}") for c in columns], *[F.count(c).alias(f"__n_{c}") for c in columns]))
    before = Window.orderBy("__day").rowsBetween(Window.unboundedPreceding, -1)
    daily = daily.select("__day", *[(F.sum(f"__s_{c}").over(before) / F.sum(f"__n_{c}").over(before))
                                    .alias(f"__prior_{c}") for c in columns])
    return rows.withColumn("__day", day).join(F.broadcast(daily), "__day", "left").drop("__day")


def _smoothed_mean(total: Column, count: Column, prior: Column, strength: float = MEAN_PRIOR_STRENGTH) -> Column:
    """(sum + m * prior) / (count + m): the prior when there is no past, the mean with much
    (the plain mean while there is no prior yet)."""
    total = F.coalesce(total, F.lit(0.0))
    return F.when(prior.isNull(), F.when(count > 0, total / count)).otherwise(
        (total + strength * prior) / (count + strength))


def _add_multi_group_statistics(rows: DataFrame, features: list[Feature], group_col: str, sep: str, ts: str,
                                priors: dict[str, Column], label: str) -> DataFrame:
    """User x group statistics where an item has several groups (a movie's genres).

    Each row is exploded into one row per group of its item; the windows run over
    (user, group) strictly before the row's time, and the row's value combines its groups:
    counts are averaged over the item's groups, means pool the groups' sums and counts
    (a past event sharing two groups with the item counts twice).
    """
    event = F.col("is_event")
    exploded = rows.select("row_id", "user_key", ts, "is_event",
                           *sorted({f.value_column for f in features if f.value_column}),
                           F.explode(split_tokens(F.col(group_col), sep)).alias("__g"))
    per_group, pooled = [], []
    for i, f in enumerate(features):
        frame = _frame(["user_key", "__g"], ts, f.window_days)
        # an empty frame sums to null: a group with no past counts 0 in the average
        per_group.append(F.coalesce(F.sum(F.when(event, 1).otherwise(0)).over(frame), F.lit(0)).alias(f"__n{i}"))
        pooled += [F.avg(f"__n{i}").alias(f"__avg_n{i}"), F.sum(f"__n{i}").alias(f"__sum_n{i}")]
        if f.value_column:
            per_group.append(F.sum(F.when(event, F.col(f.value_column))).over(frame).alias(f"__s{i}"))
            pooled.append(F.sum(f"__s{i}").alias(f"__sum_s{i}"))
    stats = exploded.select("row_id", *per_group).groupBy("row_id").agg(*pooled)
    out = rows.join(stats, "row_id", "left")
    for i, f in enumerate(features):
        if f.derive == "user_group_count":
            value = F.col(f"__avg_n{i}")
        else:
            value = _smoothed_mean(F.col(f"__sum_s{i}"), F.coalesce(F.col(f"__sum_n{i}"), F.lit(0)),
                                   priors[f.value_column])
        # items without any group have no past in any of them
        out = out.withColumn(f.name, F.coalesce(value.cast("double"), _empty_value(f, priors, label)))
    return out.drop(*[c for c in out.columns if c.startswith(("__avg_n", "__sum_n", "__sum_s"))])


def _category_statistic(f: Feature, frame, event: Column, click: Column, prior_ctr: Column) -> Column:
    if f.derive == "user_category_clicks":
        return F.sum(click).over(frame)
    if f.derive == "user_category_ctr":
        clicks = F.sum(click).over(frame)
        shown = F.sum(F.when(event, 1).otherwise(0)).over(frame)
        return _smoothed_mean(clicks, shown, prior_ctr, CTR_PRIOR_STRENGTH)
    if f.derive == "user_category_mean_dwell":
        return F.avg(F.when(event & (click == 1), F.log1p(F.col("dwell_time")))).over(frame)
    raise ConfigError(f"feature '{f.name}': unknown derivation '{f.derive}'")


def _empty_value(f: Feature, priors: dict[str, Column], label: str) -> Column:
    """Value when the window holds no event: zero counts, the prior CTR or mean, or null
    (null is encoded as 0 after standardisation: the mean)."""
    if f.derive == "user_category_ctr":
        return priors[label]
    if f.derive in ("user_group_mean", "item_mean"):
        return priors[f.value_column]
    if f.derive == "user_category_mean_dwell":
        return F.lit(None).cast("double")
    return F.lit(0.0)


def _in_history(feature: Feature, label: str) -> Column:
    """The rows a history sequence holds: logged events (never sampled negatives), and of
    those only the clicks unless ``history_of: events``."""
    return F.col("is_event") if feature.history_of == "events" else F.col("is_event") & (F.col(label) == 1)


def add_history(rows: DataFrame, feature: Feature, ts: str, label: str, item_index: str, lookback: int) -> DataFrame:
    """Clicked items (``history_of: events``: items of any event) before each row, oldest
    first, the last ``max_len`` of them.

    The frame scans the previous ``lookback`` rows of the user (bounded work per row);
    the filter on the timestamp keeps only events strictly earlier than the row.
    """
    w = (Window.partitionBy("user_key").orderBy(ts, "row_id").rowsBetween(-lookback, -1))
    clicked = F.when(_in_history(feature, label), F.struct(F.col(ts).alias("t"), F.col(item_index).alias("i")))
    past = F.collect_list(clicked).over(w)
    items = F.transform(F.filter(past, lambda x: x["t"] < F.col(ts)), lambda x: x["i"])
    return rows.withColumn(feature.name, pad_list(items, feature.max_len))


def history_as_of(rows: DataFrame, feature: Feature, ts: str, label: str, item_index: str, as_of: Column) -> DataFrame:
    """(user_key, sequence) of the last ``max_len`` clicks (or events, as ``add_history``)
    before ``as_of`` (a column of ``rows``: the cut may differ per user), for serving."""
    recent = (rows.where(_in_history(feature, label) & (F.col(ts) < as_of))
              .withColumn("__rank", F.row_number().over(
                  Window.partitionBy("user_key").orderBy(F.desc(ts), F.desc("row_id"))))
              .where(F.col("__rank") <= feature.max_len))
    return (recent.groupBy("user_key")
            .agg(F.sort_array(F.collect_list(F.struct(F.col(ts), F.col("row_id"), F.col(item_index).alias("i"))))
                 .alias("__h"))
            .select("user_key", pad_list(F.transform("__h", lambda x: x["i"]), feature.max_len).alias(feature.name)))

"""Checks on raw inputs before anything is written: each problem is named, all at once.

One aggregation pass over the events counts every kind of bad row, so validating costs
one scan, not one per rule.
"""
from __future__ import annotations

from typing import Optional

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl.sources import InputError
from rec_models.spec import FeatureSpec, Kind

DWELL = "dwell_time"


def needs_dwell(spec: FeatureSpec) -> bool:
    return any(f.derive == "user_category_mean_dwell" for f in spec.features)


def required_event_columns(spec: FeatureSpec, implicit: bool) -> list[str]:
    cols = [spec.keys.user, spec.keys.item, spec.keys.timestamp]
    if not implicit:
        cols.append(spec.label.name)
    if needs_dwell(spec):
        cols.append(DWELL)
    return cols + [c for c in value_columns(spec) if c not in cols]


def value_columns(spec: FeatureSpec) -> list[str]:
    """Event columns that derived mean statistics average (e.g. the rating)."""
    return sorted({f.value_column for f in spec.features if f.value_column})


def group_columns(spec: FeatureSpec) -> list[str]:
    """Item columns that derived user x group statistics group by."""
    return sorted({f.group_column for f in spec.features if f.group_column})


def entity_columns(spec: FeatureSpec, source: str) -> list[str]:
    """Raw columns an entity table must provide (sequences are built from events)."""
    return [f.name for f in spec.features if f.source == source and f.kind != Kind.sequence]


def numeric_feature_columns(spec: FeatureSpec, table: str) -> list[str]:
    """Raw numeric columns of ``table`` ('events', 'users', 'items') the FeatureSpec encodes:
    numeric features read from it, and (events) the weight column."""
    cols = [f.name for f in spec.features if f.source == table and f.kind == Kind.numeric]
    if table == "events" and spec.weight is not None and spec.weight.name not in cols:
        cols.append(spec.weight.name)
    return cols


def _check_numeric_types(df: DataFrame, table: str, columns: list[str]) -> None:
    """Numeric features must arrive numeric: a string column is named here, with how many of
    its values do not parse, instead of failing later inside a cast (CAST_INVALID_INPUT)."""
    for column in columns:
        if column not in df.columns:   # not a raw column here (computed later, e.g. etl/inttower_protocol.py)
            continue
        dtype = df.schema[column].dataType
        if isinstance(dtype, (T.NumericType, T.BooleanType)):
            continue
        hint = ""
        if isinstance(dtype, T.StringType):
            parsed = F.expr(f"try_cast(`{column}` AS double)")
            bad = df.where(F.col(column).isNotNull() & parsed.isNull()).select(column)
            examples = [repr(r[column]) for r in bad.limit(3).collect()]
            n_bad = bad.count() if examples else 0
            hint = (f": {n_bad} value(s) are not numbers (e.g. {', '.join(examples)})" if examples
                    else ": every value parses as a number")
        raise InputError(f"{table} table: numeric feature column '{column}' must be numeric, got "
                         f"{dtype.simpleString()}{hint}; fix the column, or convert it with "
                         f"data.source.{table}.casts.{column}=double (values that do not parse become "
                         f"missing, and are counted)")


def validate_inputs(events: DataFrame, users: Optional[DataFrame], items: Optional[DataFrame],
                    spec: FeatureSpec, implicit: bool, has_time: bool = True) -> None:
    _require(events, "events", required_event_columns(spec, implicit))
    for table, df, key in (("users", users, spec.keys.user), ("items", items, spec.keys.item)):
        wanted = entity_columns(spec, table)
        if df is None:
            extra = [c for c in wanted if c != key]
            if extra:
                raise InputError(f"the FeatureSpec reads {', '.join(extra)} from a {table} table, "
                                 f"but data.source.{table} is not configured")
        else:
            _require(df, table, wanted)
    for g in group_columns(spec):
        if items is None or g not in items.columns:
            raise InputError(f"derived user x '{g}' statistics need an items table with column '{g}'")
    for table, df in (("events", events), ("users", users), ("items", items)):
        if df is not None:
            _check_numeric_types(df, table, numeric_feature_columns(spec, table))
    _check_event_values(events, spec, implicit, has_time)
    for table, df, key in (("users", users, spec.keys.user), ("items", items, spec.keys.item)):
        if df is not None:
            _check_entity(df, table, key)


def _require(df: DataFrame, table: str, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{table} table: missing column(s) {', '.join(missing)}; "
                         f"it has: {', '.join(df.columns)}")


def _infinite(column: str):
    x = F.col(column).cast("double")
    return (x == F.lit(float("inf"))) | (x == F.lit(float("-inf")))


def _check_event_values(events: DataFrame, spec: FeatureSpec, implicit: bool, has_time: bool = True) -> None:
    k = spec.keys
    checks = {
        f"null {k.user}": F.col(k.user).isNull(),
        f"null {k.item}": F.col(k.item).isNull(),
    }
    if has_time:
        checks[f"null {k.timestamp}"] = F.col(k.timestamp).isNull()
    label = spec.label.name
    if not implicit:
        if not isinstance(events.schema[label].dataType, (T.NumericType, T.BooleanType)):
            raise InputError(f"events.{label} must be numeric 0/1 or boolean, "
                             f"got {events.schema[label].dataType.simpleString()}")
        value = F.col(label).cast("double")
        checks[f"null {label}"] = F.col(label).isNull()
        checks[f"{label} not 0 or 1"] = F.col(label).isNotNull() & ~value.isin(0.0, 1.0)
    if DWELL in events.columns and needs_dwell(spec):
        if not isinstance(events.schema[DWELL].dataType, T.NumericType):
            raise InputError(f"events.{DWELL} must be numeric seconds, got {events.schema[DWELL].dataType.simpleString()}")
        dwell = F.col(DWELL).cast("double")
        checks[f"negative {DWELL}"] = dwell < 0
        checks[f"NaN {DWELL}"] = F.isnan(dwell)
        checks[f"infinite {DWELL}"] = _infinite(DWELL)
    for column in value_columns(spec):
        if not isinstance(events.schema[column].dataType, T.NumericType):
            raise InputError(f"events.{column} must be numeric (derived statistics average it), "
                             f"got {events.schema[column].dataType.simpleString()}")
        checks[f"null {column}"] = F.col(column).isNull()
        checks[f"NaN {column}"] = F.isnan(F.col(column).cast("double"))
        checks[f"infinite {column}"] = _infinite(column)
    row = events.agg(F.count(F.lit(1)).alias("rows"),
                     *[F.sum(F.when(cond, 1).otherwise(0)).alias(f"c{i}") for i, cond in enumerate(checks.values())]
                     ).first()
    if row["rows"] == 0:
        raise InputError("the events table is empty: nothing to build features from")
    bad = [f"{row[f'c{i}']} rows with {name}" for i, name in enumerate(checks) if row[f"c{i}"]]
    if bad:
        raise InputError(f"events table ({row['rows']} rows) has bad values: " + "; ".join(bad))


def clean_numeric(df: DataFrame, table: str, spec: FeatureSpec, policy: str) -> tuple[DataFrame, dict]:
    """Non-finite values (inf, -inf, NaN) of ``table``'s numeric feature columns: an
    InputError naming table, column and counts (policy 'error'), or nulls (policy
    'missing'). Returns the frame and, per column, what encoding will do to it:
    ``non_finite`` (made missing), ``imputed`` (missing values filled: 0 after
    normalisation, bucket 0) and ``clamped`` (negatives raised to 0 by log_standard)."""
    columns = [c for c in numeric_feature_columns(spec, table) if c in df.columns]
    if not columns:
        return df, {}
    log_std = {f.name for f in spec.features if f.name in columns and f.transform == "log_standard"}
    aggs = [F.count(F.lit(1)).alias("__rows")]
    for i, c in enumerate(columns):
        x = F.col(c).cast("double")
        aggs += [F.sum(F.when(F.isnan(x), 1).otherwise(0)).alias(f"nan{i}"),
                 F.sum(F.when(x == F.lit(float("inf")), 1).otherwise(0)).alias(f"pinf{i}"),
                 F.sum(F.when(x == F.lit(float("-inf")), 1).otherwise(0)).alias(f"ninf{i}"),
                 F.sum(F.when(x.isNull(), 1).otherwise(0)).alias(f"null{i}"),
                 F.sum(F.when(~F.isnan(x) & (x < 0), 1).otherwise(0)).alias(f"neg{i}")]
    row = df.agg(*aggs).first()
    weight = spec.weight.name if table == "events" and spec.weight is not None else None
    report, bad = {}, []
    for i, c in enumerate(columns):
        nan, pinf, ninf = (int(row[f"{k}{i}"] or 0) for k in ("nan", "pinf", "ninf"))
        non_finite = nan + pinf + ninf
        if non_finite:
            parts = [f"{n} {what}" for n, what in ((pinf, "inf"), (ninf, "-inf"), (nan, "NaN")) if n]
            bad.append(f"column '{c}' has {non_finite} non-finite value(s) ({', '.join(parts)})")
        if c == weight:   # a sample weight is used as is, never imputed: non-finite is always an error
            if non_finite:
                raise InputError(f"{table} table ({row['__rows']} rows): weight {bad[-1]}; fix the input")
            continue
        negatives = int(row[f"neg{i}"] or 0) - (ninf if policy == "missing" else 0)
        report[c] = {"non_finite": non_finite, "imputed": int(row[f"null{i}"] or 0) + non_finite,
                     "clamped": negatives if c in log_std else 0}
    if bad and policy == "error":
        raise InputError(f"{table} table ({row['__rows']} rows): " + "; ".join(bad)
                         + "; fix the input, or set data.non_finite=missing to treat them as missing values")
    for c in report:
        if report[c]["non_finite"]:
            x = F.col(c).cast("double")
            finite = ~F.isnan(x) & (F.abs(x) != F.lit(float("inf")))
            df = df.withColumn(c, F.when(finite, F.col(c)))
    return df, report


def _check_entity(df: DataFrame, table: str, key: str) -> None:
    row = df.agg(F.count(F.lit(1)).alias("rows"),
                 F.sum(F.when(F.col(key).isNull(), 1).otherwise(0)).alias("null_keys"),
                 F.countDistinct(key).alias("distinct")).first()
    if row["rows"] == 0:
        raise InputError(f"the {table} table is empty")
    if row["null_keys"]:
        raise InputError(f"{table} table has {row['null_keys']} rows with null {key}")
    if row["distinct"] != row["rows"]:
        raise InputError(f"{table} table has duplicate {key} values ({row['rows'] - row['distinct']} duplicates)")


def check_unknown_ids(events: DataFrame, entity: DataFrame, key: str, table: str, policy: str) -> None:
    """Events whose id is absent from the entity table: an error unless policy is 'oov'."""
    if policy == "oov":
        return
    unknown = events.select(key).distinct().join(entity.select(key), key, "left_anti")
    sample = [r[key] for r in unknown.limit(5).collect()]
    if sample:
        n = unknown.count()
        raise InputError(f"{n} {key} value(s) in events are not in the {table} table (e.g. {', '.join(sample)}); "
                         f"fix the inputs or set data.unknown_ids=oov")

"""Raw inputs: events, users and items from the synthetic generator or from tables.

Tables come as Parquet, CSV, Delta or MovieLens files (GroupLens' or RecBole's formats,
see :mod:`etl.movielens`) with a column mapping in conf
(``columns: {canonical_name: source_column}``); ids may be strings or integers and are
carried as strings from here on. The canonical event columns are ``user_id``, ``item_id``,
``timestamp`` (seconds, or a timestamp type), ``label`` (absent for implicit feedback)
and ``dwell_time`` (seconds, null for non-clicks).
"""
from __future__ import annotations

import glob
import os
from typing import Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from rec_models.config import BadInputError, DataConf, LabelFrom, TableSource


class InputError(BadInputError):
    """Bad input data: the message names the table, the column and what is wrong."""


def load_sources(spark: SparkSession, data: DataConf) -> tuple[DataFrame, Optional[DataFrame], Optional[DataFrame]]:
    """(events, users, items) with canonical key names; users/items may be None."""
    src = data.source
    keys = data.feature_spec.keys
    if src.type == "synthetic":
        from etl.synthetic import generate

        return generate(spark, src.synthetic)
    events = read_source(spark, src.events, "events")
    if src.label_from is not None:
        events = label_from_rating(events, src.label_from, data.feature_spec.label.name)
    users = read_source(spark, src.users, "users") if src.users else None
    items = read_source(spark, src.items, "items") if src.items else None
    # scheme random needs no time: events without a time column are then allowed, and
    # etl.build refuses the point-in-time features that would need one
    no_time_ok = data.split.scheme == "random" and keys.timestamp not in events.columns
    events = _canonical_keys(events, "events", (keys.user, keys.item),
                             timestamp=None if no_time_ok else keys.timestamp, path=src.events.path)
    if users is not None:
        users = _canonical_keys(users, "users", (keys.user,))
    if items is not None:
        items = _canonical_keys(items, "items", (keys.item,))
    return events, users, items


def _check_path_exists(path: str, table: str) -> None:
    """A local input path that does not exist: one line naming it, before Spark (whose
    error comes after a long Java trace). Remote URIs (s3://, dbfs:/...) are left to Spark."""
    local = path[len("file:"):] if path.startswith("file:") else path
    if "://" in path and not path.startswith("file:"):
        return
    if any(ch in local for ch in "*?["):
        if not glob.glob(local):
            raise InputError(f"{table} table: no file matches data.source.{table}.path={path}")
    elif not os.path.exists(local):
        raise InputError(f"{table} table: input path {path} does not exist (data.source.{table}.path)")


def read_source(spark: SparkSession, source: TableSource, table: str) -> DataFrame:
    _check_path_exists(source.path, table)
    if source.format == "delta":
        from etl.delta_io import read_table

        df = read_table(spark, source.path)
    elif source.format in ("recbole", "movielens_100k", "movielens_1m"):
        from etl.movielens import MovieLensFormatError, read_movielens

        try:
            df = read_movielens(spark, source.path, source.format, table)
        except MovieLensFormatError as exc:
            raise InputError(str(exc)) from None
    else:
        reader = spark.read.options(**{k: str(v) for k, v in source.options.items()})
        if source.format == "csv":
            reader = reader.option("header", source.options.get("header", "true")).option(
                "inferSchema", source.options.get("inferSchema", "true"))
        try:
            df = reader.format(source.format).load(source.path)
        except Exception as exc:  # Spark's AnalysisException: path missing, unreadable...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]   # not the Java trace
            raise InputError(f"cannot read the {table} table ({source.format}) at {source.path}: {first}") from None
    missing = sorted(c for c in source.columns.values() if c not in df.columns)
    if missing:
        raise InputError(
            f"{table} table at {source.path}: mapped column(s) {', '.join(missing)} not found; "
            f"it has: {', '.join(df.columns)}")
    for canonical, column in source.columns.items():
        if canonical != column:
            df = df.withColumnRenamed(column, canonical)
    for column, dtype in source.casts.items():
        if column not in df.columns:
            raise InputError(f"{table} table at {source.path}: cast of missing column '{column}'; "
                             f"it has: {', '.join(df.columns)}")
        # try_cast: a value that does not parse becomes null (counted by validation), not a crash
        df = df.withColumn(column, F.expr(f"try_cast(`{column}` AS {dtype})"))
    return df


def label_from_rating(events: DataFrame, conf: LabelFrom, label: str) -> DataFrame:
    """Binary ``label`` from an explicit-feedback column (ratings), after dropping values."""
    if conf.column not in events.columns:
        raise InputError(f"data.source.label_from.column: events have no column '{conf.column}'; "
                         f"they have: {', '.join(events.columns)}")
    if not isinstance(events.schema[conf.column].dataType, T.NumericType):
        raise InputError(f"events.{conf.column} must be numeric to derive the label, "
                         f"got {events.schema[conf.column].dataType.simpleString()}")
    value = F.col(conf.column).cast("double")
    if conf.drop_values:
        events = events.where(value.isNull() | ~value.isin(*[float(v) for v in conf.drop_values]))
    # a null rating stays a null label, which validation names
    return events.withColumn(label, F.when(value.isNotNull(), (value >= conf.positive_min).cast("int")))


def _canonical_keys(df: DataFrame, table: str, ids: tuple[str, ...], timestamp: Optional[str] = None,
                    path: Optional[str] = None) -> DataFrame:
    """Ids as strings; the event time as integer seconds."""
    key_columns = ids + ((timestamp,) if timestamp else ())
    missing = [c for c in key_columns if c not in df.columns]
    if timestamp in missing:
        where = f" at {path}" if path else ""
        raise InputError(
            f"{table} table{where}: no time column '{timestamp}'; it has: {', '.join(df.columns)}. "
            f"If one of these columns holds the event time, map it with "
            f"data.source.{table}.columns.{timestamp}=<column>; if the data has no time at all, set "
            f"data.split.scheme=random (a seeded random split; point-in-time features are then refused)")
    if missing:
        raise InputError(f"{table} table: required column(s) {', '.join(missing)} missing; "
                         f"it has: {', '.join(df.columns)} (map them in data.source.{table}.columns)")
    for c in key_columns:
        dtype = df.schema[c].dataType
        if c == timestamp:
            if isinstance(dtype, (T.TimestampType, T.TimestampNTZType, T.DateType)):
                df = df.withColumn(c, F.unix_timestamp(F.col(c).cast("timestamp")))
            elif isinstance(dtype, T.NumericType):
                df = df.withColumn(c, F.col(c).cast("long"))
            else:
                raise InputError(f"{table}.{c} must be numeric seconds or a timestamp, got {dtype.simpleString()}")
        elif isinstance(dtype, (T.StringType, T.IntegralType)):
            df = df.withColumn(c, F.col(c).cast("string"))
        else:
            raise InputError(f"{table}.{c} must be a string or integer id, got {dtype.simpleString()}")
    return df

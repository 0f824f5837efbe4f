"""Delta Lake reading and writing, one module for the whole project. There are two paths.

``spark`` (native): the session has Delta itself (Databricks, or delta-spark jars plus its
session extension), so this module calls ``df.write.format("delta")`` and
``spark.read.format("delta")``.

``delta_rs``: plain open-source Spark without the Delta jars (this machine cannot fetch
them from Maven). To write, Spark tasks write Parquet files into the table folder
(``mapInArrow``, Hive-style ``col=value/`` folders) and each task yields one small row per
file: path, size, partition values and stats. The driver collects only those rows and
commits them in ONE Delta transaction with delta-rs. If the job fails, nothing is
committed and the files of this write are deleted: their names carry the write's uuid.
To read, delta-rs lists the snapshot's files and ``spark.read.parquet`` reads them with
``basePath`` set to the table root, so the partition folders give back the partition
columns. Tables written this way are plain Delta (reader 1 / writer 2). Databricks,
delta-spark, delta-rs and DuckDB can read them.

All columns of a ``delta_rs`` table are nullable: Spark's Arrow nullability varies from
one DataFrame to another, and appends must not fail on that.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import time
import urllib.parse
import uuid
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rec_models.config import BadInputError, ConfigError, InputNotFoundError, is_uri

WRITERS = ("auto", "spark", "delta_rs")
MODES = ("overwrite", "append")
ROW_GROUP_ROWS = 262_144             # buffer Spark's 10k-row Arrow batches into bigger row groups
ROW_GROUP_BYTES = 64 << 20
MAX_FILE_BYTES = 512 << 20           # a task starts a new file past this size
STRING_STAT_CHARS = 32               # longer strings: min is truncated, max is left out
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
# Characters Spark/Hive escape in partition folder names (ExternalCatalogUtils.escapePathName).
_ESCAPE = set(map(chr, range(0x01, 0x20))) | set("\"#%'*/:=?\\\x7f{[]^")
_PRODUCERS = {"embeddings": "jobs/write_embeddings", "features": "the ETL job (etl/)",
              "samples": "the ETL job (etl/)"}
_RESULT_SCHEMA = ("path string, size long, partition_values string, "
                  "modification_time long, stats string, num_records long")
COMMIT_ATTEMPTS = 5                  # a commit that lost a race is retried this often in all
UNCOMMITTED_MIN_AGE_S = 3600         # a data file no log names is removed once older than this
_WRITE_ID_KEY = "dtt_write_id"       # commit metadata naming the write: its own version is found by it
_OWN_FILE = re.compile(r"^part-[0-9a-f]{32}-")


class MissingColumnsError(BadInputError, KeyError):
    """Columns asked for are not in the table (a KeyError as before, and a user error)."""

    def __str__(self) -> str:   # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DeltaConflictError(RuntimeError):
    """A commit kept losing to concurrent writers of the same table (the message names it)."""


# ---------------------------------------------------------------- session capabilities

def has_native_delta(spark) -> bool:
    """True if the session itself reads and writes ``format("delta")``. Never raises."""
    def conf(key: str) -> str:
        try:
            return spark.conf.get(key, "") or ""
        except Exception:
            return ""

    if (os.environ.get("DATABRICKS_RUNTIME_VERSION") or conf("spark.databricks.clusterUsageTags.clusterId")
            or type(spark).__module__.startswith("databricks")):
        return True          # Databricks runtime, or Databricks Connect (Delta is built in)
    if "DeltaSparkSessionExtension" not in conf("spark.sql.extensions"):
        return False
    try:
        jvm = spark._jvm     # Spark Connect has no JVM: trust the conf
    except Exception:
        return True
    if jvm is None:
        return True
    try:                     # the conf names the extension, but are the jars there?
        jvm.org.apache.spark.util.Utils.getContextOrSparkClassLoader().loadClass("io.delta.tables.DeltaTable")
        return True
    except Exception:
        return False


def resolve_writer(spark, writer: str = "auto") -> str:
    """Map ``warehouse.writer`` to the path used: ``spark`` or ``delta_rs``."""
    if writer not in WRITERS:
        raise ConfigError(f"unknown Delta writer '{writer}'; known: {', '.join(WRITERS)}")
    if writer == "delta_rs":
        return writer
    native = has_native_delta(spark)
    if writer == "spark" and not native:
        raise ConfigError(
            "warehouse.writer='spark' needs a session with native Delta (Databricks, or "
            "delta-spark jars with spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension); "
            "this session has none: use writer 'delta_rs' or 'auto'")
    return "spark" if native else "delta_rs"


# ---------------------------------------------------------------- table inspection

def _norm_uri(uri: str) -> str:
    uri = str(uri)
    return uri.rstrip("/") if is_uri(uri) else os.path.abspath(uri)


def table_exists(uri: str) -> bool:
    """True if ``uri`` holds a Delta table (a ``_delta_log``)."""
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(_norm_uri(uri))


def _open(uri: str, version: Optional[int] = None):
    """The table at its latest version, or at ``version`` (a snapshot recorded earlier)."""
    from deltalake import DeltaTable

    uri = _norm_uri(uri)
    if not DeltaTable.is_deltatable(uri):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        job = next((j for k, j in _PRODUCERS.items() if k in name), "the job that writes it")
        raise InputNotFoundError(f"no Delta table at {uri} (no _delta_log there): run {job} first")
    try:
        return DeltaTable(uri, version=version)
    except Exception as exc:  # delta-rs raises its own errors for a vacuumed / unknown version
        raise InputNotFoundError(f"Delta table {uri} has no readable version {version}: {exc}") from None


def table_version(uri: str) -> int:
    return _open(uri).version()


def arrow_schema_of(uri: str, version: Optional[int] = None) -> pa.Schema:
    """The table's schema (latest, or at ``version``) as Arrow, without reading data."""
    return pa.schema(_open(uri, version).schema().to_arrow())


def _check_plain_files(dt, uri: str) -> None:
    """Reading Parquet files directly is only right without column mapping or deletion vectors."""
    if dt.metadata().configuration.get("delta.columnMapping.mode", "none") not in ("none", None):
        raise NotImplementedError(f"{uri} uses Delta column mapping: read it with a native Delta session")
    if "deletionVectors" in (dt.protocol().reader_features or []) and pa.table(dt.deletion_vectors()).num_rows:
        raise NotImplementedError(f"{uri} has deletion vectors: read it with a native Delta session "
                                  "or run OPTIMIZE/PURGE first")


def snapshot_files(uri: str, partition_filters: Optional[list[tuple]] = None,
                   version: Optional[int] = None) -> list[str]:
    """Paths/URIs of the snapshot's Parquet files (latest, or ``version``): the loader reads these."""
    dt = _open(uri, version)
    _check_plain_files(dt, uri)
    return dt.file_uris(file_pruning_predicate=partition_filters or None)


def _check_columns(columns, names: list[str], uri: str) -> None:
    missing = [c for c in (columns or []) if c not in names]
    if missing:
        raise MissingColumnsError(f"columns {missing} not in Delta table {uri}; it has {names}")


def read_arrow(uri: str, columns: Optional[list[str]] = None,
               partition_filters: Optional[list[tuple]] = None, version: Optional[int] = None) -> pa.Table:
    """A snapshot (latest, or ``version``) as an Arrow table, through delta-rs."""
    dt = _open(uri, version)
    _check_columns(columns, [f.name for f in dt.schema().fields], uri)
    return dt.to_pyarrow_table(columns=columns, filters=partition_filters or None)


def _spark_schema(dt):
    from pyspark.sql.types import StructType

    return StructType.fromJson(json.loads(dt.schema().to_json()))  # Delta's schema JSON is Spark's


def read_table(spark, uri: str, columns: Optional[list[str]] = None,
               partition_filters: Optional[list[tuple]] = None, version: Optional[int] = None):
    """A snapshot (latest, or ``version``) as a Spark DataFrame, with the partition columns."""
    if has_native_delta(spark):
        return _read_native(spark, uri, columns, partition_filters, version)
    dt = _open(uri, version)
    schema = _spark_schema(dt)
    _check_columns(columns, schema.names, uri)
    files = snapshot_files(uri, partition_filters, version)
    if not files:
        df = spark.createDataFrame([], schema)
    else:   # basePath: Spark rebuilds the partition columns from the folders, typed by `schema`
        df = (spark.read.schema(schema).option("basePath", dt.table_uri)
              .parquet(*files).select(*schema.names))
        parts = set(dt.metadata().partition_columns)   # pruning is exact on those already
        df = _where(df, [f for f in partition_filters or [] if f[0] not in parts])
    return df.select(*columns) if columns else df


def _read_native(spark, uri, columns, partition_filters, version=None):
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    df = reader.load(uri)
    _check_columns(columns, df.columns, uri)
    df = _where(df, partition_filters)
    return df.select(*columns) if columns else df


def _where(df, filters):
    """Apply ``(column, op, value)`` filters (a conjunction, as delta-rs takes them) to rows."""
    from pyspark.sql import functions as F

    for col, op, value in filters or []:
        c = F.col(col)
        if value is None and op in ("=", "!="):
            df = df.where(c.isNull() if op == "=" else c.isNotNull())
            continue
        ops = {"=": lambda: c == value, "!=": lambda: c != value, "<": lambda: c < value,
               "<=": lambda: c <= value, ">": lambda: c > value, ">=": lambda: c >= value,
               "in": lambda: c.isin(list(value)), "not in": lambda: ~c.isin(list(value))}
        if op not in ops:
            raise ValueError(f"unsupported filter op '{op}'; known: {', '.join(ops)}")
        df = df.where(ops[op]())
    return df


# ---------------------------------------------------------------- writing

def write_table(df, uri: str, mode: str = "overwrite", partition_by: Optional[list[str]] = None,
                replace_partitions: Optional[dict[str, str]] = None, writer: str = "auto",
                commit_metadata: Optional[dict] = None) -> int:
    """Write ``df`` as the Delta table at ``uri`` and return the new table version.

    ``replace_partitions`` (overwrite only): replace just the partitions whose columns equal
    these values, e.g. ``{"model_name": "pfd", "model_version": "v1"}``, and keep the others.
    A rerun then replaces its rows and does not add them twice. Every row of ``df`` must
    belong to those partitions; on the delta_rs path each task checks its own rows.
    ``partition_by=None`` keeps an existing table's partitioning. A full overwrite may change
    the schema and the partitioning (delta-spark's ``overwriteSchema``); an append or a
    partition replace must match the table's columns and types, or nothing is written.
    """
    if mode not in MODES:
        raise ValueError(f"unknown write mode '{mode}'; known: {', '.join(MODES)}")
    if replace_partitions is not None and mode != "overwrite":
        raise ValueError(f"replace_partitions needs mode='overwrite', not '{mode}'")
    if replace_partitions == {}:
        raise ValueError("replace_partitions is empty: pass None to overwrite the whole table")
    uri = _norm_uri(uri)
    if resolve_writer(df.sparkSession, writer) == "spark":
        return _write_native(df, uri, mode, partition_by, replace_partitions, commit_metadata)
    return _write_delta_rs(df, uri, mode, partition_by, replace_partitions, commit_metadata)


def _sql_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _replace_where(replace_partitions: dict) -> str:
    """Delta's ``replaceWhere`` predicate for the native path."""
    return " AND ".join(f"`{c}` IS NULL" if v is None else f"`{c}` = {_sql_literal(v)}"
                        for c, v in replace_partitions.items())


def _write_native(df, uri, mode, partition_by, replace_partitions, commit_metadata) -> int:
    write_id = uuid.uuid4().hex
    w = df.write.format("delta").mode(mode)
    if partition_by:
        w = w.partitionBy(*partition_by)
    if replace_partitions:
        w = w.option("replaceWhere", _replace_where(replace_partitions))
    elif mode == "overwrite":
        w = w.option("overwriteSchema", "true")   # as on the delta_rs path: a full overwrite may change the schema
    w = w.option("userMetadata", json.dumps({**(commit_metadata or {}), _WRITE_ID_KEY: write_id}))
    # Delta's own conflict detection lets disjoint replaceWhere writes through; a write that
    # lost a real race is idempotent here (overwrite) or was not committed (append): retry
    _retry_conflicts(uri, lambda attempt: w.save(uri))
    # the version this write committed, found by its id (the latest may be another writer's)
    rows = df.sparkSession.sql(f"DESCRIBE HISTORY delta.`{uri}` LIMIT 100").select("version", "userMetadata").collect()
    for row in rows:
        if row["userMetadata"] and write_id in row["userMetadata"]:
            return int(row["version"])
    raise RuntimeError(f"Delta table {uri}: the write {write_id} committed, but its version is not among the "
                       "last 100 of the table's history")


# Delta's (delta-spark's) optimistic-concurrency failures: the transaction committed nothing
# (io.delta.exceptions.DeltaConcurrentModificationException and its subclasses); they reach
# Python as a Py4J/Spark error whose text names the Java class.
_NATIVE_CONFLICTS = ("ConcurrentAppendException", "ConcurrentDeleteReadException",
                     "ConcurrentDeleteDeleteException", "ConcurrentTransactionException",
                     "ConcurrentWriteException", "MetadataChangedException", "ProtocolChangedException",
                     "DeltaConcurrentModificationException", "DELTA_CONCURRENT_")


def _is_conflict(exc: BaseException) -> bool:
    """A commit that lost a race to another writer (nothing of it was committed)."""
    text = f"{type(exc).__name__}: {exc}"
    return ("CommitFailedError" in text or "Concurrent" in text or "concurrent transaction" in text
            or "already exists" in text or any(name in text for name in _NATIVE_CONFLICTS))


def conflict_name(exc: BaseException) -> str:
    """The Delta conflict class an error names (for messages), else its Python class."""
    text = str(exc)
    return next((name for name in _NATIVE_CONFLICTS if name in text and not name.endswith("_")),
                type(exc).__name__)


def _retry_conflicts(uri: str, commit, attempts: Optional[int] = None):
    """Run ``commit(attempt)`` until it stops losing commit races, at most ``attempts`` times
    (jittered backoff); then a DeltaConflictError that names the table."""
    attempts = attempts or COMMIT_ATTEMPTS
    for attempt in range(attempts):
        try:
            return commit(attempt)
        except Exception as exc:
            if not _is_conflict(exc):
                raise
            if attempt == attempts - 1:
                first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
                raise DeltaConflictError(
                    f"Delta table {uri}: the commit lost to concurrent writers {attempts} times in a row "
                    f"({conflict_name(exc)}: {first[:300]}); nothing of this write was committed, "
                    "rerun the job") from exc
            time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + uuid.uuid4().int % 1000 / 1000))


def _is_string_view(t: pa.DataType) -> bool:
    """pyarrow < 16 (the petastorm lane's 14) has no string_view type at all."""
    return getattr(pa.types, "is_string_view", lambda _: False)(t)


def _nullable(t: pa.DataType) -> pa.DataType:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(pa.field("element", _nullable(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _nullable(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(t.key_type, _nullable(t.item_type))
    if pa.types.is_large_string(t) or _is_string_view(t):
        return pa.string()
    return t


def arrow_schema(spark_schema) -> pa.Schema:
    """The table's Arrow schema. Timestamps are UTC and every field is nullable."""
    import inspect

    from pyspark.sql.pandas.types import to_arrow_schema

    # pyspark 4 asks for the zone; pyspark 3.5 (the petastorm lane) has no such argument
    # and always writes timestamps as UTC
    kwargs = {"timezone": "UTC"} if "timezone" in inspect.signature(to_arrow_schema).parameters else {}
    s = to_arrow_schema(spark_schema, **kwargs)
    return pa.schema([pa.field(f.name, _nullable(f.type)) for f in s])


def _delta_fields(schema) -> dict[str, str]:
    """Column -> Delta type JSON with nullability dropped, to compare two schemas."""
    def strip(t):
        if isinstance(t, dict):
            return {k: strip(v) for k, v in t.items() if k not in ("nullable", "containsNull",
                                                                   "valueContainsNull", "metadata")}
        if isinstance(t, list):
            return [strip(v) for v in t]
        return t
    return {f["name"]: json.dumps(strip(f["type"]), sort_keys=True)
            for f in json.loads(schema.to_json())["fields"]}


def _check_compatible(dt, schema: pa.Schema, part_cols: list[str], uri: str) -> None:
    from deltalake import Schema

    old, new = _delta_fields(dt.schema()), _delta_fields(Schema.from_arrow(schema))
    if old != new:
        diff = sorted({c for c in old.keys() | new.keys() if old.get(c) != new.get(c)})
        detail = "; ".join(f"{c}: table {old.get(c, '-')} vs data {new.get(c, '-')}" for c in diff)
        raise BadInputError(f"schema of the data does not match Delta table {uri} in columns {diff} ({detail})")
    if list(dt.metadata().partition_columns) != list(part_cols):
        raise BadInputError(f"Delta table {uri} is partitioned by {list(dt.metadata().partition_columns)}, "
                         f"the write by {list(part_cols)}")


def _partition_string(value) -> Optional[str]:
    """Delta's string form of a partition value; '' is null, as in Spark."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _dt.date):
        return value.isoformat()
    return str(value)


def _check_partition_types(schema: pa.Schema, part_cols: list[str]) -> None:
    for c in part_cols:
        if c not in schema.names:
            raise KeyError(f"partition column '{c}' is not a column of the data: {schema.names}")
        t = schema.field(c).type
        if not (pa.types.is_string(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)
                or pa.types.is_date32(t)):
            raise TypeError(f"partition column '{c}' has type {t}; use string, integer, boolean or date")


def _write_delta_rs(df, uri, mode, partition_by, replace_partitions, commit_metadata) -> int:
    from deltalake import DeltaTable

    dt = DeltaTable(uri) if table_exists(uri) else None
    part_cols = list(partition_by if partition_by is not None
                     else (dt.metadata().partition_columns if dt is not None else []))
    schema = arrow_schema(df.schema)
    expected = None
    if replace_partitions:
        extra = [c for c in replace_partitions if c not in part_cols]
        if extra:
            raise ValueError(f"replace_partitions columns {extra} are not partition columns {part_cols}")
        expected = {c: _partition_string(v) for c, v in replace_partitions.items()}
    if dt is not None and (mode == "append" or replace_partitions):
        _check_compatible(dt, schema, part_cols, uri)
        schema = _table_schema(dt)            # the table's column order, not the DataFrame's
    _check_partition_types(schema, part_cols)

    write_id = uuid.uuid4().hex
    task = _task_fn(uri, write_id, schema, part_cols, expected)
    metadata = {**(commit_metadata or {}), _WRITE_ID_KEY: write_id}
    existed = dt is not None
    try:
        rows = df.mapInArrow(task, _RESULT_SCHEMA).collect()   # one small row per file
        actions = [_add_action(r) for r in rows]

        def commit(attempt: int) -> None:
            table = dt
            if attempt:   # lost a race: commit the same files against the table as it is now
                table = DeltaTable(uri) if table_exists(uri) else None
                if table is not None and (mode == "append" or replace_partitions):
                    _check_compatible(table, schema, part_cols, uri)
            _commit(uri, table, schema, part_cols, mode, expected, actions, metadata)

        _retry_conflicts(uri, commit)
    except BaseException:
        keep = _committed(uri, write_id)
        if keep is not None:   # unsure whether the commit landed: keep every file
            _cleanup(uri, write_id, keep=keep, table_existed=existed)
        raise
    folders = {r["path"].rpartition("/")[0] for r in rows}
    # Files of failed or speculative task attempts that no committed action names; only the
    # folders this write used are listed (a whole-table listing can be slow on object stores).
    _cleanup(uri, write_id, keep={r["path"] for r in rows}, table_existed=True, folders=folders)
    remove_uncommitted_files(uri, folders=folders | {""})   # leftovers of killed writes, old enough
    return _own_version(uri, write_id)


def _own_version(uri: str, write_id: str, lookback: int = 100) -> int:
    """The version the write ``write_id`` committed (another writer may have committed after
    it: the latest version is not necessarily this one).

    Read from the commit files themselves, whose names are their versions: delta-rs's
    ``history()`` lists the log afresh but numbers its entries down from the version the
    table handle loaded, so a commit landing in between shifts every number it gives."""
    from deltalake import DeltaTable

    fs, root = pafs.FileSystem.from_uri(uri)
    latest = DeltaTable(uri).version()
    for version in range(latest, max(-1, latest - lookback), -1):
        for action in _commit_actions(fs, f"{root}/_delta_log/{version:020d}.json"):
            if action.get("commitInfo", {}).get(_WRITE_ID_KEY) == write_id:
                return version
    raise RuntimeError(f"Delta table {uri}: the write {write_id} committed, but its version is not among "
                       f"the last {lookback} of the table's history")


def _table_schema(dt) -> pa.Schema:
    return pa.schema([pa.field(f.name, _nullable(f.type)) for f in pa.schema(dt.schema().to_arrow())])


def _committed(uri: str, write_id: str) -> Optional[set[str]]:
    """This write's files that a commit names anyway (it raised after committing): never
    delete those. None when that cannot be told (the log is unreadable): keep everything."""
    try:
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(uri):
            return set()
        paths = pa.table(DeltaTable(uri).get_add_actions()).column("path").to_pylist()
        return {p for p in paths if write_id in p}
    except Exception:
        return None


def _add_action(row):
    from deltalake.transaction import AddAction

    return AddAction(row["path"], row["size"], json.loads(row["partition_values"]),
                     row["modification_time"], True, row["stats"])


def _commit(uri, dt, schema, part_cols, mode, expected, actions, commit_metadata) -> None:
    from deltalake import Schema
    from deltalake.transaction import CommitProperties, create_table_with_add_actions

    props = CommitProperties(custom_metadata=commit_metadata) if commit_metadata else None
    repartition = dt is not None and list(dt.metadata().partition_columns) != list(part_cols)
    if dt is None or repartition:
        # New table, or a full overwrite that changes the partitioning: delta-rs's write
        # transaction keeps the old partition columns, so replace the table (CREATE OR REPLACE).
        create_table_with_add_actions(uri, Schema.from_arrow(schema), actions,
                                      mode="overwrite" if repartition else "error",
                                      partition_by=part_cols or None, commit_properties=props,
                                      configuration=dt.metadata().configuration if repartition else None)
        return
    # delta-rs matches a null partition value with ''.
    filters = [(c, "=", "" if v is None else v) for c, v in expected.items()] if expected else None
    dt.create_write_transaction(actions, mode=mode, schema=schema, partition_by=part_cols or None,
                                partition_filters=filters, commit_properties=props)


def _cleanup(uri: str, write_id: str, keep: set[str], table_existed: bool,
             folders: Optional[set[str]] = None) -> None:
    """Best effort: delete this write's files (except ``keep``).

    ``folders`` (relative): list only these, and leave the folders. Without it, list the whole
    table and also delete the folders left empty (after a failed write).
    """
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        if folders is None:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        else:
            infos = [i for f in folders for i in fs.get_file_info(
                pafs.FileSelector(f"{root}/{f}".rstrip("/"), allow_not_found=True))]
    except Exception:
        return
    prefix = f"part-{write_id}-"
    dirs = []
    for info in infos:
        rel = info.path[len(root):].lstrip("/")
        if info.type == pafs.FileType.Directory:
            if not rel.startswith("_delta_log"):
                dirs.append(info.path)
        elif info.base_name.startswith(prefix) and rel not in keep:
            _quiet(fs.delete_file, info.path)
    if folders is not None:
        return
    for d in sorted(dirs, key=len, reverse=True):   # deepest first
        if not fs.get_file_info(pafs.FileSelector(d)):
            _quiet(fs.delete_dir, d)
    if not table_existed and not fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        _quiet(fs.delete_dir, root)


def _commit_actions(fs, path: str) -> Iterator[dict]:
    """The actions of one JSON commit file of a Delta log, one per line."""
    with fs.open_input_stream(path) as fh:
        lines = fh.read().decode("utf-8").splitlines()
    return (json.loads(line) for line in lines if line.strip())


def _logged_paths(fs, root: str) -> Optional[set[str]]:
    """Every data file path any version of the table's log names (add or remove, JSON
    commits and checkpoints), raw and URL-decoded; None if the log cannot be read whole."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/_delta_log", allow_not_found=True))
        paths: set[str] = set()
        for info in infos:
            name = info.base_name
            if name.endswith(".json") and name.split(".")[0].isdigit():
                for action in _commit_actions(fs, info.path):
                    for kind in ("add", "remove"):
                        if kind in action:
                            paths.add(action[kind]["path"])
            elif ".checkpoint" in name and name.endswith(".parquet"):
                with fs.open_input_file(info.path) as fh:
                    table = pq.read_table(fh, columns=["add", "remove"])
                for kind in ("add", "remove"):
                    paths.update(v["path"] for v in table.column(kind).to_pylist() if v and v.get("path"))
    except Exception:
        return None
    return paths | {urllib.parse.unquote(p) for p in paths}


def remove_uncommitted_files(uri: str, min_age_seconds: float = UNCOMMITTED_MIN_AGE_S,
                             folders: Optional[set[str]] = None) -> list[str]:
    """Delete this project's data files (``part-<write id>-...``) that no version of the
    table's log names and that are older than ``min_age_seconds``: what a killed write left.
    A younger file may belong to a write still running, so it stays; when the log cannot be
    read whole nothing is deleted. ``folders`` (relative to the table, "" its root): look
    only there; default the whole table. Returns the relative paths deleted."""
    try:
        fs, root = pafs.FileSystem.from_uri(_norm_uri(uri))
        if folders is None:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        else:
            infos = [i for f in sorted(folders) for i in fs.get_file_info(
                pafs.FileSelector(f"{root}/{f}".rstrip("/"), allow_not_found=True))]
    except Exception:
        return []
    candidates = [i for i in infos if i.type == pafs.FileType.File and _OWN_FILE.match(i.base_name)
                  and not i.path[len(root):].lstrip("/").startswith("_delta_log")]
    if not candidates:
        return []
    logged = _logged_paths(fs, root)
    if logged is None:
        return []
    now, deleted = time.time(), []
    for info in candidates:
        rel = info.path[len(root):].lstrip("/")
        age = now - info.mtime.timestamp() if info.mtime else 0.0
        if rel not in logged and age >= min_age_seconds:
            _quiet(fs.delete_file, info.path)
            deleted.append(rel)
    return deleted


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        pass


# ---------------------------------------------------------------- task side (executors)

def _escape(value: str) -> str:
    return "".join(f"%{ord(ch):02X}" if ch in _ESCAPE else ch for ch in value)


def _partition_dir(part_cols: list[str], values: tuple) -> str:
    return "/".join(f"{_escape(c)}={_HIVE_NULL if v is None else _escape(v)}"
                    for c, v in zip(part_cols, values))


def _split(table: pa.Table, part_cols: list[str]) -> Iterator[tuple[tuple, pa.Table]]:
    """(partition values as Delta strings, rows without the partition columns) per partition."""
    if not part_cols:
        yield (), table
        return
    keys = table.select(part_cols).group_by(part_cols).aggregate([])
    for key in keys.to_pylist():
        sub = table
        if keys.num_rows > 1:
            mask = None
            for c in part_cols:
                m = pc.is_null(table[c]) if key[c] is None else pc.fill_null(pc.equal(table[c], key[c]), False)
                mask = m if mask is None else pc.and_(mask, m)
            sub = table.filter(mask)
        yield tuple(_partition_string(key[c]) for c in part_cols), sub.drop_columns(part_cols)


class _Stats:
    """numRecords plus min/max/nullCount of primitive columns, merged over a file's row groups."""

    def __init__(self, schema: pa.Schema):
        self.cols = [f.name for f in schema if not pa.types.is_nested(f.type)]
        self.rows, self.nulls, self.min, self.max = 0, {c: 0 for c in self.cols}, {}, {}
        self.no_minmax: set[str] = set()

    def update(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        for c in self.cols:
            col = table[c]
            self.nulls[c] += col.null_count
            if not _has_minmax(col.type) or c in self.no_minmax:
                continue
            if pa.types.is_floating(col.type) and pc.any(pc.is_nan(col)).as_py():
                self.no_minmax.add(c)   # Spark orders NaN above all values: no valid JSON max
                self.min.pop(c, None), self.max.pop(c, None)
                continue
            mm = pc.min_max(col)
            lo, hi = _stat_value(mm["min"], col.type), _stat_value(mm["max"], col.type)
            if lo is not None:
                self.min[c] = lo if c not in self.min else min(self.min[c], lo)
            if hi is not None:
                self.max[c] = hi if c not in self.max else max(self.max[c], hi)

    def json(self) -> str:
        mins, maxs = {}, {}
        for c, v in self.min.items():
            mins[c] = _format_stat(v, floor=True)
        for c, v in self.max.items():
            f = _format_stat(v, floor=False)
            if f is not None:
                maxs[c] = f
        return json.dumps({"numRecords": self.rows, "minValues": mins, "maxValues": maxs,
                           "nullCount": self.nulls}, allow_nan=False)


def _has_minmax(t: pa.DataType) -> bool:
    # No min/max for timestamp_ntz: engines disagree on its stats format.
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t)
            or pa.types.is_date32(t) or (pa.types.is_timestamp(t) and t.tz is not None))


def _stat_value(scalar, t):
    """A comparable Python value of a min/max scalar, or None if it has no JSON form."""
    if not scalar.is_valid:
        return None
    if pa.types.is_timestamp(t):
        return ("ts", scalar.cast(pa.int64()).as_py() * {"s": 10**6, "ms": 10**3, "us": 1, "ns": 10**-3}[t.unit])
    v = scalar.as_py()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _format_stat(v, floor: bool):
    if isinstance(v, tuple):   # ("ts", microseconds): Delta stats are in milliseconds
        ms = math.floor(v[1] / 1000) if floor else math.ceil(v[1] / 1000)
        t = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc) + _dt.timedelta(milliseconds=ms)
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
    if isinstance(v, _dt.date):
        return v.isoformat()
    if isinstance(v, str) and len(v) > STRING_STAT_CHARS:
        return v[:STRING_STAT_CHARS] if floor else None   # a prefix is a lower bound, not an upper one
    return v


class _FileWriter:
    """One Parquet file of one partition. Row groups are buffered, and stats are kept."""

    def __init__(self, fs, root: str, rel: str, schema: pa.Schema):
        self.fs, self.rel, self.path = fs, rel, f"{root}/{rel}"
        fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        self.stream = fs.open_output_stream(self.path)
        self.writer = pq.ParquetWriter(self.stream, schema, compression="snappy")
        self.stats, self.buffer, self.buffered = _Stats(schema), [], 0

    def write(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.buffered += table.nbytes
        if sum(t.num_rows for t in self.buffer) >= ROW_GROUP_ROWS or self.buffered >= ROW_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            t = pa.concat_tables(self.buffer)
            self.writer.write_table(t, row_group_size=max(t.num_rows, 1))
            self.stats.update(t)
            self.buffer, self.buffered = [], 0

    @property
    def size(self) -> int:
        return self.stream.tell()

    def close(self, part_values: dict) -> dict:
        self.flush()
        self.writer.close()
        self.stream.close()
        info = self.fs.get_file_info(self.path)
        mtime = int(info.mtime.timestamp() * 1000) if info.mtime else int(time.time() * 1000)
        return {"path": self.rel, "size": info.size, "partition_values": json.dumps(part_values),
                "modification_time": mtime, "stats": self.stats.json(), "num_records": self.stats.rows}

    def abort(self) -> None:
        _quiet(self.writer.close)
        _quiet(self.stream.close)
        _quiet(self.fs.delete_file, self.path)


def _task_fn(uri: str, write_id: str, schema: pa.Schema, part_cols: list[str], expected):
    """The ``mapInArrow`` function: write this task's rows, yield one row per file written."""
    data_schema = pa.schema([f for f in schema if f.name not in part_cols])
    result = pa.schema([("path", pa.string()), ("size", pa.int64()), ("partition_values", pa.string()),
                        ("modification_time", pa.int64()), ("stats", pa.string()),
                        ("num_records", pa.int64())])

    def run(batches):
        fs, root = pafs.FileSystem.from_uri(uri)
        token, files, open_ = uuid.uuid4().hex[:12], 0, {}
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                # By name (an append may list columns in another order); Spark's nullability varies.
                table = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
                for key, rows in _split(table, part_cols):
                    _check_expected(part_cols, key, expected)
                    w = open_.get(key)
                    if w is None:
                        name = f"part-{write_id}-{token}-{files:05d}.snappy.parquet"
                        d = _partition_dir(part_cols, key)
                        w = open_[key] = _FileWriter(fs, root, f"{d}/{name}" if d else name, data_schema)
                        files += 1
                    w.write(rows)
                    if w.size >= MAX_FILE_BYTES:
                        yield pa.RecordBatch.from_pylist([open_.pop(key).close(dict(zip(part_cols, key)))], result)
            while open_:
                key, w = open_.popitem()
                yield pa.RecordBatch.from_pylist([w.close(dict(zip(part_cols, key)))], result)
        except BaseException:
            for w in open_.values():
                w.abort()
            raise

    return run


def _check_expected(part_cols, key, expected) -> None:
    if expected is None:
        return
    got = dict(zip(part_cols, key))
    bad = {c: got[c] for c, v in expected.items() if got[c] != v}
    if bad:
        raise ValueError(f"rows with partition values {bad} outside replace_partitions {expected}")

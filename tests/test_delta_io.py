"""Delta reading/writing on the delta_rs path (this machine has no Delta jars)."""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import time

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl import delta_io as D
from rec_models.config import ConfigError

SCHEMA = T.StructType([
    T.StructField("i", T.IntegerType()), T.StructField("l", T.LongType(), False),
    T.StructField("f", T.FloatType()), T.StructField("d", T.DoubleType()),
    T.StructField("s", T.StringType()), T.StructField("b", T.BooleanType()),
    T.StructField("ts", T.TimestampType()), T.StructField("ai", T.ArrayType(T.IntegerType())),
    T.StructField("af", T.ArrayType(T.FloatType(), False)),
])
ROWS = [
    (1, 10, 1.5, 2.5, "a", True, dt.datetime(2024, 1, 1, 1, 2, 3, 456789), [1, 2], [0.5, 1.0]),
    (None, 11, None, None, None, None, None, None, []),
    (-3, 2**40, -1.0, 1e300, "z" * 80, False, dt.datetime(1999, 12, 31), [3], [2.0, -4.25]),
]


def files_under(path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}


def data_files(path) -> set[str]:
    return {f for f in files_under(path) if not f.startswith("_delta_log")}


def emb_df(spark, rows):
    """(model_name, model_version, id, vec) rows: the embedding tables' shape."""
    schema = "model_name string, model_version string, id long, vec array<float>"
    return spark.createDataFrame(rows, schema)


def sorted_rows(df, *cols):
    return sorted(tuple(r) for r in df.select(*cols).collect())


def test_session_has_no_native_delta_and_writer_resolution(spark):
    assert D.has_native_delta(spark) is False
    assert D.resolve_writer(spark, "auto") == "delta_rs"
    assert D.resolve_writer(spark, "delta_rs") == "delta_rs"
    with pytest.raises(ConfigError, match="native Delta"):
        D.resolve_writer(spark, "spark")
    with pytest.raises(ValueError, match="'parquet'"):
        D.resolve_writer(spark, "parquet")


class _Conf:
    def __init__(self, values):
        self.values = values

    def get(self, key, default=None):
        return self.values.get(key, default)


class _FakeSession:
    def __init__(self, conf, jvm):
        self.conf, self._jvm = _Conf(conf), jvm


def test_has_native_delta_detection(monkeypatch):
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    ext = {"spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension"}
    assert D.has_native_delta(_FakeSession({}, None)) is False
    assert D.has_native_delta(_FakeSession(ext, None)) is True          # Spark Connect: trust the conf
    assert D.has_native_delta(_FakeSession(ext, object())) is False     # conf set, class not loadable
    assert D.has_native_delta(_FakeSession({"spark.databricks.clusterUsageTags.clusterId": "c1"}, None)) is True
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "15.4")
    assert D.has_native_delta(_FakeSession({}, None)) is True


def test_round_trip_all_types(spark, tmp_path):
    uri = str(tmp_path / "t")
    df = spark.createDataFrame(ROWS, SCHEMA).repartition(2)
    assert D.write_table(df, uri, commit_metadata={"run_id": "r1"}) == 0
    assert D.table_exists(uri) and D.table_version(uri) == 0

    back = D.read_table(spark, uri)
    assert back.columns == SCHEMA.names
    assert back.schema.simpleString() == SCHEMA.simpleString()   # all nullable in the table
    assert sorted(back.collect(), key=lambda r: r.l) == sorted(df.collect(), key=lambda r: r.l)

    arrow = D.read_arrow(uri, columns=["l", "ts", "af"]).sort_by("l").to_pylist()
    assert [r["l"] for r in arrow] == [10, 11, 2**40]
    assert arrow[0]["ts"] == dt.datetime(2024, 1, 1, 1, 2, 3, 456789, tzinfo=dt.timezone.utc)
    assert arrow[2]["af"] == [2.0, -4.25] and arrow[1]["af"] == [] and arrow[1]["ts"] is None

    # Stats are valid JSON; numRecords add up; bounds hold; the commit metadata is in the log.
    adds = pa.table(DeltaTable(uri).get_add_actions(flatten=True)).to_pylist()
    assert sum(a["num_records"] for a in adds) == 3
    assert min(a["min.l"] for a in adds if a["min.l"] is not None) == 10
    assert max(a["max.l"] for a in adds if a["max.l"] is not None) == 2**40
    log = (tmp_path / "t" / "_delta_log" / "00000000000000000000.json").read_text()
    assert json.loads(log.splitlines()[0])["commitInfo"]["run_id"] == "r1"
    assert D.read_table(spark, uri, columns=["s"]).columns == ["s"]
    with pytest.raises(KeyError, match="nope"):
        D.read_table(spark, uri, columns=["s", "nope"])


def test_nan_float_stats_are_left_out(spark, tmp_path):
    uri = str(tmp_path / "nan")
    D.write_table(spark.createDataFrame([(1.0,), (float("nan"),)], "x double").coalesce(1), uri)
    assert math.isnan(sorted(D.read_arrow(uri)["x"].to_pylist(), key=math.isnan)[1])
    (add,) = pa.table(DeltaTable(uri).get_add_actions(flatten=True)).to_pylist()
    assert add["num_records"] == 2 and add["max.x"] is None and add["min.x"] is None


def test_partitioned_write_restores_partition_columns(spark, tmp_path):
    uri = str(tmp_path / "p")
    rows = [("pfd", "v1", i, [float(i)]) for i in range(4)] + [("a:b c/d", None, 9, [9.0])]
    df = emb_df(spark, rows).withColumn("shard", (F.col("id") % 2).cast("int"))
    D.write_table(df, uri, partition_by=["model_name", "model_version", "shard"])

    top = sorted(os.listdir(uri))
    assert top == ["_delta_log", "model_name=a%3Ab c%2Fd", "model_name=pfd"]
    assert os.listdir(os.path.join(uri, "model_name=a%3Ab c%2Fd")) == ["model_version=__HIVE_DEFAULT_PARTITION__"]
    back = D.read_table(spark, uri)
    assert back.columns == ["model_name", "model_version", "id", "vec", "shard"]
    assert dict(back.dtypes)["shard"] == "int"
    assert sorted_rows(back, *back.columns) == sorted_rows(df, *back.columns)

    pfd = D.read_table(spark, uri, partition_filters=[("model_name", "=", "pfd"), ("shard", "=", "1")])
    assert sorted_rows(pfd, "model_name", "model_version", "id", "shard") == [("pfd", "v1", 1, 1), ("pfd", "v1", 3, 1)]
    nulls = D.read_table(spark, uri, partition_filters=[("model_version", "=", "")])   # '' is null
    assert sorted_rows(nulls, "model_name", "id") == [("a:b c/d", 9)]
    files = D.snapshot_files(uri, [("model_name", "=", "pfd")])
    assert files and sorted(files) == sorted(f for f in D.snapshot_files(uri) if "/model_name=pfd/" in f)
    assert sorted(D.read_arrow(uri, ["id"], [("model_version", "=", "v1")])["id"].to_pylist()) == [0, 1, 2, 3]


def test_overwrite_replaces_and_append_adds(spark, tmp_path):
    uri = str(tmp_path / "o")
    assert D.write_table(spark.range(5), uri) == 0
    assert D.write_table(spark.range(100, 103), uri, mode="overwrite") == 1
    assert sorted(r.id for r in D.read_table(spark, uri).collect()) == [100, 101, 102]
    assert D.write_table(spark.range(100, 103), uri, mode="overwrite") == 2   # rerun: no duplicates
    assert D.read_table(spark, uri).count() == 3
    assert D.write_table(spark.range(7, 9), uri, mode="append") == 3
    assert sorted(r.id for r in D.read_table(spark, uri).collect()) == [7, 8, 100, 101, 102]
    assert DeltaTable(uri, version=0).to_pyarrow_table().num_rows == 5        # time travel intact


def test_overwrite_may_change_schema_and_partitioning_append_keeps_them(spark, tmp_path):
    uri = str(tmp_path / "s")
    D.write_table(spark.range(4), uri)
    wide = spark.range(3).withColumn("y", (F.col("id") % 2).cast("int"))
    assert D.write_table(wide, uri, partition_by=["y"]) == 1
    assert DeltaTable(uri).metadata().partition_columns == ["y"]
    # partition_by=None keeps the table's partitioning; columns may come in another order.
    D.write_table(spark.range(10, 12).select(F.lit(5).alias("y"), "id"), uri, mode="append")
    assert {os.path.relpath(f, uri).split("/")[0] for f in D.snapshot_files(uri)} == {"y=0", "y=1", "y=5"}
    assert sorted_rows(D.read_table(spark, uri), "id", "y") == [(0, 0), (1, 1), (2, 0), (10, 5), (11, 5)]


def test_replace_partitions_keeps_others_and_rerun_does_not_duplicate(spark, tmp_path):
    uri = str(tmp_path / "e")
    parts = ["model_name", "model_version"]
    first = [("pfd", "v1", i, [0.0]) for i in range(3)] + [("pfd", "v2", 7, [2.0]), ("dssm", "v1", 8, [3.0])]
    D.write_table(emb_df(spark, first), uri, partition_by=parts)
    new = emb_df(spark, [("pfd", "v1", i, [1.0]) for i in range(10, 12)])
    target = {"model_name": "pfd", "model_version": "v1"}
    assert D.write_table(new, uri, replace_partitions=target) == 1
    assert D.write_table(new, uri, replace_partitions=target) == 2
    got = sorted_rows(D.read_table(spark, uri), "model_name", "model_version", "id")
    assert got == [("dssm", "v1", 8), ("pfd", "v1", 10), ("pfd", "v1", 11), ("pfd", "v2", 7)]

    before = files_under(uri)
    stray = emb_df(spark, [("pfd", "v1", 20, [1.0]), ("pfd", "v3", 21, [1.0])]).coalesce(1)
    with pytest.raises(Exception, match="outside replace_partitions"):
        D.write_table(stray, uri, replace_partitions=target)
    assert D.table_version(uri) == 2 and files_under(uri) == before
    with pytest.raises(ValueError, match="mode='overwrite'"):
        D.write_table(new, uri, mode="append", replace_partitions=target)


def test_failed_task_commits_nothing_and_removes_its_files(spark, tmp_path, monkeypatch):
    uri = str(tmp_path / "f")
    D.write_table(spark.range(10).withColumn("x", F.col("id") * 2), uri)
    before, rows_before = files_under(uri), sorted_rows(D.read_table(spark, uri), "id", "x")

    @F.udf("long")
    def explode_on_last(v):   # partition 1's last row fails after partition 0 wrote its file
        if v == 999:
            time.sleep(4.0)   # partition 0 finishes its file first, even on a busy machine
            raise RuntimeError("boom")
        return v * 2

    seen = []
    real_cleanup = D._cleanup

    def spy(uri_, write_id, keep, table_existed, **kw):
        seen.extend(f for f in files_under(uri_) if write_id in f)
        real_cleanup(uri_, write_id, keep, table_existed, **kw)
    monkeypatch.setattr(D, "_cleanup", spy)

    df = spark.range(0, 1000, numPartitions=2).withColumn("x", explode_on_last("id"))
    with pytest.raises(Exception, match="boom"):
        D.write_table(df, uri, mode="overwrite")
    assert seen, "the test should have had a finished task's file to clean up"
    assert D.table_version(uri) == 0
    assert files_under(uri) == before
    assert sorted_rows(D.read_table(spark, uri), "id", "x") == rows_before

    new_uri = str(tmp_path / "never")     # a failed first write leaves no folder behind
    with pytest.raises(Exception, match="boom"):
        D.write_table(df, new_uri)
    assert not os.path.exists(new_uri)


def test_success_deletes_stray_files_of_its_own_failed_attempts(spark, tmp_path, monkeypatch):
    uri = str(tmp_path / "r")
    real_commit = D._commit

    def commit_after_a_lost_attempt(uri_, dt_, schema, part_cols, mode, expected, actions, meta):
        folder, _, name = actions[0].path.rpartition("/")
        write_id = name.split("-")[1]
        stray = os.path.join(uri_, folder, f"part-{write_id}-deadbeef-00000.snappy.parquet")
        open(stray, "wb").write(b"half a file")
        open(os.path.join(uri_, folder, "someone-elses.parquet"), "wb").write(b"x")
        real_commit(uri_, dt_, schema, part_cols, mode, expected, actions, meta)
    monkeypatch.setattr(D, "_commit", commit_after_a_lost_attempt)

    D.write_table(spark.range(4).withColumn("p", F.lit("a")), uri, partition_by=["p"])
    on_disk = {f for f in data_files(uri) if "deadbeef" in f or "someone" in f}
    assert on_disk == {"p=a/someone-elses.parquet"}
    assert D.read_table(spark, uri).count() == 4


def test_append_with_mismatched_schema_commits_nothing(spark, tmp_path):
    uri = str(tmp_path / "m")
    D.write_table(spark.range(3).withColumn("score", F.lit(1.0)), uri)
    before = files_under(uri)
    with pytest.raises(ValueError, match=r"\['score'\]"):
        D.write_table(spark.range(3).withColumn("score", F.lit("high")), uri, mode="append")
    with pytest.raises(ValueError, match=r"\['rank', 'score'\]"):
        D.write_table(spark.range(3).withColumn("rank", F.lit(1.0)), uri, mode="append")
    with pytest.raises(ValueError, match="partitioned by"):
        D.write_table(spark.range(3).withColumn("score", F.lit(1.0)), uri, mode="append", partition_by=["id"])
    assert D.table_version(uri) == 0 and files_under(uri) == before


def test_bad_mode_errors(spark, tmp_path):
    with pytest.raises(ValueError, match="'upsert'"):
        D.write_table(spark.range(1), str(tmp_path / "x"), mode="upsert")
    assert not (tmp_path / "x").exists()


def test_empty_dataframe_gives_readable_empty_table(spark, tmp_path):
    uri = str(tmp_path / "empty")
    empty = emb_df(spark, [])
    assert D.write_table(empty, uri, partition_by=["model_name"]) == 0
    back = D.read_table(spark, uri)
    assert back.count() == 0 and back.columns == empty.columns
    assert dict(back.dtypes)["vec"] == "array<float>"
    assert D.snapshot_files(uri) == [] and D.read_arrow(uri).num_rows == 0
    D.write_table(emb_df(spark, [("a", "v", 1, [1.0])]), uri, mode="append")
    assert D.write_table(empty, uri) == 2 and D.read_table(spark, uri).count() == 0


def test_missing_table_errors_name_it(spark, tmp_path):
    uri = str(tmp_path / "user_embeddings")
    assert not D.table_exists(uri)
    with pytest.raises(FileNotFoundError, match=r"user_embeddings.*write_embeddings"):
        D.snapshot_files(uri)
    with pytest.raises(FileNotFoundError, match="user_embeddings"):
        D.read_table(spark, uri)


def test_replace_where_for_native_path():
    assert D._replace_where({"model_name": "it's", "v": 2, "x": None}) == (
        "`model_name` = 'it\\'s' AND `v` = 2 AND `x` IS NULL")

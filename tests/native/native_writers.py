"""Spark's own Delta (delta-spark) against the delta-rs commit path, in a native session:
the same tables from both, each reading the other's, and concurrent writers."""
from __future__ import annotations

import os
import threading
import time

import pytest
from deltalake import DeltaTable

from etl import delta_io as D

SCHEMA = "model_name string, model_version string, id string, vector array<float>, n long"
WRITERS = ("spark", "delta_rs")


def rows(version, ids, model="m"):
    return [(model, version, str(i), [float(i), -float(i)], i) for i in ids]


def df(spark, data):
    return spark.createDataFrame(data, SCHEMA)


def replace(spark, uri, version, ids, writer, model="m"):
    return D.write_table(df(spark, rows(version, ids, model)), uri, mode="overwrite",
                         partition_by=["model_name", "model_version"],
                         replace_partitions={"model_name": model, "model_version": version}, writer=writer)


def native_rows(spark, uri, version=None):
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return sorted((r.model_name, r.model_version, r.id, tuple(r.vector), r.n)
                  for r in reader.load(uri).collect())


def rs_rows(uri, version=None):
    t = DeltaTable(uri, version=version).to_pyarrow_table()
    return sorted((r["model_name"], r["model_version"], r["id"], tuple(r["vector"]), r["n"]) for r in t.to_pylist())


def shape_of(spark, uri):
    """(columns and types without nullability, partition columns), as each engine sees them."""
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{uri}`").first()
    native = ([(f.name, f.dataType.simpleString()) for f in spark.read.format("delta").load(uri).schema],
              list(detail["partitionColumns"]))
    dt = DeltaTable(uri)
    rs = ([(f.name, str(f.type)) for f in dt.schema().fields], list(dt.metadata().partition_columns))
    return native, rs


def test_the_session_has_native_delta_from_the_pinned_delta_spark(spark):
    from importlib.metadata import version

    from etl.spark import delta_package

    assert D.has_native_delta(spark)
    assert D.resolve_writer(spark, "auto") == "spark"
    assert delta_package().endswith(f":{version('delta-spark')}")
    assert "io.delta:delta-spark" in spark.conf.get("spark.jars.packages")


def test_both_writers_give_the_same_rows_schema_partitions_and_replace_semantics(spark, tmp_path):
    uris = {w: str(tmp_path / w) for w in WRITERS}
    for w, uri in uris.items():
        assert replace(spark, uri, "v1", range(5), w) == 0
        assert replace(spark, uri, "v2", range(3), w) == 1
        assert replace(spark, uri, "v1", [7, 8], w) == 2   # replaces v1 only, never adds to it
    expected = sorted(rows("v1", [7, 8]) + rows("v2", range(3)))
    expected = [(m, v, i, tuple(vec), n) for m, v, i, vec, n in expected]
    for uri in uris.values():
        assert native_rows(spark, uri) == rs_rows(uri) == expected
        assert native_rows(spark, uri, 1) == rs_rows(uri, 1)          # time travel agrees too
    (n_spark, rs_spark), (n_rs, rs_rs) = shape_of(spark, uris["spark"]), shape_of(spark, uris["delta_rs"])
    assert n_spark == n_rs and rs_spark == rs_rs
    assert n_spark[1] == ["model_name", "model_version"]
    # a full overwrite may change the schema and the partitioning, on both paths
    for w, uri in uris.items():
        plain = spark.createDataFrame([("a", 1)], "id string, k int")
        D.write_table(plain, uri, mode="overwrite", partition_by=[], writer=w)
        assert D.read_table(spark, uri).collect() == [("a", 1)]
        assert DeltaTable(uri).metadata().partition_columns == []


def test_a_table_written_by_one_writer_is_read_and_written_by_the_other(spark, tmp_path):
    uri = str(tmp_path / "t")
    replace(spark, uri, "v1", range(4), "delta_rs")
    replace(spark, uri, "v2", range(2), "spark")
    replace(spark, uri, "v1", [9], "spark")                         # native replaceWhere on delta-rs files
    D.write_table(df(spark, rows("v3", [5])), uri, mode="append", writer="delta_rs")
    expected = [(m, v, i, tuple(vec), n) for m, v, i, vec, n in sorted(rows("v1", [9]) + rows("v2", range(2))
                                                                        + rows("v3", [5]))]
    assert native_rows(spark, uri) == rs_rows(uri) == expected
    # delta_io's reader takes the native path in this session and agrees with delta-rs
    got = sorted((r.id, r.model_version) for r in D.read_table(spark, uri, partition_filters=[("model_version", "=", "v1")]).collect())
    assert got == [("9", "v1")]


def test_rows_outside_the_replaced_partition_commit_nothing_on_either_path(spark, tmp_path):
    for w in WRITERS:
        uri = str(tmp_path / w)
        replace(spark, uri, "v1", range(3), w)
        before = DeltaTable(uri).version()
        bad = df(spark, rows("v1", [1]) + rows("v2", [2]))
        with pytest.raises(Exception):
            D.write_table(bad, uri, mode="overwrite", partition_by=["model_name", "model_version"],
                          replace_partitions={"model_name": "m", "model_version": "v1"}, writer=w)
        assert DeltaTable(uri).version() == before and len(rs_rows(uri)) == 3


def _run(results, key, fn):
    try:
        results[key] = fn()
    except BaseException as exc:   # noqa: BLE001 - reported by the test
        results[key] = exc


@pytest.mark.parametrize("other", WRITERS)
def test_concurrent_writers_of_different_model_versions_both_land_with_their_own_versions(spark, tmp_path, other):
    uri = str(tmp_path / "emb")
    replace(spark, uri, "v0", [0], "spark")
    results = {}
    threads = [threading.Thread(target=_run, args=(results, "a", lambda: replace(spark, uri, "va", range(50), "spark"))),
               threading.Thread(target=_run, args=(results, "b", lambda: replace(spark, uri, "vb", range(40), other)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(isinstance(v, BaseException) for v in results.values()), results
    assert sorted([results["a"], results["b"]]) == [1, 2]
    counts = {}
    for _, v, *_ in rs_rows(uri):
        counts[v] = counts.get(v, 0) + 1
    assert counts == {"v0": 1, "va": 50, "vb": 40}                    # nothing lost, nothing twice
    # each writer's version is its own commit: its rows are there, at that version
    assert {r[1] for r in native_rows(spark, uri, results["a"])} >= {"va"}
    assert {r[1] for r in native_rows(spark, uri, results["b"])} >= {"vb"}


def _slow_replace(spark, uri, ids, started, go):
    """A native replace of partition v1 whose data is computed only after ``go`` exists:
    Delta's transaction has read the table by then (it starts before the data is written)."""
    schema = SCHEMA

    def wait(batches):
        import pathlib

        pathlib.Path(started).touch()
        deadline = time.time() + 120
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.05)
        yield from batches

    slow = df(spark, rows("v1", ids)).coalesce(1).mapInArrow(wait, schema)
    return D.write_table(slow, uri, mode="overwrite", partition_by=["model_name", "model_version"],
                         replace_partitions={"model_name": "m", "model_version": "v1"}, writer="spark")


def _race(spark, tmp_path, uri):
    """Writer A (slow) and writer B (fast) replace the same partition; B commits while A
    is writing. Returns (A's result or error, B's version)."""
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    results = {}
    a = threading.Thread(target=_run, args=(results, "a", lambda: _slow_replace(spark, uri, range(10, 16), started, go)))
    a.start()
    deadline = time.time() + 120
    while not os.path.exists(started) and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(started), "the slow writer never started"
    b_version = replace(spark, uri, "v1", range(20, 23), "spark")
    open(go, "w").close()
    a.join(300)
    return results["a"], b_version


def test_a_write_that_loses_a_commit_race_is_retried_and_lands_once(spark, tmp_path):
    uri = str(tmp_path / "emb")
    replace(spark, uri, "v1", range(3), "spark")
    a, b_version = _race(spark, tmp_path, uri)
    assert not isinstance(a, BaseException), a
    assert b_version == 1 and a == 2                                   # A committed after B, on a retry
    assert [r[2] for r in native_rows(spark, uri)] == [str(i) for i in range(10, 16)]   # A's rows, once
    assert [r[2] for r in native_rows(spark, uri, b_version)] == ["20", "21", "22"]


def test_a_write_that_keeps_losing_fails_with_deltas_conflict_named(spark, tmp_path, monkeypatch):
    uri = str(tmp_path / "emb")
    replace(spark, uri, "v1", range(3), "spark")
    monkeypatch.setattr(D, "COMMIT_ATTEMPTS", 1)
    a, b_version = _race(spark, tmp_path, uri)
    assert isinstance(a, D.DeltaConflictError), a
    msg = str(a)
    assert f"Delta table {uri}: the commit lost to concurrent writers 1 times" in msg
    assert "Concurrent" in msg and "nothing of this write was committed" in msg
    assert DeltaTable(uri).version() == b_version                     # nothing of A committed
    assert [r[2] for r in native_rows(spark, uri)] == ["20", "21", "22"]

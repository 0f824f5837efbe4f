"""Faults around the Delta tables (issue: nothing silently wrong, nothing lost): concurrent
writers, a commit that keeps losing, a write whose outcome is unknown, files a killed
write left behind, and embedding tables of one model version that do not belong together.

Each case states what the caller gets (result or error naming the table or file) and
what every table holds afterwards.
"""
from __future__ import annotations

import os
import threading
import time
import uuid

import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable

from etl import delta_io as D

try:
    from tests.test_delta_io import data_files, emb_df, sorted_rows
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    from test_delta_io import data_files, emb_df, sorted_rows

PART = ["model_name", "model_version"]


def _replace(spark, uri, name, version, ids, value=1.0):
    rows = [(name, version, i, [float(value)]) for i in ids]
    return D.write_table(emb_df(spark, rows), uri, mode="overwrite", partition_by=PART,
                         replace_partitions={"model_name": name, "model_version": version})


class _RaceAtCommit:
    """Holds the first commit attempt of ``n`` writers until all of them have read the
    table, so they race: all but one lose and must retry."""

    def __init__(self, monkeypatch, n: int = 2):
        self.barrier = threading.Barrier(n, timeout=60)
        self.first = set()
        self.attempts: list[str] = []
        real = D._commit

        def commit(uri, dt, *args):
            me = threading.get_ident()
            self.attempts.append(f"{me}:{'retry' if me in self.first else 'first'}")
            if me not in self.first:
                self.first.add(me)
                self.barrier.wait()
            return real(uri, dt, *args)

        monkeypatch.setattr(D, "_commit", commit)


def _in_threads(*fns):
    out, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            out[i] = fn()
        except BaseException as exc:   # surfaced in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return out


# ---------------------------------------------------------------- concurrent writers

def test_a_write_finds_its_own_version_when_another_commit_lands_while_it_looks(tmp_path, monkeypatch):
    """Before: delta-rs's history() numbers its entries down from the version its handle
    loaded, so a commit landing after that load made a write report the version before
    its own (two racing writers returned {1, 3}, not {2, 3})."""
    import deltalake
    import pyarrow as pa

    uri, rows = str(tmp_path / "t"), pa.table({"x": [1]})
    deltalake.write_deltalake(uri, rows)
    deltalake.write_deltalake(uri, rows, mode="append",
                              commit_properties=deltalake.CommitProperties(custom_metadata={D._WRITE_ID_KEY: "mine"}))
    real, overtaken = deltalake.DeltaTable, []

    class LoadedThenOvertaken(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not overtaken:   # another writer commits right after this handle loaded
                overtaken.append(True)
                deltalake.write_deltalake(uri, rows, mode="append")

    monkeypatch.setattr(deltalake, "DeltaTable", LoadedThenOvertaken)
    assert D._own_version(uri, "mine") == 1
    assert overtaken and real(uri).version() == 2
    with pytest.raises(RuntimeError, match="the write nobody committed"):
        D._own_version(uri, "nobody")


def test_disjoint_partition_writes_at_once_both_land(spark, tmp_path, monkeypatch):
    """Before: CommitFailedError 'a concurrent transaction deleted data this operation read'."""
    uri = str(tmp_path / "item_embeddings")
    _replace(spark, uri, "a", "v1", [1, 2])
    _replace(spark, uri, "b", "v1", [3])
    race = _RaceAtCommit(monkeypatch)
    va, vb = _in_threads(lambda: _replace(spark, uri, "a", "v1", [10, 11, 12], 2.0),
                         lambda: _replace(spark, uri, "b", "v1", [13], 3.0))
    assert sorted(a.split(":")[1] for a in race.attempts) == ["first", "first", "retry"]
    df = D.read_table(spark, uri)
    assert sorted_rows(df, "model_name", "id") == [("a", 10), ("a", 11), ("a", 12), ("b", 13)]
    # each writer's version is its own commit's, whichever committed last
    assert {va, vb} == {2, 3}
    history = {h["version"]: h for h in DeltaTable(uri).history()}
    assert history[va][D._WRITE_ID_KEY] != history[vb][D._WRITE_ID_KEY]
    # no file on disk that the log does not name: the loser's files were committed by its retry
    logged = D._logged_paths(*pafs.FileSystem.from_uri(uri))
    assert data_files(uri) <= logged


def test_creating_a_new_table_at_once_both_land(spark, tmp_path, monkeypatch):
    """Before: the loser failed with 'table already exists'."""
    uri = str(tmp_path / "user_embeddings")
    _RaceAtCommit(monkeypatch)
    _in_threads(lambda: _replace(spark, uri, "a", "v1", [1]), lambda: _replace(spark, uri, "b", "v2", [2]))
    assert sorted_rows(D.read_table(spark, uri), "model_name", "model_version", "id") == [("a", "v1", 1), ("b", "v2", 2)]
    assert DeltaTable(uri).version() == 1


def test_a_commit_that_keeps_losing_is_reported_naming_the_table(spark, tmp_path, monkeypatch):
    uri = str(tmp_path / "item_embeddings")
    _replace(spark, uri, "a", "v1", [1])
    before = data_files(uri)

    def always_loses(*args):
        raise RuntimeError("CommitFailedError: a concurrent transaction deleted data this operation read")

    monkeypatch.setattr(D, "_commit", always_loses)
    monkeypatch.setattr(D, "COMMIT_ATTEMPTS", 3)
    with pytest.raises(D.DeltaConflictError, match=rf"Delta table {uri}: the commit lost to concurrent writers 3 times"):
        _replace(spark, uri, "a", "v1", [7])
    assert DeltaTable(uri).version() == 0 and data_files(uri) == before   # nothing committed, nothing left


def test_a_write_whose_commit_may_have_landed_keeps_its_files(spark, tmp_path, monkeypatch):
    """Before: any error while reading the log meant 'nothing committed', and the files of
    a commit that had landed were deleted."""
    uri = str(tmp_path / "t")
    _replace(spark, uri, "a", "v1", [1])
    real = D._commit

    def commit_then_fail(*args):
        real(*args)
        raise OSError("connection reset while reading the commit's response")

    monkeypatch.setattr(D, "_commit", commit_then_fail)
    monkeypatch.setattr(D, "_committed", lambda uri, write_id: None)   # the log cannot be read now
    with pytest.raises(OSError, match="connection reset"):
        _replace(spark, uri, "a", "v1", [5, 6])
    monkeypatch.undo()
    assert sorted_rows(D.read_table(spark, uri), "id") == [(5,), (6,)]   # the landed commit is whole


# ---------------------------------------------------------------- what a killed write leaves

def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def _leftover(spark, uri, age_seconds) -> str:
    """A table with one committed partition, and a torn file of a killed write beside it."""
    _replace(spark, uri, "a", "v1", [1])
    folder = os.path.join(uri, "model_name=a", "model_version=v1")
    path = os.path.join(folder, f"part-{uuid.uuid4().hex}-abc-00000.snappy.parquet")
    with open(path, "wb") as fh:
        fh.write(b"torn")
    _age(path, age_seconds)
    return path


def test_uncommitted_files_of_a_killed_write_are_removed_once_old(spark, tmp_path):
    uri = str(tmp_path / "t")
    _replace(spark, uri, "a", "v1", [1])
    _replace(spark, uri, "a", "v1", [2])          # the first file is now named only by version 0's log
    folder = os.path.join(uri, "model_name=a", "model_version=v1")
    active = {os.path.basename(p) for p in D.snapshot_files(uri)}
    replaced = [f for f in os.listdir(folder) if f not in active]
    assert len(replaced) == 1
    killed_old = f"part-{uuid.uuid4().hex}-abc-00000.snappy.parquet"
    killed_young = f"part-{uuid.uuid4().hex}-abc-00000.snappy.parquet"
    foreign = "someone-elses.parquet"
    for name in (killed_old, killed_young, foreign):
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(b"PAR1 torn")
    for name in (killed_old, foreign, replaced[0]):
        _age(os.path.join(folder, name), 7200)
    deleted = D.remove_uncommitted_files(uri, min_age_seconds=3600)
    assert deleted == [f"model_name=a/model_version=v1/{killed_old}"]
    left = set(os.listdir(folder))
    assert killed_young in left and foreign in left and replaced[0] in left   # young, not ours, in the log
    assert sorted_rows(D.read_table(spark, uri), "id") == [(2,)]
    assert sorted_rows(D.read_table(spark, uri, version=0), "id") == [(1,)]   # time travel intact


def test_a_later_write_to_the_partition_removes_old_leftovers(spark, tmp_path):
    uri = str(tmp_path / "t")
    leftover = _leftover(spark, uri, 2 * D.UNCOMMITTED_MIN_AGE_S)
    _replace(spark, uri, "a", "v1", [3])
    assert not os.path.exists(leftover)


def test_nothing_is_removed_when_the_log_cannot_be_read(spark, tmp_path, monkeypatch):
    uri = str(tmp_path / "t")
    leftover = _leftover(spark, uri, 7200)
    monkeypatch.setattr(D, "_logged_paths", lambda fs, root: None)
    assert D.remove_uncommitted_files(uri, min_age_seconds=60) == []
    assert os.path.exists(leftover)


# ---------------------------------------------------------------- embedding tables of one model version

@pytest.fixture(scope="module")
def dssm_run(spark, tmp_path_factory):
    """A tiny DSSM through jobs/distill.py: features, checkpoint, bundle, the committed pair."""
    import torch

    from jobs import distill
    try:
        from tests.test_pipeline import _Capture, _run_job
    except ImportError:
        from test_pipeline import _Capture, _run_job

    tmp = tmp_path_factory.mktemp("pair")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _Capture() as cap:
            result = _run_job(distill, tmp, cap, "train.epochs=1", "run.name=dssm", args=["--method", "dssm"])
    finally:
        torch.set_num_threads(threads)
    return tmp, result


def _cfg(tmp, *overrides):
    from rec_models.config import load_config
    try:
        from tests.test_pipeline import SMALL
    except ImportError:
        from test_pipeline import SMALL
    return load_config(method="dssm", overrides=[f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}",
                                                 *SMALL, "run.name=dssm", *overrides])


def _job(module, tmp, *overrides, args=()):
    """(exit code, stdout, stderr) of a job run in-process."""
    import contextlib
    import io

    try:
        from tests.test_pipeline import SMALL
    except ImportError:
        from test_pipeline import SMALL
    argv = list(args)
    for item in [f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}", *SMALL, "run.name=dssm",
                 *overrides]:
        argv += ["--set", item]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.run(module.__doc__, module.body, getattr(module, "options", None), argv=argv)
    return code, out.getvalue(), err.getvalue()


def _versions(cfg):
    return {t: DeltaTable(cfg.warehouse.uri(t)).version() for t in ("user_embeddings", "item_embeddings",
                                                                   "model_versions")}


@pytest.mark.slow
def test_a_write_killed_between_the_two_tables_leaves_readers_on_the_previous_pair(dssm_run, monkeypatch):
    """Before: the user table had the new run, the item table the old one, and evaluate.py
    reported metrics from the mix with exit 0."""
    from jobs import evaluate, write_embeddings
    from orchestration import evaluation
    from orchestration.artifacts import committed_embeddings

    tmp, first = dssm_run
    cfg = _cfg(tmp)
    pair = committed_embeddings(cfg, "dssm", "v1")
    assert pair.run_id == first["run_id"]
    assert (pair.user_table_version, pair.item_table_version) == (
        DeltaTable(cfg.warehouse.uri("user_embeddings")).version(), DeltaTable(cfg.warehouse.uri("item_embeddings")).version())
    before = evaluation.retrieval_metrics(cfg, "dssm", "v1")
    versions = _versions(cfg)

    real = D.write_table

    def killed_at_the_item_table(df, uri, *args, **kwargs):
        if uri.endswith("item_embeddings"):
            raise KeyboardInterrupt("killed between the two embedding commits")
        return real(df, uri, *args, **kwargs)

    monkeypatch.setattr(D, "write_table", killed_at_the_item_table)
    with pytest.raises(KeyboardInterrupt):
        _job(write_embeddings, tmp, args=["--run-id", "second-run"])
    monkeypatch.undo()
    after = _versions(cfg)
    assert after["user_embeddings"] == versions["user_embeddings"] + 1            # the new run's users landed
    assert after["item_embeddings"] == versions["item_embeddings"]                # its items did not
    assert after["model_versions"] == versions["model_versions"]                  # nor the pair
    latest_users = D.read_arrow(cfg.warehouse.uri("user_embeddings"), ["run_id"])
    assert set(latest_users.column("run_id").to_pylist()) == {"second-run"}
    # readers see the first run's pair, whole
    assert committed_embeddings(cfg, "dssm", "v1") == pair
    assert evaluation.retrieval_metrics(cfg, "dssm", "v1") == before
    code, out, err = _job(evaluate, tmp, args=["--method", "dssm"])
    assert code == 0, err[-2000:]
    import json
    assert json.loads(out.strip().splitlines()[-1])["retrieval"] == before


@pytest.mark.slow
def test_a_pair_of_two_runs_is_refused_naming_the_tables(dssm_run, spark):
    """A model_versions row whose tables hold another run's vectors (written by hand, or by
    a writer that bypassed the job) is an error, not a silent mix."""
    import datetime as dt

    from orchestration import evaluation
    from orchestration.artifacts import CommittedEmbeddings, committed_embeddings
    from orchestration.embeddings import commit_model_version
    from rec_models.config import BadInputError

    tmp, _ = dssm_run
    cfg = _cfg(tmp)
    good = committed_embeddings(cfg, "dssm", "v1")
    # a row naming another run than the one whose vectors those table versions hold
    mixed = CommittedEmbeddings("dssm", "v1", "a-third-run", good.user_table_version, good.item_table_version,
                                good.score_kind)
    commit_model_version(spark, cfg, mixed, "nowhere.pt", dt.datetime.now(dt.timezone.utc))
    try:
        with pytest.raises(BadInputError, match=r"user_embeddings version \d+ holds run\(s\) .* commits run a-third-run"):
            evaluation.load_embeddings(cfg, "dssm", "v1")
    finally:
        commit_model_version(spark, cfg, good, "restored.pt", dt.datetime.now(dt.timezone.utc))
    assert evaluation.load_embeddings(cfg, "dssm", "v1").run_id == good.run_id


@pytest.mark.slow
def test_write_embeddings_reads_every_input_before_the_first_write(dssm_run):
    """Before: a corrupt feature_spec.json rewrote both tables, then exited 2 with a JSON
    parser's message that did not name the file."""
    from jobs import write_embeddings

    tmp, _ = dssm_run
    cfg = _cfg(tmp)
    versions = _versions(cfg)
    spec_path = cfg.warehouse.spec_path
    with open(spec_path) as fh:
        good = fh.read()
    try:
        with open(spec_path, "w") as fh:
            fh.write(good[: len(good) // 2])
        code, _, err = _job(write_embeddings, tmp)
    finally:
        with open(spec_path, "w") as fh:
            fh.write(good)
    assert code == 2, err[-2000:]
    assert spec_path in err and "Traceback" not in err
    assert _versions(cfg) == versions   # no table written


@pytest.mark.slow
def test_evaluate_refuses_tables_of_another_run_than_the_checkpoint(dssm_run, tmp_path):
    """A retrained checkpoint whose embedding write failed: the tables still serve the
    previous run. Before: retrieval metrics of the old vectors were filed under the new model."""
    import torch

    from jobs import evaluate
    from orchestration.artifacts import committed_embeddings

    tmp, first = dssm_run
    ckpt = torch.load(first["checkpoint"], map_location="cpu", weights_only=False)
    ckpt["tags"] = {**ckpt.get("tags", {}), "run_id": "retrained-run"}
    path = tmp_path / "retrained.pt"
    torch.save(ckpt, path)
    served = committed_embeddings(_cfg(tmp), "dssm", "v1").run_id
    code, _, err = _job(evaluate, tmp, args=["--method", "dssm", "--checkpoint", str(path)])
    assert code == 2, err[-2000:]
    assert f"are run {served}'s" in err and "retrained-run" in err and "write_embeddings" in err

"""The cluster lane: the jobs on a Spark standalone cluster, training on its executors.

Runs against the cluster of ``scripts/spark_cluster.sh`` (a master and two 1-core workers
on 127.0.0.1, each with its own work dir): ``.ci/lane_cluster.sh`` starts it, runs
``pytest -m cluster`` with ``DTT_SPARK_MASTER`` set and stops it. Without
``DTT_SPARK_MASTER`` these tests skip; with ``DTT_REQUIRE_CLUSTER=1`` (CI) they fail instead.

What a cluster has and ``local[2]`` does not, and what is checked here:
- training as barrier tasks on the executors (``train.local_mode=false``) with
  TorchDistributor and with Horovod: two ranks on two executors, their records in the job
  result, the same model as the ``local[2]`` run of the same seed, the same tables;
- executors whose working directories are not the driver's: the driver runs in a temp
  folder with relative ``warehouse.root`` / ``run.output_dir``, and nothing may land in
  the executors' folders;
- faults: a rank's exception on an executor reaches the driver as itself with its
  traceback; a rank's process killed mid-training fails the job in bounded time naming
  the rank, and ``train.resume=auto`` finishes the run; a worker JVM killed during the
  embedding write, or during the feature build (ETL), leaves the Delta tables as a clean
  run's (Spark reruns the lost tasks and the lost shuffle output they need).

Data: the synthetic set at its smallest (200 users, 100 items, 6,000 events), so the lane
is mostly JVM and torch start-up: 15 minutes on this project's 2-core machine while other
jobs ran on it (load 5-8), 23 minutes under load 30-60. The launcher's driver side (slot
check, rank records, error reports) has fast tests here too, run in the main lane.
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest



def cluster(test):
    """A test of the cluster lane. pytest.ini's 900 s timeout counts fixture setup too, and
    the first test sets up four pipeline runs (8 to 12 minutes on 2 busy cores)."""
    return pytest.mark.cluster(pytest.mark.timeout(1500)(test))


ROOT = Path(__file__).resolve().parents[1]
SUBMIT = Path(sys.executable).parent / "spark-submit"
CLUSTER_SCRIPT = ROOT / "scripts" / "spark_cluster.sh"
CLUSTER_DIR = Path(os.environ.get("DTT_CLUSTER_DIR", ROOT / ".cluster")).resolve()

SMALL = [
    "data.source.synthetic.n_users=200", "data.source.synthetic.n_items=100",
    "data.source.synthetic.n_events=6000", "data.source.synthetic.partitions=2",
    "model.embedding_dim=8", "model.tower_dims=[32]", "model.output_dim=16", "model.teacher_dims=[32]",
    "train.batch_size=256", "train.num_processes=2", "train.log_every=1000",
    "eval.baselines=false", "distill.train_baseline=false", "tracking.enabled=false",
    # relative on purpose: resolved on the driver, never in an executor's working directory
    "warehouse.root=wh", "run.output_dir=runs",
]
# two 1-core executors: eight shuffle partitions would be eight tasks per stage
SPARK_YAML = """spark:
  conf:
    spark.sql.shuffle.partitions: 2
    spark.default.parallelism: 2
"""
TOL = 1e-6   # tests/test_horovod.py's backend parity tolerance (observed here: bit-identical)


# ---- the launcher's driver side, without a cluster (fast; run in the main lane) ------------

def test_a_launch_that_ran_fewer_ranks_than_asked_is_an_error():
    """A silent fall-back to one process (one rank record, a world of one) fails the job."""
    from orchestration.spark_training.launchers import WorkerError, _check_world

    ranks = [{"rank": 0, "executor": "driver"}]
    with pytest.raises(WorkerError, match=r"train.num_processes=2 ranks, but ranks \[0\] reported \(world size 1\)"):
        _check_world(ranks, {"world_size": 1}, 2, "torch_distributor")
    _check_world([{"rank": 0}, {"rank": 1}], {"world_size": 2}, 2, "torch_distributor")


def test_a_rank_that_died_without_a_report_is_named_with_the_epoch_to_resume_from(tmp_path, monkeypatch):
    """Rank 0 was killed (its record, no report); rank 1 then failed in the allreduce (a
    consequential report): the error names rank 0, its pid, host and executor, and the last
    complete epoch of the run."""
    from orchestration.spark_training.launchers import (WorkerLostError, _raise_worker_error, _write_record,
                                                        _write_report)
    from rec_models.training.loop import TrainJob, write_run_state

    out = tmp_path / "out"
    reports = out / ".worker-reports-x"
    reports.mkdir(parents=True)
    monkeypatch.setenv("SPARK_LOG_URL_STDERR", "http://w:8081/logPage/?appId=app-1&executorId=3&logType=stderr")
    _write_record(str(reports), 0, "torch_distributor")
    _write_record(str(reports), 1, "torch_distributor")
    _write_report(str(reports), 1, RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    write_run_state(str(out), {"run_id": "r1", "last_complete_epoch": 1, "checkpoint": "epoch_1.pt",
                               "finished": False})
    job = TrainJob(kind="dssm", config={}, spec_json="{}", files={}, out_dir=str(out), tags={"run_id": "r1"})
    with pytest.raises(WorkerLostError) as info:
        _raise_worker_error(str(reports), "torch_distributor", RuntimeError("TorchDistributor failed"), job, 12.0)
    msg = str(info.value)
    assert f"torch_distributor rank 0 (pid {os.getpid()} on host {socket.gethostname()}, executor 3) died" in msg
    assert "rank 1: builtins.RuntimeError" in msg and "Connection closed by peer" in msg
    assert "Run r1 completed epoch 1 (epoch_1.pt): rerun with --set train.resume=auto" in msg


def test_a_rank_own_error_wins_over_the_consequential_ones(tmp_path):
    from orchestration.spark_training.launchers import _raise_worker_error, _write_record, _write_report
    from rec_models.training.loop import TrainJob

    reports = tmp_path / "r"
    reports.mkdir()
    for rank in (0, 1):
        _write_record(str(reports), rank, "horovod")
    _write_report(str(reports), 0, RuntimeError("Horovod has been shut down"))
    try:
        raise IndexError("index out of range in self")
    except IndexError as exc:
        _write_report(str(reports), 1, exc)
    job = TrainJob(kind="dssm", config={}, spec_json="{}", files={}, out_dir=str(tmp_path))
    with pytest.raises(IndexError, match="index out of range") as info:
        _raise_worker_error(str(reports), "horovod", RuntimeError("exit 1"), job, 3.0)
    assert "raised on horovod rank 1 (host" in " ".join(info.value.__notes__)
    assert "--- traceback on horovod rank 1 ---" in str(info.value.__cause__)


class _FakeSparkContext:
    """What the slot check reads of a SparkContext: master, conf, the JVM's slot count."""

    def __init__(self, master: str, slots: int, conf: dict | None = None):
        self.master, self._conf, self.asked = master, {"spark.task.cpus": "1", **(conf or {})}, 0
        fake = self

        class _JSC:
            def sc(self):
                return self

            def resourceProfileManager(self):
                return self

            def defaultResourceProfile(self):
                return "default"

            def maxNumConcurrentTasks(self, profile):
                fake.asked += 1
                return slots
        self._jsc = _JSC()

    def getConf(self):
        return self._conf


@pytest.mark.parametrize("backend", ["Horovod", "torch_distributor"])
def test_too_few_task_slots_on_a_cluster_fail_in_seconds(backend, monkeypatch):
    """A standalone master with one free slot for two ranks: a ConfigError naming the
    counts after the (here shortened) wait for executors, not a 600 s start timeout."""
    from orchestration.spark_training import launchers
    from rec_models.config import ConfigError, TrainConf

    monkeypatch.setattr(launchers, "SLOTS_WAIT_S", 1.5)
    sc = _FakeSparkContext("spark://127.0.0.1:7077", slots=1)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"train.num_processes=2 .*'spark://127.0.0.1:7077'.* runs at most 1"):
        launchers._check_task_slots(sc, TrainConf(num_processes=2), backend, "tasks")
    assert time.monotonic() - t0 < 5 and sc.asked >= 2          # it waited for executors, briefly
    launchers._check_task_slots(_FakeSparkContext("spark://h:7077", slots=2), TrainConf(num_processes=2),
                                backend, "tasks")
    dynamic = _FakeSparkContext("yarn", slots=0, conf={"spark.dynamicAllocation.enabled": "true"})
    launchers._check_task_slots(dynamic, TrainConf(num_processes=2), backend, "tasks")   # executors on demand
    assert dynamic.asked == 0


def test_paths_sent_to_executors_are_absolute(tmp_path, monkeypatch):
    from orchestration.spark_training.launchers import _absolute_paths
    from rec_models.training.loop import TrainJob

    monkeypatch.chdir(tmp_path)
    job = TrainJob(kind="pfd", config={}, spec_json="{}", out_dir="runs/x",
                   files={"train": ["wh/samples/a.parquet", "file:///wh/b.parquet", "s3://bucket/c.parquet"]},
                   teacher_checkpoint="t.pt", teachers={"cross_encoder": "dbfs:/ckpt/ce.pt"})
    got = _absolute_paths(job)
    assert got.out_dir == str(tmp_path / "runs" / "x") and got.teacher_checkpoint == str(tmp_path / "t.pt")
    assert got.files["train"] == [str(tmp_path / "wh/samples/a.parquet"), "file:///wh/b.parquet",
                                  "s3://bucket/c.parquet"]
    assert got.teachers == {"cross_encoder": "dbfs:/ckpt/ce.pt"}


# ---- on the cluster ------------------------------------------------------------------------

def _require(msg: str):
    if os.environ.get("DTT_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"DTT_REQUIRE_CLUSTER=1 but {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def master() -> str:
    """The cluster's URL (DTT_SPARK_MASTER), reachable, with its pid files and logs in
    DTT_CLUSTER_DIR (default .cluster/): the fault tests kill its workers by pid."""
    url = os.environ.get("DTT_SPARK_MASTER")
    if not url:
        _require("DTT_SPARK_MASTER is not set: start a cluster with scripts/spark_cluster.sh start and set "
                 "DTT_SPARK_MASTER=spark://127.0.0.1:7077 (or run .ci/lane_cluster.sh)")
    m = re.fullmatch(r"spark://([^:/]+):(\d+)", url)
    if not m:
        pytest.fail(f"DTT_SPARK_MASTER={url!r} is not a standalone master URL spark://HOST:PORT", pytrace=False)
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=5).close()
    except OSError as exc:
        _require(f"no Spark master answers at {url} ({exc}): scripts/spark_cluster.sh start")
    workers = sorted(CLUSTER_DIR.glob("worker-*.pid"))
    if len(workers) < 2:
        _require(f"{CLUSTER_DIR} has {len(workers)} worker pid files, need 2: the lane needs the cluster of "
                 "scripts/spark_cluster.sh (set DTT_CLUSTER_DIR if it runs elsewhere)")
    return url


def _env() -> dict:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "DTT_LOG_LEVEL": "INFO"}


def _command(master: str, job: str, sets: list[str], confs: list[Path], extra: tuple = ()) -> list[str]:
    return [str(SUBMIT), "--master", master, "--driver-memory", "1g", "--conf", "spark.executor.memory=1g",
            "--driver-java-options", f"-Dlog4j2.configurationFile={ROOT / 'conf' / 'log4j2.properties'}",
            str(ROOT / "jobs" / job), *[a for c in confs for a in ("--conf", str(c))],
            *[a for s in sets for a in ("--set", s)], *extra]


def _submit(workdir: Path, master: str, job: str, *sets: str, extra: tuple = (), confs: tuple = (),
            timeout: float = 420) -> tuple[int, dict, str, float]:
    """spark-submit ``job`` from ``workdir`` (the driver's cwd); (exit code, result, logs, seconds)."""
    out = workdir / f"result-{time.monotonic_ns()}.json"
    t0 = time.monotonic()
    done = subprocess.run(_command(master, job, [*SMALL, *sets], [workdir / "spark.yaml", *confs],
                                   (*extra, "--json-out", str(out))),
                          cwd=workdir, capture_output=True, text=True, timeout=timeout, env=_env())
    seconds = time.monotonic() - t0
    print(f"{job} {' '.join(sets)} on {master}: exit {done.returncode} in {seconds:.0f} s")
    (workdir / f"{out.stem}.log").write_text(done.stdout + done.stderr)   # for a failed lane's post-mortem
    result = json.loads(out.read_text()) if out.exists() else {}
    return done.returncode, result, done.stdout + done.stderr, seconds


def _workdir(tmp_path_factory, name: str) -> Path:
    path = tmp_path_factory.mktemp(name)
    (path / "spark.yaml").write_text(SPARK_YAML)
    return path


@pytest.fixture(scope="module")
def cluster_runs(master, tmp_path_factory):
    """The PFD pipeline on the cluster under TorchDistributor (ETL, training on the
    executors, export, embeddings) and under Horovod, and the local[2] reference runs of
    the same seed on the same feature tables (run.version td / hvd / local / hvd_local)."""
    work = _workdir(tmp_path_factory, "cluster")
    runs = {}
    code, runs["td"], logs, _ = _submit(work, master, "distill_pfd.py", "run.version=td",
                                        "train.backend=torch_distributor", "train.local_mode=false",
                                        "train.epochs=2")
    assert code == 0, logs[-5000:]
    runs["td_logs"] = logs
    code, runs["hvd"], logs, _ = _submit(work, master, "distill_pfd.py", "run.version=hvd",
                                         "train.backend=horovod", "train.epochs=2")
    assert code == 0, logs[-5000:]
    code, runs["local"], logs, _ = _submit(work, "local[2]", "distill_pfd.py", "run.version=local",
                                           "train.backend=torch_distributor", "train.local_mode=true",
                                           "train.epochs=2")
    assert code == 0, logs[-5000:]
    code, runs["hvd_local"], logs, _ = _submit(work, "local[2]", "distill_pfd.py", "run.version=hvd_local",
                                               "train.backend=horovod", "train.epochs=2")
    assert code == 0, logs[-5000:]
    return work, runs


def _executor_dirs() -> list[str]:
    return [str(p) + os.sep for p in sorted(CLUSTER_DIR.glob("worker-*/work"))]


def _assert_on_executors(result: dict, workdir: Path):
    """Two ranks, each on its own executor of the cluster, working in that executor's
    folder (not the driver's), as the ranks themselves recorded it."""
    assert result["world_size"] == 2, result
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1], ranks
    assert all(r["executor"] != "driver" for r in ranks), ranks
    assert len({r["executor"] for r in ranks}) == 2 and len({r["pid"] for r in ranks}) == 2, ranks
    for r in ranks:
        assert any(r["cwd"].startswith(d) for d in _executor_dirs()), (r, _executor_dirs())
        assert not r["cwd"].startswith(str(workdir)), r


def _assert_nothing_written_by_executors():
    """Relative paths resolved on the executors would have landed in their work dirs."""
    stray = [p for d in _executor_dirs() for p in glob.glob(os.path.join(d, "*", "*", "*"))
             if os.path.basename(p) in ("wh", "runs", "checkpoints", "metrics.json")]
    assert not stray, stray


@cluster
def test_pfd_pipeline_trains_on_the_executors_with_torch_distributor(cluster_runs):
    work, runs = cluster_runs
    td = runs["td"]
    _assert_on_executors(td, work)
    _assert_nothing_written_by_executors()
    assert td["backend"] == "torch_distributor"
    assert {"student", "teacher", "student_retrieval"} <= set(td["metrics"])
    assert 0.5 < td["metrics"]["student"]["auc"] <= 1.0
    assert "Started distributed training with 2 executor processes" in runs["td_logs"]


@cluster
def test_horovod_trains_on_the_executors(cluster_runs):
    work, runs = cluster_runs
    _assert_on_executors(runs["hvd"], work)
    assert runs["hvd"]["backend"] == "horovod"


def _history(work: Path, version: str) -> dict:
    return json.loads((work / "runs" / "pfd_student" / version / "pfd" / "metrics.json").read_text())


def _assert_same_model(work: Path, a: str, b: str, tol: float = TOL):
    import torch

    ha, hb = _history(work, a), _history(work, b)
    assert ha["steps"] == hb["steps"] and len(ha["history"]) == len(hb["history"])
    for ra, rb in zip(ha["history"], hb["history"]):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=tol), (k, a, b, ra, rb)
    for k in ha["test"]:
        assert ha["test"][k] == pytest.approx(hb["test"][k], abs=tol), (k, a, b)
    wa = torch.load(ha["checkpoint"], map_location="cpu", weights_only=True)["model"]
    wb = torch.load(hb["checkpoint"], map_location="cpu", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), rtol=0, atol=tol, err_msg=f"{k}: {a} vs {b}")


@cluster
def test_cluster_models_equal_the_local_run_of_the_same_seed(cluster_runs):
    """Each backend on the executors trains the model its local[2] run trains. (Horovod
    against TorchDistributor is tests/test_horovod.py's comparison.)"""
    work, runs = cluster_runs
    for local in ("local", "hvd_local"):
        assert runs[local]["world_size"] == 2
        assert {r["executor"] for r in runs[local]["ranks"]} == {"driver"}   # the references ran locally
    _assert_same_model(work, "td", "local")
    _assert_same_model(work, "hvd", "hvd_local")


def _embeddings(work: Path, side: str, version: str) -> dict[str, np.ndarray]:
    from etl import delta_io

    t = delta_io.read_arrow(str(work / "wh" / f"{side}_embeddings"), ["id", "vector", "run_id"],
                            [("model_name", "=", "pfd_student"), ("model_version", "=", version)])
    ids = t.column("id").to_pylist()
    assert len(ids) == len(set(ids)) > 0, f"{side} {version}: {len(ids)} rows, {len(set(ids))} ids"
    return {i: np.asarray(v, np.float32) for i, v in zip(ids, t.column("vector").to_pylist())}


def _assert_same_tables(work: Path, a: str, b: str, atol: float):
    for side in ("user", "item"):
        ea, eb = _embeddings(work, side, a), _embeddings(work, side, b)
        assert ea.keys() == eb.keys(), (side, a, b)
        for k in ea:
            np.testing.assert_allclose(ea[k], eb[k], rtol=0, atol=atol, err_msg=f"{side} {k}: {a} vs {b}")


@cluster
def test_embedding_tables_match_the_local_run(cluster_runs):
    work, _ = cluster_runs
    _assert_same_tables(work, "td", "local", atol=TOL)
    _assert_same_tables(work, "hvd", "hvd_local", atol=TOL)


@cluster
def test_evaluation_job_on_the_cluster(cluster_runs, master):
    """jobs/evaluate.py on the cluster: the TorchDistributor run's checkpoint and embedding
    tables, its metrics table rows and evaluation.json."""
    from etl import delta_io

    work, runs = cluster_runs
    code, result, logs, _ = _submit(work, master, "evaluate.py", "run.version=td", extra=("--method", "pfd"))
    assert code == 0, logs[-4000:]
    evaluation = work / "runs" / "pfd_student" / "td" / "evaluation.json"
    assert evaluation.exists()
    metrics = delta_io.read_arrow(str(work / "wh" / "metrics"), ["run_id", "metric", "value", "split"],
                                  [("model_name", "=", "pfd_student"), ("model_version", "=", "td")])
    test = [r for r in metrics.to_pylist() if r["split"] == "test"]
    assert test and {r["run_id"] for r in test} == {runs["td"]["run_id"]}
    assert {"auc", "recall"} <= {re.sub(r"@.*", "", r["metric"]) for r in test}, sorted({r["metric"] for r in test})


# ---- faults ------------------------------------------------------------------------------

def _poison_rank1(warehouse: Path) -> None:
    """Rewrite the training split of ``warehouse`` so that the rows rank 1 (of 2) reads hold
    user ids beyond the vocabulary (an ETL bug): rank 1 raises IndexError in its first
    forward pass, rank 0 (clean rows) waits for it in the allreduce. Row groups keep their
    sizes, so the loader deals the same rows to the same ranks."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from etl import delta_io
    from rec_models.loaders.arrow import ArrowBatchLoader
    from rec_models.spec import FeatureSpec

    spec = FeatureSpec.load(str(warehouse / "feature_spec.json"))
    files = delta_io.snapshot_files(str(warehouse / "samples"), [("split", "=", "train")],
                                    (spec.table_versions or {}).get("samples"))
    vocab = spec.get("user_id").vocab_size
    bad_units = ArrowBatchLoader(files, spec, ["user_id"], 64, rank=1, world_size=2, shuffle=False,
                                 drop_last=False)._assignment[1]
    for fi, path in enumerate(files):
        local = path.removeprefix("file://")
        pf = pq.ParquetFile(local)
        groups = [pf.read_row_group(rg) for rg in range(pf.metadata.num_row_groups)]
        pf.close()
        for u in (u for u in bad_units if u.file == fi):
            t = groups[u.row_group]
            stop = t.num_rows if u.stop is None else u.stop
            ids = t.column("user_id").to_numpy().copy()
            ids[u.start:stop] += vocab + 1000
            col = t.schema.get_field_index("user_id")
            groups[u.row_group] = t.set_column(col, t.schema.field(col), pa.array(ids, t.schema.field(col).type))
        with pq.ParquetWriter(local, groups[0].schema) as writer:
            for t in groups:
                writer.write_table(t, row_group_size=max(t.num_rows, 1))
    for rank in (0, 1):   # the premise: only rank 1 reads bad ids
        loader = ArrowBatchLoader(files, spec, ["user_id"], 64, rank=rank, world_size=2, shuffle=False,
                                  drop_last=False)
        ids = torch.cat([b["user_id"] for b in loader])
        assert bool((ids >= vocab).all()) if rank else bool((ids < vocab).all()), rank


@cluster
def test_a_rank_error_on_an_executor_reaches_the_driver_with_its_traceback(cluster_runs, master,
                                                                            tmp_path_factory):
    import shutil

    work, _ = cluster_runs
    bad = _workdir(tmp_path_factory, "rank_error")
    shutil.copytree(work / "wh", bad / "wh")
    _poison_rank1(bad / "wh")
    code, _, logs, seconds = _submit(bad, master, "train_teacher.py", "train.backend=torch_distributor",
                                     "train.local_mode=false", "train.epochs=1")
    print(f"rank error on an executor: job failed (exit {code}) {seconds:.0f} s after spark-submit started")
    assert code == 1, logs[-4000:]
    # rank 1's own exception, re-raised on the driver, with rank 1's traceback as its cause
    assert "--- traceback on torch_distributor rank 1 ---" in logs, logs[-4000:]
    assert re.search(r"IndexError: index out of range", logs), logs[-4000:]
    m = re.search(r"raised on torch_distributor rank 1 \(host [^,]+, executor (\S+)\)", logs)
    assert m and m.group(1) != "driver", logs[-4000:]
    assert "error: an internal error (a bug, not your input): IndexError" in logs
    assert seconds < 240


def _wait_for(predicate, timeout: float, what: str, proc=None, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the job exited (code {proc.returncode}) before {what}", pytrace=False)
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)


def _background(work: Path, master: str, job: str, sets: list[str], confs: list[Path], extra: tuple, log: Path):
    fh = open(log, "w")
    proc = subprocess.Popen(_command(master, job, [*SMALL, *sets], [work / "spark.yaml", *confs], extra),
                            cwd=work, stdout=fh, stderr=subprocess.STDOUT, env=_env())
    fh.close()
    return proc


@cluster
def test_a_killed_rank_fails_the_job_in_bounded_time_and_resume_finishes_it(cluster_runs, master):
    from rec_models.training.loop import load_checkpoint

    work, _ = cluster_runs
    epochs = 3
    sets = ["run.name=killed", "train.backend=torch_distributor", "train.local_mode=false",
            f"train.epochs={epochs}", "train.batch_size=16"]   # ~150 steps an epoch: time to kill mid-epoch
    folder = work / "runs" / "killed" / "v1" / "teachers" / "pfd_teacher"
    log = work / "killed.log"
    proc = _background(work, master, "train_teacher.py", sets, [], (), log)
    try:
        # generous: on a 2-core machine shared with other jobs, spark-submit to the first rank
        # took from 1.5 to over 5 minutes
        record = _wait_for(lambda: next(iter(folder.glob(".worker-reports-*/rank-0.json")), None), 600,
                           "rank 0 to start", proc)
        _wait_for(lambda: list(folder.glob("checkpoints/*/epoch_0.pt")), 600, "the first epoch's checkpoint", proc,
                  poll=0.05)
        rank0 = json.loads(record.read_text())
        assert rank0["executor"] != "driver", rank0
        os.kill(rank0["pid"], signal.SIGKILL)   # rank 0 writes the checkpoints: the harder case
        killed_at = time.monotonic()
        code = proc.wait(timeout=300)
        to_failure = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = log.read_text()
    print(f"killed rank 0 (pid {rank0['pid']}, executor {rank0['executor']}): the job exited {code} "
          f"{to_failure:.1f} s later")
    assert code == 1, logs[-4000:]
    assert f"torch_distributor rank 0 (pid {rank0['pid']} on host" in logs and "died without raising" in logs, \
        logs[-4000:]
    assert to_failure < 120
    state = json.loads((folder / "run_state.json").read_text())
    assert not state["finished"] and state["last_complete_epoch"] < epochs - 1, state
    assert "--set train.resume=auto to continue after it" in logs
    for path in folder.glob("checkpoints/*/epoch_*.pt"):   # no half-written checkpoint
        load_checkpoint(str(path))

    code, result, logs, _ = _submit(work, master, "train_teacher.py", *sets, "train.resume=auto")
    assert code == 0, logs[-4000:]
    assert result["run_id"] == state["run_id"] and result["world_size"] == 2
    _assert_on_executors(result, work)
    assert f"continues after epoch {state['last_complete_epoch']}" in logs
    history = json.loads((folder / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(epochs))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _active_write_stage(ui: str):
    """The name of the delta_io write stage (Spark tasks writing Parquet into the table)
    while it has running tasks, from the driver's REST API."""
    try:
        with urllib.request.urlopen(f"{ui}/api/v1/applications", timeout=2) as r:
            app = json.load(r)[0]["id"]
        with urllib.request.urlopen(f"{ui}/api/v1/applications/{app}/stages?status=active", timeout=2) as r:
            stages = json.load(r)
    except (OSError, ValueError, IndexError, KeyError):
        return None
    return next((s["name"] for s in stages if "delta_io.py" in s["name"] and s["name"].startswith("collect")
                 and s.get("numActiveTasks", 0) > 0), None)


def _kill_a_worker_when(proc, found, what: str) -> tuple[int, str, float]:
    """Once ``found()`` gives (stage, worker pid file), SIGKILL that worker's JVM; then wait
    for the job ``proc``: (its exit code, the stage, seconds from the kill to the exit).
    The cluster is started again whatever happened, for the tests after this one."""
    try:
        stage, pidfile = _wait_for(found, 600, what, proc, poll=0.05)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        killed_at = time.monotonic()
        code = proc.wait(timeout=300)
        return code, stage, time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run([str(CLUSTER_SCRIPT), "start"], check=True, env={**os.environ, "DTT_CLUSTER_DIR": str(CLUSTER_DIR)})


def _files_outside_the_log(table: Path, version: str) -> set[str]:
    from etl import delta_io

    folder = table / "model_name=pfd_student" / f"model_version={version}"
    on_disk = {str(p) for p in folder.glob("*.parquet")}
    logged = {p.removeprefix("file://") for p in delta_io.snapshot_files(
        str(table), [("model_name", "=", "pfd_student"), ("model_version", "=", version)])}
    return on_disk - logged


@cluster
def test_a_worker_lost_during_the_embedding_write_leaves_a_clean_table(cluster_runs, master):
    """Kill worker 2's JVM (its executor exits with it) while the embedding write's tasks
    run: Spark reruns them on the other executor and the table ends as a clean run's."""
    work, runs = cluster_runs
    port = _free_port()
    ui_conf = work / "ui.yaml"
    ui_conf.write_text(f"spark:\n  conf:\n    spark.ui.enabled: true\n    spark.ui.port: {port}\n")
    out, log = work / "lost.json", work / "lost.log"
    worker = CLUSTER_DIR / "worker-2.pid"
    worker_pid = int(worker.read_text())
    proc = _background(work, master, "write_embeddings.py", ["run.version=lost"], [ui_conf],
                       ("--bundle", runs["td"]["bundle"], "--json-out", str(out)), log)
    code, stage, to_end = _kill_a_worker_when(
        proc, lambda: (stage := _active_write_stage(f"http://127.0.0.1:{port}")) and (stage, worker),
        "the embedding write's tasks")
    print(f"killed worker-2 (pid {worker_pid}) during '{stage}': the job exited {code} {to_end:.1f} s later")
    logs = log.read_text()
    assert code == 0, logs[-4000:]
    assert re.search(r"Lost executor|ExecutorLostFailure|Executor lost", logs), logs[-4000:]
    result = json.loads(out.read_text())
    assert result["run_id"] == runs["td"]["run_id"]
    _assert_same_tables(work, "lost", "td", atol=0)
    for side in ("user", "item"):
        assert not _files_outside_the_log(work / "wh" / f"{side}_embeddings", "lost")


def _app_id(ui: str):
    try:
        with urllib.request.urlopen(f"{ui}/api/v1/applications", timeout=2) as r:
            return json.load(r)[0]["id"]
    except (OSError, ValueError, IndexError, KeyError):
        return None


def _write_task_on_a_worker(ui: str):
    """(stage name, worker pid file) while a delta_io write stage of the job has a task
    running on an executor of this cluster: the worker whose work dir holds that executor
    (``worker-<i>/work/<app>/<executor>``), from the driver's REST API."""
    app = _app_id(ui)
    if app is None:
        return None
    try:
        with urllib.request.urlopen(f"{ui}/api/v1/applications/{app}/stages?status=active", timeout=2) as r:
            stages = [s for s in json.load(r) if "delta_io.py" in s["name"] and s["name"].startswith("collect")
                      and s.get("numActiveTasks", 0) > 0]
        for s in stages:
            url = f"{ui}/api/v1/applications/{app}/stages/{s['stageId']}/{s['attemptId']}/taskList?length=200"
            with urllib.request.urlopen(url, timeout=2) as r:
                running = [t["executorId"] for t in json.load(r) if t.get("status") == "RUNNING"]
            for executor in running:
                for folder in CLUSTER_DIR.glob(f"worker-*/work/{app}/{executor}"):
                    return s["name"], CLUSTER_DIR / f"{folder.parents[2].name}.pid"
    except (OSError, ValueError, KeyError):
        return None
    return None


def _assert_same_feature_tables(clean: Path, built: Path):
    """The three feature tables of two builds hold the same rows (as multisets: sorted on
    every column; floats to float32 rounding), and the spec files agree; every table's data
    files are the ones its Delta log names."""
    import pyarrow.types as pat

    from etl import delta_io
    from rec_models.spec import FeatureSpec

    for table in ("user_features", "item_features", "samples"):
        frames = []
        for wh in (clean, built):
            t = delta_io.read_arrow(str(wh / table))
            floats = [f.name for f in t.schema if pat.is_floating(f.type)]
            df = t.to_pandas()
            for c in df.columns:
                if df[c].dtype == object and len(df) and not isinstance(df[c].iloc[0], str):
                    df[c] = df[c].map(tuple)   # list columns: sortable, comparable
            others = [c for c in df.columns if c not in floats]
            frames.append((df.sort_values(others + floats, kind="stable").reset_index(drop=True), others, floats))
        (a, others, floats), (b, _, _) = frames
        assert len(a) == len(b) > 0, (table, len(a), len(b))
        assert a[others].equals(b[others]), table
        for c in floats:
            np.testing.assert_allclose(b[c].to_numpy(), a[c].to_numpy(), rtol=1e-6, atol=1e-7, err_msg=f"{table}.{c}")
        on_disk = {str(p) for p in (built / table).rglob("*.parquet") if "_delta_log" not in p.parts}
        logged = {p.removeprefix("file://") for p in delta_io.snapshot_files(str(built / table))}
        assert on_disk == logged, (table, sorted(on_disk - logged), sorted(logged - on_disk))
    sa = json.loads(FeatureSpec.load(str(clean / "feature_spec.json")).to_json())
    sb = json.loads(FeatureSpec.load(str(built / "feature_spec.json")).to_json())
    _approx_tree(sb, sa)


def _approx_tree(got, want, path="spec") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            _approx_tree(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _approx_tree(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (path, got, want)
    else:
        assert got == want, (path, got, want)


@cluster
def test_a_worker_lost_during_the_feature_build_leaves_clean_tables(master, tmp_path_factory):
    """Kill the worker JVM (its executor exits with it) that runs one of the feature
    build's write tasks: Spark reruns the lost tasks, and what they need of the dead
    executor's cached rows and shuffle output, on the other executor; the tables equal a
    clean build's, with no data file their log does not name."""
    clean = _workdir(tmp_path_factory, "etl_clean")
    code, _, logs, seconds = _submit(clean, master, "build_features.py")
    assert code == 0, logs[-4000:]
    work = _workdir(tmp_path_factory, "etl_lost")
    port = _free_port()
    (work / "ui.yaml").write_text(f"spark:\n  conf:\n    spark.ui.enabled: true\n    spark.ui.port: {port}\n")
    # the scheduler's task attempts in the driver log (INFO): the retry shows as attempt .1
    log4j = work / "log4j2.properties"
    log4j.write_text((ROOT / "conf" / "log4j2.properties").read_text()
                     + "\nlogger.tsm.name = org.apache.spark.scheduler.TaskSetManager\nlogger.tsm.level = info\n")
    cmd = [a.replace(str(ROOT / "conf" / "log4j2.properties"), str(log4j))
           for a in _command(master, "build_features.py", SMALL, [work / "spark.yaml", work / "ui.yaml"],
                             ("--json-out", str(work / "lost.json")))]
    log = work / "lost.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=work, stdout=fh, stderr=subprocess.STDOUT, env=_env())
    code, stage, to_end = _kill_a_worker_when(proc, lambda: _write_task_on_a_worker(f"http://127.0.0.1:{port}"),
                                              "a write task of the feature build on an executor")
    print(f"killed a worker during '{stage}' of the feature build: the job exited {code} {to_end:.1f} s later "
          f"(the clean build took {seconds:.0f} s end to end)")
    logs = log.read_text()
    assert code == 0, logs[-4000:]
    assert re.search(r"Lost executor|ExecutorLostFailure|Executor lost", logs), logs[-4000:]
    # a task lost with the executor (Spark 4 logs it at INFO, not as "Lost task"), and a
    # later attempt of that stage's tasks (task attempt .1, or the stage's attempt .1)
    lost = set(re.findall(r"task \d+\.\d+ in stage (\d+)\.\d+ \(TID \d+\) failed because while it was being "
                          r"computed, its executor exited", logs))
    lost |= set(re.findall(r"Lost task \d+\.\d+ in stage (\d+)\.\d+ \(TID \d+\) \([^)]*\): ExecutorLostFailure", logs))
    assert lost, f"no task was lost with the executor:\n{logs[-4000:]}"
    retried = [s for s in lost if re.search(rf"Starting task \d+\.[1-9]\d* in stage {s}\.\d+ "
                                            rf"|Starting task \d+\.\d+ in stage {s}\.[1-9]\d* ", logs)]
    assert retried, f"no later attempt of stage(s) {sorted(lost)} that lost a task:\n{logs[-4000:]}"
    print(f"stage(s) {sorted(lost)} lost a task with the executor; Spark ran them again: {sorted(retried)}")
    assert json.loads((work / "lost.json").read_text())["job"] == "build_features"
    _assert_same_feature_tables(clean / "wh", work / "wh")

"""train.backend=horovod: Horovod on Spark, beside torch_distributor (DDP).

- the same seed and data give the same model under both (gradients are averaged the same
  way: summed over the ranks, divided by the world size);
- a checkpoint written under one backend loads under the other (and as a frozen teacher);
- a rank that raises fails the job promptly, with that rank's own error;
- clear errors when Horovod is not installed, when there is no SparkSession, or when the
  local master cannot run the processes at once.

Horovod is built by scripts/install_horovod.sh. Without it these tests skip, unless
DTT_REQUIRE_HOROVOD=1 (CI), where they fail.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from orchestration.spark_training.launchers import (WORKER_REPORTS_PREFIX, BackendUnavailableError, _local_task_slots,
                                                    check_backend_available, run_training)
from rec_models.config import TrainConf, load_config
from rec_models.training.loop import TrainJob

INSTALL = "scripts/install_horovod.sh (make horovod)"

# small enough that a distributed run is mostly start-up; 2 processes on local[2]
SMALL = [
    "data.source.synthetic.n_users=200", "data.source.synthetic.n_items=100",
    "data.source.synthetic.n_events=6000", "data.source.synthetic.partitions=2",
    "model.embedding_dim=8", "model.tower_dims=[32]", "model.output_dim=16", "model.teacher_dims=[32]",
    "train.batch_size=256", "train.num_processes=2", "train.log_every=1000",
]


@pytest.fixture(scope="session")
def horovod():
    """Horovod importable with its torch and Spark parts, else skip (or fail under
    DTT_REQUIRE_HOROVOD=1, so that CI cannot pass by skipping)."""
    try:
        import horovod.spark
        import horovod.torch  # noqa: F401
    except ImportError as exc:
        msg = f"horovod is not importable ({exc}): build and install it with {INSTALL}"
        if os.environ.get("DTT_REQUIRE_HOROVOD") == "1":
            pytest.fail(f"DTT_REQUIRE_HOROVOD=1 but {msg}", pytrace=False)
        pytest.skip(msg)
    return horovod


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _job(tmp_path, backend="horovod", **train) -> tuple[TrainJob, TrainConf]:
    cfg = load_config(overrides=[f"train.backend={backend}", *[f"train.{k}={v}" for k, v in train.items()]])
    job = TrainJob(kind="dssm", config=cfg.model_dump(mode="json"), spec_json="{}",
                   files={"train": [], "valid": [], "test": []}, out_dir=str(tmp_path / "out"))
    return job, cfg.train


# ---- configuration and environment errors (fast) -------------------------------------------

def test_config_accepts_the_horovod_backend():
    assert load_config(overrides=["train.backend=horovod"]).train.backend == "horovod"


def test_missing_horovod_is_an_error_naming_the_install_script(tmp_path, monkeypatch):
    from rec_models.training.distributed import HorovodCollective

    for mod in ("horovod", "horovod.spark", "horovod.torch"):
        monkeypatch.setitem(sys.modules, mod, None)      # import raises ImportError
    job, train = _job(tmp_path)
    with pytest.raises(BackendUnavailableError, match="scripts/install_horovod.sh"):
        check_backend_available(train)
    with pytest.raises(BackendUnavailableError, match="scripts/install_horovod.sh"):
        run_training(job, train)
    with pytest.raises(ImportError, match="scripts/install_horovod.sh"):   # in a worker
        HorovodCollective()
    check_backend_available(TrainConf(backend="torch_distributor"))       # others do not need it


def test_horovod_without_a_spark_session_is_a_clear_error(horovod, tmp_path, monkeypatch):
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    monkeypatch.setattr(SparkSession, "getActiveSession", classmethod(lambda cls: None))
    monkeypatch.setattr(SparkContext, "_active_spark_context", None)
    job, train = _job(tmp_path)
    with pytest.raises(BackendUnavailableError, match="no active SparkSession"):
        run_training(job, train)


def test_more_processes_than_the_local_master_runs_at_once_fails_fast(horovod, spark, tmp_path):
    job, train = _job(tmp_path, num_processes=3)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"train.num_processes=3 .* master 'local\[2\]' runs at most 2"):
        run_training(job, train)
    assert time.monotonic() - t0 < 10      # not horovod's 600 s start timeout


@pytest.mark.parametrize("master, task_cpus, slots", [
    ("local", 1, 1), ("local[2]", 1, 2), ("local[4, 3]", 2, 2), ("local[*]", 1, os.cpu_count()),
    ("local-cluster[2, 3, 1024]", 1, 6), ("yarn", 1, None), ("spark://host:7077", 1, None),
])
def test_local_task_slots(master, task_cpus, slots):
    assert _local_task_slots(master, task_cpus) == slots


def test_horovod_collective_in_one_process_trains_like_no_collective(horovod):
    """The wiring the loop relies on (broadcasts, DistributedOptimizer with named
    parameters, zero_grad/step) in a world of one, where averaging is the identity."""
    from rec_models.training.distributed import HorovodCollective, NoCollective

    def train(collective):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        model, opt = collective.distribute(model, opt, list(model.named_parameters()))
        x = torch.randn(32, 4)
        for _ in range(5):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        assert collective.broadcast_flag(True) and not collective.broadcast_flag(False)
        assert collective.broadcast_object({"a": [1, 2]}) == {"a": [1, 2]}
        return [p.detach().clone() for p in model.parameters()]

    hvd = HorovodCollective()
    try:
        assert (hvd.rank, hvd.world_size) == (0, 1)
        got = train(hvd)
    finally:
        hvd.close()
    for a, b in zip(got, train(NoCollective())):
        assert torch.equal(a, b)


# ---- two processes under each backend (slow) -----------------------------------------------

@pytest.fixture(scope="module")
def features(spark, tmp_path_factory):
    from orchestration import pipeline

    tmp = tmp_path_factory.mktemp("hvd")
    base = [f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}", *SMALL]
    cfg = load_config(overrides=base)
    spec = pipeline.ensure_features(spark, cfg)
    return tmp, base, spec, pipeline.training_files(cfg, spec)


def _train(features, backend: str, method: str, name: str, *overrides, teacher_checkpoint=None) -> dict:
    from orchestration import pipeline

    tmp, base, spec, _ = features
    cfg = load_config(method=method, overrides=[*base, f"train.backend={backend}", *overrides])
    t0 = time.monotonic()
    result = pipeline.train(cfg, spec, method, str(tmp / "runs" / name), "test",
                            teacher_checkpoint=teacher_checkpoint)
    print(f"{method} under {backend}: {time.monotonic() - t0:.1f} s, test {result['test']}")
    assert result["world_size"] == 2
    return result


def _assert_same_run(a: dict, b: dict, tol: float = 1e-6):
    assert a["steps"] == b["steps"] and len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"]):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=tol), (k, ra, rb)
    for k in a["test"]:
        assert a["test"][k] == pytest.approx(b["test"][k], abs=tol), (k, a["test"], b["test"])


def _test_predictions(checkpoint: str, files: list[str]) -> tuple[dict, object]:
    from rec_models.training.loop import load_trained, predict

    model, spec, cfg = load_trained(checkpoint)
    return predict(model, files, spec, cfg, torch.device("cpu"))[1], cfg


@pytest.fixture(scope="module")
def teachers(features, horovod):
    """The PFD teacher trained under each backend, 2 processes, 2 epochs."""
    return {backend: _train(features, backend, "pfd_teacher", f"teacher_{backend}", "train.epochs=2")
            for backend in ("torch_distributor", "horovod")}


@pytest.mark.slow
def test_horovod_matches_torch_distributor(teachers):
    """Same seed and data: the same loss history, validation and test metrics."""
    td, hv = teachers["torch_distributor"], teachers["horovod"]
    _assert_same_run(td, hv)
    assert abs(td["test"]["teacher_auc"] - hv["test"]["teacher_auc"]) < 1e-6
    assert td["test"]["teacher_auc"] > 0.55        # it learnt something
    assert td["history"][0]["train_loss"] != td["history"][1]["train_loss"]


@pytest.mark.slow
def test_checkpoints_load_across_backends(features, teachers):
    """Each backend's checkpoint is the unwrapped model's: it loads with load_trained to
    identical predictions, and serves as the frozen teacher of a PFD run under the other
    backend -- both runs then agree too."""
    _, _, _, files = features
    td_probs, td_cfg = _test_predictions(teachers["torch_distributor"]["checkpoint"], files["test"])
    hv_probs, hv_cfg = _test_predictions(teachers["horovod"]["checkpoint"], files["test"])
    assert (td_cfg.train.backend, hv_cfg.train.backend) == ("torch_distributor", "horovod")
    assert td_probs.keys() == hv_probs.keys() == {"teacher"}
    np.testing.assert_allclose(td_probs["teacher"], hv_probs["teacher"], rtol=0, atol=1e-6)
    state = torch.load(teachers["horovod"]["checkpoint"], map_location="cpu", weights_only=False)["model"]
    assert not any(k.startswith("module.") for k in state)

    # lr 3e-3: the synthetic default's PFD rate (1e-3, for up to 16 epochs) learns too little
    # in this one 9-step epoch for the recall check below
    over = ["train.epochs=1", "distill.warmup_steps=0", "train.lr=0.003"]
    student_hv = _train(features, "horovod", "pfd", "pfd_hvd_from_td_teacher", *over,
                        teacher_checkpoint=teachers["torch_distributor"]["checkpoint"])
    student_td = _train(features, "torch_distributor", "pfd", "pfd_td_from_hvd_teacher", *over,
                        teacher_checkpoint=teachers["horovod"]["checkpoint"])
    _assert_same_run(student_hv, student_td)
    # a retrieval student (student.objective=mixed) learnt something: its valid Recall@10
    # over the catalogue (about 100 items here) beats a random ranking's (10 / items)
    _, _, spec, _ = features
    recall = student_hv["history"][-1]["valid_student_recall@10"]
    assert recall > 1.5 * 10 / spec.get("item_id").vocab_size, recall


# ---- a failing rank ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rank1_bad_job(features, tmp_path_factory):
    """A training split whose row groups for rank 1 (of 2) hold user ids beyond the
    vocabulary (an ETL bug): rank 1 raises in its first forward pass, while rank 0, whose
    data is fine, waits for it in the gradient allreduce.

    Eight files of one equal row group each: the loader deals row groups largest first to
    the rank with the fewest rows, lowest rank on ties, so rank 1 gets the odd files.
    """
    from rec_models.loaders.arrow import ArrowBatchLoader

    _, base, spec, files = features
    tmp = tmp_path_factory.mktemp("bad")
    table = pq.read_table(files["train"])
    rows = table.num_rows // 8
    vocab = spec.get("user_id").vocab_size
    bad_ids = pc.add(table["user_id"], vocab + 1000).cast(table.schema.field("user_id").type)
    bad_table = table.set_column(table.schema.get_field_index("user_id"), table.schema.field("user_id"), bad_ids)
    train = []
    for i in range(8):
        part = (bad_table if i % 2 else table).slice(i * rows, rows)
        path = str(tmp / f"part-{i}.parquet")
        pq.write_table(part, path, row_group_size=rows)
        train.append(path)
    for rank in (0, 1):     # the premise: only rank 1 reads bad ids
        loader = ArrowBatchLoader(train, spec, ["user_id"], 64, rank=rank, world_size=2, shuffle=False,
                                  drop_last=False)
        ids = torch.cat([b["user_id"] for b in loader])
        assert bool((ids >= vocab).all()) if rank else bool((ids < vocab).all())

    def job(backend: str) -> tuple[TrainJob, TrainConf]:
        cfg = load_config(method="pfd_teacher", overrides=[*base, f"train.backend={backend}", "train.epochs=1"])
        return TrainJob(kind="pfd_teacher", config=cfg.model_dump(mode="json"), spec_json=spec.to_json(),
                        files={**files, "train": train}, out_dir=str(tmp / backend)), cfg.train
    return job


def _assert_fails_with_rank1_error(backend, job, train):
    t0 = time.monotonic()
    with pytest.raises(IndexError, match="index out of range") as info:
        run_training(job, train)
    elapsed = time.monotonic() - t0
    notes = " ".join(getattr(info.value, "__notes__", []))
    print(f"{backend}: failed after {elapsed:.1f} s with {info.value!r}; {notes}")
    assert f"{backend} rank 1" in notes
    cause = str(info.value.__cause__)     # rank 1's traceback, from the worker
    assert f"traceback on {backend} rank 1" in cause and "embedding" in cause.lower()
    assert not [p for p in os.listdir(job.out_dir) if p.startswith(WORKER_REPORTS_PREFIX)]


@pytest.mark.slow
@pytest.mark.timeout(240)
# horovod.spark.run's own thread re-raises Spark's "job group cancelled" after the failure
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_failing_rank_fails_the_horovod_job_promptly_with_its_error(horovod, rank1_bad_job):
    _assert_fails_with_rank1_error("horovod", *rank1_bad_job("horovod"))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_failing_rank_fails_the_torch_distributor_job_promptly_with_its_error(features, rank1_bad_job):
    _assert_fails_with_rank1_error("torch_distributor", *rank1_bad_job("torch_distributor"))


# ---- the job as a user runs it ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_spark_submit_distill_pfd_with_horovod(horovod, tmp_path):
    """spark-submit jobs/distill_pfd.py --set train.backend=horovod: every model of the job
    (PFD, then the baseline) trains in two Horovod processes, and the job finishes with
    its embeddings and metrics."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    submit = Path(sys.executable).parent / "spark-submit"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    out = tmp_path / "result.json"
    done = subprocess.run(
        [str(submit), "--master", "local[2]", str(root / "jobs" / "distill_pfd.py"),
         "--set", "train.backend=horovod", "--set", "train.epochs=1",
         "--set", f"warehouse.root={tmp_path / 'wh'}", "--set", f"run.output_dir={tmp_path / 'runs'}",
         *[a for o in SMALL for a in ("--set", o)], "--json-out", str(out)],
        cwd=root, capture_output=True, text=True, timeout=590, env=env)
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-4000:]
    result = json.loads(out.read_text())
    assert result["backend"] == "horovod"
    assert logs.count("Horovod on Spark: 2 processes") == 2        # PFD and the baseline
    assert {"student", "teacher", "baseline", "student_retrieval"} <= set(result["metrics"])
    assert 0.5 < result["metrics"]["student"]["auc"] <= 1.0
    assert {"user_embeddings", "item_embeddings"} <= set(result["tables"])

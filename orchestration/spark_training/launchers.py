"""Training backends behind one call: ``run_training(job, train_conf)``.

- ``local``: the loop in this process (one worker, no process group).
- ``torch_distributor``: Spark's TorchDistributor starts ``num_processes`` workers (on the
  driver with ``local_mode``, else as barrier tasks on the executors) and DDP joins them
  (gloo on CPU, NCCL on GPU). Its return value is rank 0's.
- ``horovod``: ``horovod.spark.run`` starts ``num_processes`` workers as Spark tasks of the
  active SparkSession; Horovod (Gloo controller; NCCL on GPUs when built with it) averages
  the gradients. Needs Horovod built for this torch: ``scripts/install_horovod.sh``.

Every backend runs the same loop (:func:`rec_models.training.loop.train_worker`); only the
collectives differ (:mod:`rec_models.training.distributed`). When a worker of a distributed backend
raises, the launcher only says that some process exited non-zero (and the other ranks die
with secondary errors, e.g. a closed connection in the gradient allreduce). So each worker
leaves a report of its exception, and the driver re-raises the first rank's own error,
with that rank's traceback as the cause.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

from rec_models.config import BACKENDS, ConfigError, TrainConf
from rec_models.training.distributed import HOROVOD_INSTALL_HINT
from rec_models.training.loop import TrainJob, train_worker

log = logging.getLogger(__name__)


class BackendUnavailableError(ConfigError):
    """``train.backend`` cannot run in this environment (says why and what to do)."""


class WorkerError(RuntimeError):
    """A training process failed with an exception that could not be re-raised as itself."""


class RemoteTraceback(Exception):
    """The traceback of a worker's exception, as text (the ``__cause__`` of the re-raise)."""

    def __str__(self) -> str:
        return self.args[0]


def run_training(job: TrainJob, train: TrainConf) -> dict:
    check_backend_available(train)
    if train.backend == "local":
        return train_worker(job)
    if train.backend == "torch_distributor":
        return _torch_distributor(job, train)
    if train.backend == "horovod":
        return _horovod(job, train)
    raise ValueError(f"unknown train.backend '{train.backend}'; known: {', '.join(BACKENDS)}")


def check_backend_available(train: TrainConf) -> None:
    """Fail before any ETL or training if ``train.backend`` cannot run here (cheap)."""
    if train.backend == "horovod":
        _import_horovod_spark()


def _import_horovod_spark():
    try:
        import horovod.spark
        import horovod.torch  # noqa: F401  (the workers need it; a build without torch fails here)
    except ImportError as exc:
        raise BackendUnavailableError(f"{HOROVOD_INSTALL_HINT} (import failed: {exc})") from None
    return horovod.spark


def _with_threads(job: TrainJob, threads: int) -> TrainJob:
    return dataclasses.replace(job, config={**job.config, "train": {**job.config["train"], "num_threads": threads}})


def _torch_distributor(job: TrainJob, train: TrainConf) -> dict:
    from pyspark.ml.torch.distributor import TorchDistributor

    # two processes on two cores: one torch thread each, or they fight for the cores
    if not train.num_threads and train.local_mode:
        job = _with_threads(job, 1)
    log.info("TorchDistributor: %d processes, local_mode=%s, use_gpu=%s",
             train.num_processes, train.local_mode, train.use_gpu)
    distributor = TorchDistributor(num_processes=train.num_processes, local_mode=train.local_mode,
                                   use_gpu=train.use_gpu)
    return _reporting_errors(job, "torch_distributor", lambda report_dir: distributor.run(
        _reporting_worker, job, report_dir))


def _horovod(job: TrainJob, train: TrainConf) -> dict:
    """``num_processes`` Horovod workers as Spark tasks; rank 0's result."""
    hvd_spark = _import_horovod_spark()
    spark = _active_spark()
    sc = spark.sparkContext
    task_cpus = int(sc.getConf().get("spark.task.cpus", "1"))
    slots = _local_task_slots(sc.master, task_cpus)
    if slots is not None and train.num_processes > slots:
        # horovod.spark.run would wait (start timeout, 600 s by default) for tasks that
        # can never be scheduled
        raise ConfigError(f"train.num_processes={train.num_processes} Horovod processes need as many concurrent "
                         f"Spark tasks, but master '{sc.master}' runs at most {slots} (spark.task.cpus="
                         f"{task_cpus}): lower train.num_processes or give the master more cores")
    # each process is one Spark task, which Spark budgets spark.task.cpus cores
    if not train.num_threads:
        job = _with_threads(job, task_cpus)
    log.info("Horovod on Spark: %d processes (gloo), master %s, use_gpu=%s",
             train.num_processes, sc.master, train.use_gpu)
    env = {k: os.environ[k] for k in ("DTT_LOG_LEVEL",) if k in os.environ}
    results = _reporting_errors(job, "horovod", lambda report_dir: hvd_spark.run(
        _reporting_worker, args=(job, report_dir), num_proc=train.num_processes, use_gloo=True,
        env=env or None, stdout=sys.stderr, stderr=sys.stderr, verbose=0))
    return results[0]


def _active_spark():
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if spark is None and SparkContext._active_spark_context is not None:
        spark = SparkSession(SparkContext._active_spark_context)
    if spark is None:
        raise BackendUnavailableError(
            "train.backend=horovod runs its processes as Spark tasks, but this process has no active "
            "SparkSession: start one first (the jobs do; in a script: etl.spark.get_spark()), or use "
            "train.backend=local or torch_distributor")
    return spark


def _local_task_slots(master: str, task_cpus: int) -> Optional[int]:
    """Concurrent tasks of a local master (``local``, ``local[N]``, ``local[*]``,
    ``local[N,F]``, ``local-cluster[W,C,M]``); None for a cluster manager."""
    if master == "local":
        cores = 1
    elif m := re.fullmatch(r"local\[(\*|\d+)(?:,\s*\d+)?\]", master):
        cores = (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1))
    elif m := re.fullmatch(r"local-cluster\[(\d+),\s*(\d+),\s*\d+\]", master):
        cores = int(m.group(1)) * int(m.group(2))
    else:
        return None
    return max(cores // max(task_cpus, 1), 0)


# ---- a failing worker fails the job with its own error ----------------------------------

def _reporting_worker(job: TrainJob, report_dir: str) -> dict:
    """:func:`train_worker` in a launched process; an exception leaves a report in
    ``report_dir`` (the job's output folder, which the driver reads anyway) and is re-raised,
    so that the process exits non-zero and the launcher stops the other ranks."""
    _configure_worker_logging()
    try:
        return train_worker(job)
    except BaseException as exc:
        _write_report(report_dir, exc)
        raise


def _worker_rank() -> str:
    return os.environ.get("HOROVOD_RANK") or os.environ.get("RANK") or "?"


def _configure_worker_logging() -> None:
    """A launched process starts with no logging handlers: rank-tagged lines to stderr."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("DTT_LOG_LEVEL", "INFO"), stream=sys.stderr,
                            format=f"%(asctime)s %(levelname)s rank {_worker_rank()} %(name)s: %(message)s")


def _write_report(report_dir: str, exc: BaseException) -> None:
    rank = _worker_rank()
    report = {"rank": rank, "time": time.time(), "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
              "message": str(exc), "traceback": "".join(traceback.format_exception(exc)),
              "consequential": _consequential(exc)}
    try:
        report["exception"] = pickle.dumps(exc)
        pickle.loads(report["exception"])
    except Exception:  # noqa: BLE001 -- an exception that does not round-trip goes as text
        report.pop("exception", None)
    try:
        fd, tmp = tempfile.mkstemp(dir=report_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(report, fh)
        os.replace(tmp, os.path.join(report_dir, f"rank-{rank}.pkl"))
    except OSError as err:  # the original exception matters more than its report
        print(f"rank {rank}: cannot write the error report to {report_dir}: {err}", file=sys.stderr)


def _consequential(exc: BaseException) -> bool:
    """Errors a rank gets because another rank died (a closed connection in a collective,
    Horovod shut down by a peer): not the cause to report when a peer has its own."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"HorovodInternalError", "HorovodShutdownError", "DistError", "DistBackendError",
                "DistNetworkError"}:
        return True
    text = str(exc)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer",
                                   "Horovod has been shut down", "Broken pipe"))


def _reporting_errors(job: TrainJob, backend: str, launch: Callable[[str], object]):
    """``launch(report_dir)``; if it fails and a worker left a report, raise that worker's
    exception instead of the launcher's."""
    os.makedirs(job.out_dir, exist_ok=True)
    report_dir = tempfile.mkdtemp(prefix=".worker-errors-", dir=job.out_dir)
    try:
        try:
            return launch(report_dir)
        except Exception as launcher_error:
            reports = _read_reports(report_dir)
            if not reports:
                raise   # no worker raised (killed, out of memory, start-up): the launcher's is all there is
            _raise_worker_error(reports, backend, launcher_error)
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)


def _read_reports(report_dir: str) -> list[dict]:
    out = []
    for name in sorted(os.listdir(report_dir)):
        if name.endswith(".pkl"):
            try:
                with open(os.path.join(report_dir, name), "rb") as fh:
                    out.append(pickle.load(fh))
            except (OSError, pickle.UnpicklingError, EOFError):
                continue
    return out


def _raise_worker_error(reports: list[dict], backend: str, launcher_error: BaseException):
    first = min(reports, key=lambda r: (r["consequential"], r["time"]))
    others = sorted(str(r["rank"]) for r in reports if r is not first)
    where = f"{backend} rank {first['rank']}" + (f" (ranks {', '.join(others)} failed after it)" if others else "")
    remote = RemoteTraceback(f"\n--- traceback on {backend} rank {first['rank']} ---\n{first['traceback']}")
    exc = pickle.loads(first["exception"]) if "exception" in first else None
    if exc is None:
        exc = WorkerError(f"{where} failed: {first['type']}: {first['message']}")
    elif hasattr(exc, "add_note"):
        exc.add_note(f"raised on {where}; the launcher said: {str(launcher_error).strip()[:500]}")
    raise exc from remote

"""Training backends behind one call: ``run_training(job, train_conf)``.

- ``local``: the loop in this process (one worker, no process group).
- ``torch_distributor``: Spark's TorchDistributor starts ``num_processes`` workers (on the
  driver with ``local_mode``, else as barrier tasks on the executors) and DDP joins them
  (gloo on CPU, NCCL on GPU). Its return value is rank 0's.
- ``horovod``: ``horovod.spark.run`` starts ``num_processes`` workers as Spark tasks of the
  active SparkSession; Horovod (Gloo controller; NCCL on GPUs when built with it) averages
  the gradients. Needs Horovod built for this torch: ``scripts/install_horovod.sh``.

Every backend runs the same loop (:func:`rec_models.training.loop.train_worker`); only the
collectives differ (:mod:`rec_models.training.distributed`).

On a cluster the ranks run on executors, on other hosts than the driver, so everything
the driver learns from them goes through the training's output folder, which every node
must see anyway (rank 0 writes the checkpoints there and the driver exports from them):
``<out_dir>/.worker-reports-<launch id>/``. Each rank writes ``rank-<r>.json`` when it
starts (host, executor, pid, working directory) and, when it raises, ``rank-<r>.error``
(its exception and traceback). The driver then

- adds ``ranks`` (each rank's own record) to the result and checks that ``num_processes``
  ranks ran in a world of that size: a silent fall-back to one process is an error;
- when the launcher fails (it only says that some process exited non-zero, and the other
  ranks die with secondary errors such as a closed connection in the allreduce),
  re-raises the first rank's own exception with that rank's traceback as the cause, or,
  for a rank that started and left no report (killed, out of memory, crashed), a
  :class:`WorkerLostError` naming it.

Spark does not retry a failed training: TorchDistributor's ranks are one barrier
*result* stage, which Spark aborts on the first failed task ("Could not recover from a
failed barrier ResultStage"), and ``horovod.spark.run`` fails on the first rank that
exits non-zero. The job fails; ``train.resume=auto`` continues from the last complete epoch.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
import uuid
from typing import Callable, Optional

from rec_models.config import BACKENDS, ConfigError, TrainConf
from rec_models.training.distributed import HOROVOD_INSTALL_HINT
from rec_models.training.loop import TrainJob, read_run_state, train_worker

log = logging.getLogger(__name__)

WORKER_REPORTS_PREFIX = ".worker-reports-"
# how long the driver waits for executors to register before it says the cluster has too
# few task slots for num_processes (Spark's own default for minRegisteredResources)
SLOTS_WAIT_S = float(os.environ.get("DTT_SLOTS_WAIT_S", "30"))


class BackendUnavailableError(ConfigError):
    """``train.backend`` cannot run in this environment (says why and what to do)."""


class WorkerError(RuntimeError):
    """A training process failed with an exception that could not be re-raised as itself,
    or the launch did not run the ranks it should have."""


class WorkerLostError(WorkerError):
    """A rank's process died without raising (killed, out of memory, crashed)."""


class RemoteTraceback(Exception):
    """The traceback of a worker's exception, as text (the ``__cause__`` of the re-raise)."""

    def __str__(self) -> str:
        return self.args[0]


def run_training(job: TrainJob, train: TrainConf) -> dict:
    """Train ``job`` under ``train.backend``; rank 0's result with ``ranks``: one record
    per rank, written by the rank itself (``rank``, ``host``, ``executor``, ``pid``, ``cwd``)."""
    check_backend_available(train)
    if train.backend == "local":
        result = train_worker(job)
        return {**result, "ranks": [_rank_record(0)]}
    job = _absolute_paths(job)
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


def _absolute_paths(job: TrainJob) -> TrainJob:
    """Every path the ranks open, absolute: on executors the working directory is the
    worker's (``work/<app>/<executor>/``), not the driver's, so a relative path would read
    or write there. URIs (``scheme://``, ``file:``) are left as they are."""
    def absolute(path: Optional[str]) -> Optional[str]:
        if not path or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", path):
            return path
        return os.path.abspath(path)

    return dataclasses.replace(
        job, out_dir=absolute(job.out_dir), teacher_checkpoint=absolute(job.teacher_checkpoint),
        teachers={k: absolute(v) for k, v in job.teachers.items()},
        files={split: [absolute(f) for f in files] for split, files in job.files.items()})


def _torch_distributor(job: TrainJob, train: TrainConf) -> dict:
    from pyspark.ml.torch.distributor import TorchDistributor

    if train.local_mode:
        # two processes on two cores: one torch thread each, or they fight for the cores
        threads = 1
    else:
        # barrier tasks on the executors: each rank is one Spark task, budgeted spark.task.cpus
        sc = _active_spark("torch_distributor with train.local_mode=false").sparkContext
        threads = _task_cpus(sc)
        _check_task_slots(sc, train, "torch_distributor", "barrier tasks")
    if not train.num_threads:
        job = _with_threads(job, threads)
    log.info("TorchDistributor: %d processes, local_mode=%s, use_gpu=%s",
             train.num_processes, train.local_mode, train.use_gpu)
    distributor = TorchDistributor(num_processes=train.num_processes, local_mode=train.local_mode,
                                   use_gpu=train.use_gpu)
    return _launch(job, train, "torch_distributor", lambda reports: distributor.run(
        _reporting_worker, job, reports, "torch_distributor"))


def _horovod(job: TrainJob, train: TrainConf) -> dict:
    """``num_processes`` Horovod workers as Spark tasks; rank 0's result."""
    hvd_spark = _import_horovod_spark()
    sc = _active_spark("train.backend=horovod").sparkContext
    task_cpus = _task_cpus(sc)
    _check_task_slots(sc, train, "Horovod", "Spark tasks")
    # each process is one Spark task, which Spark budgets spark.task.cpus cores
    if not train.num_threads:
        job = _with_threads(job, task_cpus)
    log.info("Horovod on Spark: %d processes (gloo), master %s, use_gpu=%s",
             train.num_processes, sc.master, train.use_gpu)
    env = {k: os.environ[k] for k in ("DTT_LOG_LEVEL",) if k in os.environ}

    def launch(reports: str) -> dict:
        results = hvd_spark.run(_reporting_worker, args=(job, reports, "horovod"), num_proc=train.num_processes,
                                use_gloo=True, env=env or None, stdout=sys.stderr, stderr=sys.stderr, verbose=0)
        return results[0]
    return _launch(job, train, "horovod", launch)


def _active_spark(what: str):
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if spark is None and SparkContext._active_spark_context is not None:
        spark = SparkSession(SparkContext._active_spark_context)
    if spark is None:
        raise BackendUnavailableError(
            f"{what} runs its processes as Spark tasks, but this process has no active "
            "SparkSession: start one first (the jobs do; in a script: etl.spark.get_spark()), or use "
            "train.backend=local, or torch_distributor with train.local_mode=true")
    return spark


def _task_cpus(sc) -> int:
    return int(sc.getConf().get("spark.task.cpus", "1"))


# ---- can the cluster run num_processes tasks at once? ------------------------------------

def _check_task_slots(sc, train: TrainConf, what: str, unit: str) -> None:
    """Fail in seconds when the master cannot run ``num_processes`` tasks at once: Horovod
    would wait for them until its start timeout (600 s), a barrier stage retry its slot
    check for 10 minutes (40 x 15 s) before it fails."""
    task_cpus = _task_cpus(sc)
    slots = _local_task_slots(sc.master, task_cpus)
    where = f"master '{sc.master}'"
    if slots is None:
        if sc.getConf().get("spark.dynamicAllocation.enabled", "false").lower() == "true":
            return   # executors come on demand: the count now says nothing
        slots = _cluster_task_slots(sc, train.num_processes)
        if slots is None:
            return   # this Spark does not say (e.g. Spark Connect): its own checks apply
        where = (f"the cluster at {where} (its registered executors' cores / spark.task.cpus, after "
                 f"waiting up to {SLOTS_WAIT_S:.0f} s for executors)")
    if train.num_processes > slots:
        raise ConfigError(f"train.num_processes={train.num_processes} {what} processes need as many concurrent "
                          f"{unit}, but {where} runs at most {slots} (spark.task.cpus={task_cpus}): lower "
                          "train.num_processes or give the application more cores (spark.cores.max, "
                          "spark.executor.instances, spark.executor.cores)")


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


def _cluster_task_slots(sc, wanted: int) -> Optional[int]:
    """Tasks the registered executors of a cluster master (standalone, YARN, Kubernetes)
    can run at once under the default resource profile (cores and custom resources such
    as GPUs, as Spark's barrier scheduling counts them). Executors register a few seconds
    after the application starts: wait up to ``SLOTS_WAIT_S`` for ``wanted``. None when
    the JVM cannot be asked."""
    try:
        jsc = sc._jsc.sc()
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        count = lambda: int(jsc.maxNumConcurrentTasks(profile))   # noqa: E731
        slots = count()
    except Exception as exc:   # noqa: BLE001 -- no JVM gateway (Spark Connect) or another API
        log.warning("cannot count the cluster's task slots (%s); relying on Spark's own checks", exc)
        return None
    deadline = time.monotonic() + SLOTS_WAIT_S
    while slots < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
        slots = count()
    return slots


# ---- the ranks report to the driver through the output folder ------------------------------

def _launch(job: TrainJob, train: TrainConf, backend: str, launch: Callable[[str], dict]) -> dict:
    """``launch(reports_dir)``: rank 0's result with every rank's record, checked against
    ``num_processes``; if it fails, the failing rank's own error (see the module doc)."""
    os.makedirs(job.out_dir, exist_ok=True)
    reports = os.path.join(job.out_dir, f"{WORKER_REPORTS_PREFIX}{uuid.uuid4().hex[:12]}")
    os.makedirs(reports)
    t0 = time.monotonic()
    try:
        try:
            result = launch(reports)
        except Exception as launcher_error:
            _raise_worker_error(reports, backend, launcher_error, job, time.monotonic() - t0)
            raise   # unreachable: _raise_worker_error always raises
        ranks = _read_records(reports)
        _check_world(ranks, result, train.num_processes, backend)
        return {**result, "ranks": ranks}
    finally:
        shutil.rmtree(reports, ignore_errors=True)


def _check_world(ranks: list[dict], result: dict, expected: int, backend: str) -> None:
    """The ranks that ran are the ranks asked for, in a world of that size (from the
    collective): anything else is a launch that silently ran fewer processes."""
    got = sorted(r["rank"] for r in ranks)
    if got != list(range(expected)) or result.get("world_size") != expected:
        raise WorkerError(f"{backend} was asked for train.num_processes={expected} ranks, but ranks {got} reported "
                          f"(world size {result.get('world_size')}): the training did not run distributed as "
                          "configured")


def _reporting_worker(job: TrainJob, reports: str, backend: str) -> dict:
    """:func:`train_worker` in a launched process. Records this rank in ``reports``
    first; an exception leaves its report there and is re-raised, so that the process
    exits non-zero and the launcher stops the other ranks."""
    _configure_worker_logging()
    rank = _worker_rank()
    try:
        _write_record(reports, rank, backend)
        return train_worker(job)
    except BaseException as exc:
        _write_report(reports, rank, exc)
        raise


def _worker_rank() -> int:
    rank = os.environ.get("HOROVOD_RANK") or os.environ.get("RANK")
    if rank is None:
        raise WorkerError("a launched training process has neither HOROVOD_RANK nor RANK in its environment")
    return int(rank)


def _rank_record(rank: int) -> dict:
    """Where this process runs, from its own environment."""
    return {"rank": rank, "host": socket.gethostname(), "executor": _executor_id(), "pid": os.getpid(),
            "cwd": os.getcwd()}


def _executor_id() -> str:
    """The Spark executor this process runs under: Kubernetes exports its id, a standalone
    worker names it in the executor's log URLs, YARN gives the container; a process
    without any of them runs on the driver (local master, or TorchDistributor's local_mode)."""
    if os.environ.get("SPARK_EXECUTOR_ID"):
        return os.environ["SPARK_EXECUTOR_ID"]
    m = re.search(r"[?&]executorId=([^&]+)", os.environ.get("SPARK_LOG_URL_STDERR", ""))
    if m:
        return m.group(1)
    if os.environ.get("CONTAINER_ID"):
        return os.environ["CONTAINER_ID"]
    return "driver"


def _write_record(reports: str, rank: int, backend: str) -> None:
    """``rank-<r>.json``, atomically: the driver reads it for the result, and a test (or an
    operator) finds the rank's pid there."""
    record = {**_rank_record(rank), "backend": backend, "started_at": time.time()}
    fd, tmp = tempfile.mkstemp(dir=reports, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, os.path.join(reports, f"rank-{rank}.json"))


def _read_records(reports: str) -> list[dict]:
    out = []
    for name in sorted(os.listdir(reports)):
        if re.fullmatch(r"rank-\d+\.json", name):
            try:
                with open(os.path.join(reports, name)) as fh:
                    out.append(json.load(fh))
            except (OSError, ValueError):
                continue
    return sorted(out, key=lambda r: r["rank"])


def _configure_worker_logging() -> None:
    """A launched process starts with no logging handlers: rank-tagged lines to stderr."""
    if not logging.getLogger().handlers:
        rank = os.environ.get("HOROVOD_RANK") or os.environ.get("RANK") or "?"
        logging.basicConfig(level=os.environ.get("DTT_LOG_LEVEL", "INFO"), stream=sys.stderr,
                            format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")


def _write_report(reports: str, rank: int, exc: BaseException) -> None:
    report = {"rank": rank, "time": time.time(), "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
              "message": str(exc), "traceback": "".join(traceback.format_exception(exc)),
              "consequential": _consequential(exc), "host": socket.gethostname(), "executor": _executor_id()}
    try:
        report["exception"] = pickle.dumps(exc)
        pickle.loads(report["exception"])
    except Exception:  # noqa: BLE001 -- an exception that does not round-trip goes as text
        report.pop("exception", None)
    try:
        fd, tmp = tempfile.mkstemp(dir=reports, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(report, fh)
        os.replace(tmp, os.path.join(reports, f"rank-{rank}.error"))
    except OSError as err:  # the original exception matters more than its report
        print(f"rank {rank}: cannot write the error report to {reports}: {err}", file=sys.stderr)


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


def _read_reports(reports: str) -> list[dict]:
    out = []
    for name in sorted(os.listdir(reports)):
        if name.endswith(".error"):
            try:
                with open(os.path.join(reports, name), "rb") as fh:
                    out.append(pickle.load(fh))
            except (OSError, pickle.UnpicklingError, EOFError):
                continue
    return out


def _raise_worker_error(reports: str, backend: str, launcher_error: BaseException, job: TrainJob,
                        elapsed: float):
    """Raise the failing rank's own error instead of the launcher's: a rank's own exception
    first; else a rank that started and left no report (it died without raising); else the
    first consequential one. Only the launcher's error when no rank reported anything."""
    errors, ranks = _read_reports(reports), _read_records(reports)
    launcher_said = " ".join(str(launcher_error).split())[:800]
    own = [r for r in errors if not r["consequential"]]
    lost = [r for r in ranks if r["rank"] not in {e["rank"] for e in errors}]
    if not own and lost:
        dead = lost[0]
        others = ", ".join(f"rank {e['rank']}: {e['type']}: {' '.join(e['message'].split())[:200]}" for e in errors)
        raise WorkerLostError(
            f"{backend} rank {dead['rank']} (pid {dead['pid']} on host {dead['host']}, executor {dead['executor']}) "
            f"died without raising an exception (killed, out of memory or crashed); the training failed "
            f"{elapsed:.0f} s after it started" + (f"; then {others}" if others else "")
            + f". {_resume_hint(job)} The launcher said: {launcher_said}") from launcher_error
    if not errors:
        if ranks:
            log.error("%s: ranks %s started and none reported an error", backend, [r["rank"] for r in ranks])
        raise launcher_error   # start-up failure: the launcher's error is all there is
    first = min(errors, key=lambda r: (r["consequential"], r["time"]))
    others = sorted(str(r["rank"]) for r in errors if r is not first)
    where = (f"{backend} rank {first['rank']} (host {first.get('host')}, executor {first.get('executor')})"
             + (f" (ranks {', '.join(others)} failed after it)" if others else ""))
    remote = RemoteTraceback(f"\n--- traceback on {backend} rank {first['rank']} ---\n{first['traceback']}")
    exc = pickle.loads(first["exception"]) if "exception" in first else None
    if exc is None:
        exc = WorkerError(f"{where} failed: {first['type']}: {first['message']}")
    elif hasattr(exc, "add_note"):
        exc.add_note(f"raised on {where}; the launcher said: {launcher_said[:500]}")
    raise exc from remote


def _resume_hint(job: TrainJob) -> str:
    state = read_run_state(job.out_dir)
    run_id = job.tags.get("run_id")
    if state and state.get("run_id") == run_id and state.get("last_complete_epoch") is not None \
            and not state.get("finished"):
        return (f"Run {run_id} completed epoch {state['last_complete_epoch']} ({state.get('checkpoint')}): rerun "
                "with --set train.resume=auto to continue after it.")
    return "No epoch of this run completed: a rerun starts from scratch."

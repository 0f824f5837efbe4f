"""What every job shares: arguments, configuration, logging, the one JSON result line,
and a non-zero exit with a clear message on failure. Also: the job's MLflow run
(``orchestration.tracking``), the catalog names of the tables it wrote
(``orchestration.catalog``), ``--dry-run`` (the plan, nothing run) and ``cli``, the one
console script (``dtt <job> [options]``) the Databricks bundle's wheel tasks call."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback
from typing import Callable

from rec_models.config import Config, UserError, is_uri, load_config

log = logging.getLogger("jobs")

# Exit codes: 0 success; 2 a user error (rec_models.config.UserError: a wrong key, value,
# file or input), one line naming it; 1 anything else, a bug, with its traceback.
EXIT_OK, EXIT_BUG, EXIT_USER = 0, 1, 2

def is_user_error(exc: BaseException) -> bool:
    """True for an error the user can act on (exit 2, one line), False for a bug (exit 1).
    Every layer raises ``rec_models.errors`` classes for those (ETL's InputError, the
    loader's LoaderError and the spec's PrivilegedLeakError among them)."""
    return isinstance(exc, UserError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="extra YAML layered over base/dataset/method/profile (repeatable)")
    p.add_argument("--dataset", help="conf/dataset/<name>.yaml")
    p.add_argument("--method", help="conf/method/<name>.yaml")
    p.add_argument("--profile", help="conf/profile/<name>.yaml (local, databricks)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one value, e.g. --set train.epochs=1 (repeatable)")
    p.add_argument("--json-out", help="also write the result JSON to this file")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the conf, resolve the inputs and outputs, print the plan; run nothing")
    return p


# What each job reads and writes (conf table keys, or run files): --dry-run's plan
FEATURES = ["user_features", "item_features", "samples"]
EMBEDDINGS = ["user_embeddings", "item_embeddings", "model_versions"]
JOB_IO = {
    "build_features": ([], FEATURES + ["feature_spec"]),
    "train_teacher": (FEATURES + ["feature_spec"], ["teacher_checkpoint"]),
    "distill": (FEATURES + ["feature_spec"], ["checkpoint", "student_bundle"] + EMBEDDINGS),
    "distill_pfd": (FEATURES + ["feature_spec"], ["checkpoint", "student_bundle"] + EMBEDDINGS),
    "write_embeddings": (FEATURES + ["feature_spec", "student_bundle"], EMBEDDINGS),
    "evaluate": (["samples", "feature_spec", "checkpoint"] + EMBEDDINGS, ["metrics", "evaluation"]),
}


def _job_name(body: Callable) -> str:
    module = getattr(body, "__module__", "") or ""
    if module.startswith("jobs."):
        return module.split(".", 1)[1]
    return os.path.splitext(os.path.basename(sys.argv[0] or "job"))[0]


def _exists(path: str) -> bool | str:
    """Whether a local table or file is there now; 'unknown' for a remote one (s3://,
    dbfs:, ...): a plan never waits on a store this machine may not reach."""
    from etl import delta_io

    if is_uri(path):
        return "unknown"
    return delta_io.table_exists(path) if os.path.isdir(path) else os.path.exists(path)


def plan(job: str, args: argparse.Namespace, cfg: Config) -> dict:
    """--dry-run: the conf is valid (loaded already), the method's params and tracking are
    checked, every input and output resolved to its path (and catalog name) with whether it
    exists now; nothing is read, trained or written, and no Spark session starts."""
    from orchestration import pipeline, tracking
    from rec_models.training.loop import teacher_config

    from rec_models.errors import InputNotFoundError

    missing = []
    if job == "train_teacher":
        method = getattr(args, "teacher", None) or "pfd_teacher"
        check_cfg = teacher_config(cfg, method)
    else:
        method = "pfd" if job == "distill_pfd" else cfg.distill.method
        check_cfg = cfg
    try:
        pipeline.validate_params(check_cfg, method)   # params first; given checkpoints last
    except InputNotFoundError as exc:   # an upstream task's output, not there before it runs
        missing.append(str(exc))
    tracked = tracking.check(cfg)
    run_files = {
        "feature_spec": cfg.warehouse.spec_path,
        "student_bundle": getattr(args, "bundle", None) or pipeline.run_dir(cfg, "student.pt"),
        "checkpoint": getattr(args, "checkpoint", None) or pipeline.run_dir(cfg, method, "checkpoints", "last.pt"),
        "teacher_checkpoint": pipeline.run_dir(cfg, "teachers", method, "checkpoints", "last.pt"),
        "evaluation": pipeline.run_dir(cfg, "evaluation.json"),
    }

    def resolve(key: str) -> dict:
        if key in run_files:
            return {"path": run_files[key], "exists": _exists(run_files[key])}
        uri = cfg.warehouse.uri(key)
        return {"uri": uri, "catalog_name": cfg.warehouse.table_name(key), "exists": _exists(uri)}

    reads, writes = JOB_IO.get(job, ([], []))
    teachers = {f"teacher:{name}": {"path": path, "exists": _exists(path)} for name, path in cfg.distill.teachers.items()}
    return {"job": job, "dry_run": True, "method": method, "profile": cfg.profile,
            "run": {"name": cfg.run.name, "version": cfg.run.version},
            "options": {k: v for k, v in vars(args).items() if k not in ("dry_run", "json_out")},
            "spark": {"master": cfg.spark.master, "delta": cfg.spark.delta, "writer": cfg.warehouse.writer},
            "train": {"backend": cfg.train.backend, "num_processes": cfg.train.num_processes,
                      "epochs": cfg.train.epochs, "use_gpu": cfg.train.use_gpu},
            "reads": {**{k: resolve(k) for k in reads}, **teachers}, "writes": {k: resolve(k) for k in writes},
            "missing_now": missing,
            "tracking": {"enabled": tracked, "uri": tracking.tracking_uri(cfg) if tracked else None,
                         "experiment": cfg.tracking.experiment,
                         "registered_model": tracking.registered_model_name(cfg) if cfg.tracking.register_model else None}}


def _after(job: str, cfg: Config, result: dict, tracker) -> None:
    """A finished job: its tables get their catalog names (where the session has native
    Delta), its result goes into its MLflow run (or the run of the model it served)."""
    from pyspark.sql import SparkSession

    from orchestration.catalog import register_tables

    spark = SparkSession.getActiveSession()
    tables = result.get("tables") or {}
    if "catalog" not in result and spark is not None:
        keys = [k for k in (tables if isinstance(tables, dict) else {})] + (["metrics"] if job == "evaluate" else [])
        names = register_tables(spark, cfg, keys, links=tracker.links())
        if names:
            result["catalog"] = names
    if tracker.run_id or isinstance(result.get("run_id"), str):
        tracker.log_result(result)
        result.setdefault("mlflow", {"run_id": tracker.run_id, **tracker.links()})
        result["mlflow"]["ui"] = _tracking().ui_command(cfg)
        # before the result line (stdout's last): where to look, for a person at the terminal
        print(f"MLflow run {tracker.run_id}; open it with: {result['mlflow']['ui']}", file=sys.stderr, flush=True)


def _tracking():
    from orchestration import tracking

    return tracking


def config_from(args: argparse.Namespace) -> Config:
    return load_config(dataset=args.dataset, method=args.method, profile=args.profile,
                       files=args.conf, overrides=args.overrides)


def run(description: str, body: Callable[[argparse.Namespace, Config], dict],
        extra_args: Callable[[argparse.ArgumentParser], None] | None = None, argv=None) -> int:
    """Parse, configure, run ``body``, print its result as one JSON line; return the exit code."""
    logging.basicConfig(level=os.environ.get("DTT_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # spark-submit merges the driver's stderr into stdout: keep the result JSON the last line
    logging.getLogger("py4j").setLevel(logging.WARNING)
    p = parser(description)
    if extra_args:
        extra_args(p)
    args = p.parse_args(argv)
    started = time.time()
    job = _job_name(body)
    try:
        cfg = config_from(args)
        if args.dry_run:
            result = plan(job, args, cfg)
        else:
            with _tracking().job_scope(cfg, job) as tracker:
                result = body(args, cfg)
                _after(job, cfg, result, tracker)
    except Exception as exc:   # noqa: BLE001 - sorted into user errors and bugs
        if is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER
        traceback.print_exc(file=sys.stderr)
        print(f"error: an internal error (a bug, not your input): {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BUG
    result["seconds"] = round(time.time() - started, 1)
    line = json.dumps(result, default=str)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(line + "\n")
    print(line)
    return EXIT_OK


def spark_for(cfg: Config):
    from etl.spark import get_spark

    return get_spark(cfg.spark)


def cli(argv=None) -> int:
    """``dtt <job> [options]``: the console script of the wheel (Databricks wheel tasks),
    the same jobs as ``spark-submit jobs/<job>.py [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in JOB_IO:
        print(f"usage: dtt <job> [options]; jobs: {', '.join(JOB_IO)}", file=sys.stderr)
        return EXIT_USER
    module = importlib.import_module(f"jobs.{argv[0]}")
    return run(module.__doc__, module.body, getattr(module, "options", None), argv=argv[1:])

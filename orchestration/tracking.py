"""MLflow tracking: one MLflow run per job, the student as a registered pyfunc model.

A job (``jobs/_common.run``) opens a scope with :func:`job_scope`; the pipeline logs into
it through :func:`current`: the resolved conf as params, each training's per-epoch
metrics (losses, validation AUC; step = epoch) and test metrics, the feature spec, the
job's result, the evaluation report. The MLflow run is tagged with the project's run id
(``dtt_run_id``), so later jobs of the same run (``jobs/evaluate.py``) log into it.
The student is logged as a pyfunc (``orchestration.student_pyfunc``) with a signature
(feature rows -> embeddings, ``params={"side": "user"|"item"}``) and registered under
``tracking.registered_model``; the embedding tables record the registered version.

Store: ``tracking.uri``, by default ``sqlite:///<run.output_dir>/mlflow.db`` with
artifacts in ``<run.output_dir>/mlartifacts`` (no server; ``mlflow ui
--backend-store-uri sqlite:///...`` shows it); on Databricks ``databricks`` and the
Unity Catalog registry (``databricks-uc``). Without mlflow installed (the petastorm lane)
``tracking.enabled: auto`` logs a warning once and tracks nothing; ``true`` refuses.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any, Iterator, Optional

from rec_models.config import Config, ConfigError
from rec_models import state_files

log = logging.getLogger(__name__)

RUN_TAG = "dtt_run_id"          # the project's run id (checkpoints, embedding tables)
PARAM_VALUE_CHARS = 6000         # MLflow's limit on a param value
_CURRENT: Optional["Tracker"] = None
_WARNED = False


def mlflow_available() -> bool:
    try:
        import mlflow  # noqa: F401
        return True
    except ImportError:
        return False


def check(cfg: Config) -> bool:
    """Whether this job tracks: ``tracking.enabled`` against what is installed. A job with
    ``tracking.enabled=true`` and no mlflow stops here, before any work."""
    global _WARNED
    setting = cfg.tracking.enabled
    if setting is False:
        return False
    if mlflow_available():
        return True
    if setting is True:
        raise ConfigError("tracking.enabled=true but mlflow is not installed: pip install '.[local]' (it pins "
                          "mlflow), or set tracking.enabled=false")
    if not _WARNED:
        log.warning("mlflow is not installed: this job is not tracked (tracking.enabled=auto)")
        _WARNED = True
    return False


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{os.path.join(os.path.abspath(cfg.run.output_dir), 'mlflow.db')}"


def ui_command(cfg: Config) -> str:
    """The command that opens this conf's runs in MLflow's UI."""
    uri = tracking_uri(cfg)
    if uri.startswith(("databricks", "http")):
        return f"open the experiment {cfg.tracking.experiment} in the workspace ({uri})"
    return f"mlflow ui --backend-store-uri {uri}"


def registered_model_name(cfg: Config) -> str:
    if cfg.tracking.registered_model:
        return cfg.tracking.registered_model
    if cfg.warehouse.catalog:   # Unity Catalog's registry takes three-part names
        return f"{cfg.warehouse.catalog}.{cfg.warehouse.schema_name}.{cfg.run.name}"
    return cfg.run.name


def _prepare_sqlite(uri: str) -> None:
    """A new SQLite store starts as a copy of an empty, migrated one cached per mlflow
    version: MLflow's own schema migration of a new database takes seconds, and every
    new run folder (each test's) would pay it. MLflow checks the copy's schema revision."""
    import mlflow

    path = uri[len("sqlite:///"):]
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cache = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "distill-two-tower",
                         "mlflow", mlflow.__version__, "empty.db")
    if not os.path.exists(cache):
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cache))
        try:
            store = SqlAlchemyStore(f"sqlite:///{tmp}/empty.db", os.path.join(tmp, "artifacts"))
            store.engine.dispose()
            os.replace(os.path.join(tmp, "empty.db"), cache)   # atomic: a concurrent job sees all or nothing
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    shutil.copyfile(cache, tmp)
    if not os.path.exists(path):
        os.replace(tmp, path)
    else:
        os.remove(tmp)


def flatten(raw: Any, prefix: str = "") -> dict[str, str]:
    """The conf as MLflow params: dotted keys, JSON values cut to MLflow's limit. The
    FeatureSpec is logged whole as an artifact instead."""
    out: dict[str, str] = {}
    if isinstance(raw, dict) and raw:
        for key, value in raw.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if name == "data.feature_spec":
                continue
            out.update(flatten(value, name))
    else:
        text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
        out[prefix] = text[:PARAM_VALUE_CHARS]
    return out


class NullTracker:
    """What the pipeline logs to when nothing is tracked."""
    run_id: Optional[str] = None

    def start(self, dtt_run_id: Optional[str] = None) -> None:
        return None

    def log_training(self, kind: str, result: dict, dtt_run_id: Optional[str] = None) -> None:
        return None

    def log_artifact(self, path: str, folder: Optional[str] = None) -> None:
        return None

    def log_student(self, bundle: str, cfg: Config, dtt_run_id: str) -> dict:
        return {}

    def log_result(self, result: dict) -> None:
        return None

    def links(self) -> dict[str, str]:
        return {}

    def recorded_links(self, dtt_run_id: str) -> dict[str, str]:
        return {}

    def end(self, status: str) -> None:
        return None


class Tracker(NullTracker):
    """One job's MLflow run, started on first use (so that a job that resumes a run, or
    evaluates one, logs into that run: found by its ``dtt_run_id`` tag)."""

    def __init__(self, cfg: Config, job: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.cfg, self.job, self.run_id = cfg, job, None
        self.uri = tracking_uri(cfg)
        self._prepared = False   # the store is made on first use: a job refused early writes nothing
        self.registry_uri = cfg.tracking.registry_uri or self.uri
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.registry_uri)
        self._client: Optional[MlflowClient] = None
        self.experiment_id: Optional[str] = None
        self.registered: dict = {}

    def _experiment(self) -> str:
        name = self.cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):   # beside the store, not in the working directory
            location = "file://" + os.path.join(os.path.abspath(self.cfg.run.output_dir), "mlartifacts")
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:   # created meanwhile by a concurrent job
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    @property
    def client(self):
        """The MLflow client, made (and a local SQLite store created) on first use, so a job
        that stops on a user error before logging anything leaves no store behind."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if not self._prepared and self.uri.startswith("sqlite:///"):
                _prepare_sqlite(self.uri)
            self._prepared = True
            self._client = MlflowClient(self.uri, self.registry_uri)
        return self._client

    def start(self, dtt_run_id: Optional[str] = None) -> None:
        if self.run_id is not None:
            return
        self.experiment_id = self._experiment()
        if dtt_run_id:
            found = self.client.search_runs([self.experiment_id], f"tags.{RUN_TAG} = '{dtt_run_id}'", max_results=1)
            if found:
                self.run_id = found[0].info.run_id
                self.client.set_tag(self.run_id, f"dtt.job.{self.job}", "ran")
                log.info("MLflow: logging into run %s (project run %s)", self.run_id, dtt_run_id)
                return
        tags = {"dtt.job": self.job, "dtt.model_name": self.cfg.run.name, "dtt.model_version": self.cfg.run.version,
                "dtt.dataset": self.cfg.data.name, "dtt.profile": self.cfg.profile, f"dtt.job.{self.job}": "ran"}
        if dtt_run_id:
            tags[RUN_TAG] = dtt_run_id
        run = self.client.create_run(self.experiment_id, run_name=f"{self.cfg.run.name}-{self.cfg.run.version}-{self.job}",
                                     tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(self.cfg.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):   # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        log.info("MLflow run %s (experiment %s, %s)", self.run_id, self.cfg.tracking.experiment, self.uri)

    def log_training(self, kind: str, result: dict, dtt_run_id: Optional[str] = None) -> None:
        """Per-epoch metrics (``<kind>.train_loss``, ``<kind>.valid_auc``, ...; step = epoch)
        and test metrics (``<kind>.test_<name>``) of one training."""
        from mlflow.entities import Metric

        self.start(dtt_run_id)
        now = int(time.time() * 1000)
        metrics = []
        for record in result.get("history", []):
            epoch = int(record.get("epoch", 0))
            metrics += [Metric(_metric_name(f"{kind}.{k}"), float(v), now, epoch) for k, v in record.items()
                        if k not in ("epoch", "steps") and _number(v)]
        metrics += [Metric(_metric_name(f"{kind}.test_{k}"), float(v), now, 0)
                    for k, v in result.get("test", {}).items() if _number(v)]
        for key in ("train_seconds", "samples_per_second"):
            if _number(result.get(key)):
                metrics.append(Metric(f"{kind}.{key}", float(result[key]), now, 0))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        if result.get("checkpoint"):
            self.client.set_tag(self.run_id, f"dtt.checkpoint.{kind}", result["checkpoint"])

    def log_artifact(self, path: str, folder: Optional[str] = None) -> None:
        self.start()
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, folder)
        elif os.path.exists(path):
            self.client.log_artifact(self.run_id, path, folder)
        elif state_files.is_uri(path):   # the spec beside remote tables: logged from a local copy
            if state_files.file_exists(path):
                with tempfile.TemporaryDirectory() as tmp:
                    local = os.path.join(tmp, os.path.basename(path.rstrip("/")))
                    with open(local, "wb") as fh:
                        fh.write(state_files.read_bytes(path))
                    self.client.log_artifact(self.run_id, local, folder)

    def log_student(self, bundle: str, cfg: Config, dtt_run_id: str) -> dict:
        """Log the exported student as a pyfunc with its signature and register it;
        returns the links the embedding tables record (MLflow run, model, version)."""
        import mlflow
        import pyarrow as pa
        import pyarrow.parquet as pq

        from orchestration.student_pyfunc import SIDES, StudentEmbeddings
        from rec_models.serving.export import load_student

        self.start(dtt_run_id)
        student, _, _ = load_student(bundle)
        fields = {}
        for side, (key, _, inputs) in SIDES.items():
            schema = _table_schema(cfg, f"{side}_features")
            for name in [key, *getattr(student, inputs)]:
                fields[name] = schema.field(name)
        with tempfile.TemporaryDirectory() as tmp:
            input_schema = os.path.join(tmp, "input_schema.parquet")
            pq.write_table(pa.schema(list(fields.values())).empty_table(), input_schema)
            register = cfg.tracking.register_model
            name = registered_model_name(cfg)
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pyfunc.log_model(
                    name="student", python_model=StudentEmbeddings(),
                    artifacts={"bundle": bundle, "input_schema": input_schema},
                    signature=_signature(fields), pip_requirements=_requirements(),
                    registered_model_name=name if register else None)
        links = {"mlflow_run_id": self.run_id, "mlflow_model_uri": info.model_uri,
                 "mlflow_experiment": cfg.tracking.experiment}
        if register and info.registered_model_version is not None:
            links.update({"registered_model": name, "registered_model_version": str(info.registered_model_version)})
            self.client.set_tag(self.run_id, "dtt.registered_model", f"{name}/{info.registered_model_version}")
        self.registered = links
        return links

    def log_result(self, result: dict) -> None:
        """The job's result line as an artifact; an evaluation's report and JSON too."""
        self.start(result.get("run_id") if isinstance(result.get("run_id"), str) else None)
        metrics = result.get("metrics") or {}
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        flat = [Metric(f"{self.job}.{k}", float(v), now, 0) for k, v in _numbers(metrics).items()]
        for i in range(0, len(flat), 1000):
            self.client.log_batch(self.run_id, metrics=flat[i:i + 1000])
        self.client.log_text(self.run_id, json.dumps(result, indent=2, default=str), f"results/{self.job}.json")
        report = result.get("report")
        if isinstance(report, dict) and report.get("markdown"):
            self.log_artifact(os.path.dirname(report["markdown"]), "evaluation/report")
        if isinstance(result.get("json"), str):
            self.log_artifact(result["json"], "evaluation")

    def links(self) -> dict[str, str]:
        return {"mlflow_run_id": self.run_id, **self.registered} if self.run_id else {}

    def recorded_links(self, dtt_run_id: str) -> dict[str, str]:
        """The links of the model that run ``dtt_run_id`` registered (a later job, e.g.
        jobs/write_embeddings.py, writing that model's tables): from its MLflow run's tags."""
        self.start(dtt_run_id)
        if not self.registered:
            tags = self.client.get_run(self.run_id).data.tags
            name, _, version = tags.get("dtt.registered_model", "").rpartition("/")
            if name and version:
                self.registered = {"registered_model": name, "registered_model_version": version,
                                   "mlflow_experiment": self.cfg.tracking.experiment}
        return self.links()

    def end(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def _metric_name(name: str) -> str:
    """MLflow allows letters, digits, '_', '-', '.', ' ', ':' and '/' in names: recall@10 -> recall_at_10."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name.replace("@", "_at_"))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _numbers(tree, prefix: str = "") -> dict[str, float]:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    elif _number(tree):
        out[prefix] = float(tree)
    return {_metric_name(k): v for k, v in out.items()}


def _table_schema(cfg: Config, table: str):
    """The Arrow schema of a feature table at the version the spec pins (the model's)."""
    from etl import delta_io
    from orchestration.artifacts import load_spec

    version = (load_spec(cfg).table_versions or {}).get(table)
    return delta_io.arrow_schema_of(cfg.warehouse.uri(table), version)


def _signature(fields: dict):
    """Input: every user and item tower column (optional: a call sends one side's), with
    the feature tables' types; output: the flattened vector, its shape, the id."""
    import pyarrow as pa
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    def mlflow_type(t):
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return Array(mlflow_type(t.value_type))
        if pa.types.is_int64(t):
            return "long"
        if pa.types.is_integer(t):
            return "integer"
        if pa.types.is_float32(t):
            return "float"
        if pa.types.is_floating(t):
            return "double"
        if pa.types.is_boolean(t):
            return "boolean"
        return "string"

    inputs = Schema([ColSpec(mlflow_type(f.type), name, required=False) for name, f in fields.items()])
    outputs = Schema([ColSpec("string", "id", required=False), ColSpec(Array("float"), "vector"),
                      ColSpec(Array("long"), "shape")])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("side", "string", "user")]))


def _requirements() -> list[str]:
    """What the model needs to load elsewhere: this project's wheel and its torch (pinned
    as installed; MLflow's own inference would import-trace the model, which is slow)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("distill-two-tower", "torch", "pyarrow", "pandas", "numpy"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    return reqs


@contextlib.contextmanager
def job_scope(cfg: Config, job: str) -> Iterator[NullTracker]:
    """The MLflow run of one job: everything the pipeline logs meanwhile goes into it. A
    nested scope (a job calling the pipeline, which opens its own) joins the outer one."""
    global _CURRENT
    if _CURRENT is not None:
        yield _CURRENT
        return
    tracker: NullTracker = Tracker(cfg, job) if check(cfg) else NullTracker()
    _CURRENT = tracker
    try:
        yield tracker
    except BaseException:
        _quiet_end(tracker, "FAILED")
        raise
    else:
        tracker.end("FINISHED")
    finally:
        _CURRENT = None


def _quiet_end(tracker: NullTracker, status: str) -> None:
    try:
        tracker.end(status)
    except Exception as exc:   # the job's own error matters more
        log.warning("could not mark the MLflow run %s: %s", status, exc)


def current() -> NullTracker:
    """The tracker of the job scope in force, or one that logs nothing."""
    return _CURRENT if _CURRENT is not None else NullTracker()

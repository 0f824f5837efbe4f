"""Where the pipeline's stages find each other's outputs: the feature tables and spec ETL
wrote (pinned to the table versions the spec was built with), the run folders, the tag
that names a model version. Shared by the pipeline, the evaluation and the Petastorm
converter, so that none of them imports another for these.

Runs are laid out by name and version, so that separately scheduled jobs find each
other's outputs: ``{run.output_dir}/{run.name}/{run.version}/{method,teachers,baseline}/``
and the exported ``student.pt``. A rerun of the same version replaces them. Inside a
training's folder, checkpoints live under the run id (``checkpoints/<run_id>/epoch_<n>.pt``,
``last.pt``); ``checkpoints/last.pt`` is the last finished run's model, and
``run_state.json`` names the run that trained there last and its last complete epoch.
A job's ``run.json`` (in its method's folder) names its run id and whether it finished:
under ``train.resume=auto`` a rerun takes over the id of an unfinished run and continues
from what that run completed. A training that finished records its result last, in
``checkpoints/<run_id>/result.json``: the rerun reads it back instead of training again
(a training that did not finish continues from its last complete epoch). The feature
tables are complete once their spec file is written (it is written last), and the
embeddings of a run once ``model_versions`` names that run.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Optional

from etl import delta_io
from rec_models.config import Config, ConfigError, BadInputError, InputNotFoundError
from rec_models.spec import FeatureSpec
from rec_models.state_files import file_exists, read_json_object, write_json_atomic

FEATURE_TABLES = ("user_features", "item_features", "samples")


@dataclass(frozen=True)
class ModelTag:
    """One model version in the embedding and metrics tables."""
    name: str
    version: str
    run_id: str


@dataclass(frozen=True)
class CommittedEmbeddings:
    """The ``model_versions`` row of one model version: the run whose vectors it serves and
    the versions of the user and item embedding tables that hold them. The embedding job
    commits it last, after both tables, so a reader that goes through it only ever sees a
    user/item pair of one run, even when a later write died between the two tables."""
    name: str
    version: str
    run_id: str
    user_table_version: int
    item_table_version: int
    score_kind: str


class EmbeddingsNotCommitted(InputNotFoundError):   # a FileNotFoundError, and a user error (exit 2)
    """No committed embedding pair for a model version (the message says what to run)."""


def committed_embeddings(cfg: Config, name: str, version: str) -> CommittedEmbeddings:
    """The committed embedding pair of model ``name`` version ``version``."""
    uri = cfg.warehouse.uri("model_versions")
    rows = []
    if delta_io.table_exists(uri):
        part = [("model_name", "=", name), ("model_version", "=", version)]
        rows = delta_io.read_arrow(uri, None, part).to_pylist()
    if not rows:
        raise EmbeddingsNotCommitted(
            f"no committed embeddings of model {name} version {version} in {uri}: run jobs/write_embeddings.py "
            f"(or jobs/distill.py) with --set run.name={name} --set run.version={version}; rows in the embedding "
            "tables without a model_versions row belong to a write that did not finish")
    if len(rows) > 1:
        raise RuntimeError(f"{uri} has {len(rows)} rows for model {name} version {version}; expected one")
    r = rows[0]
    return CommittedEmbeddings(name, version, r["run_id"], int(r["user_table_version"]),
                               int(r["item_table_version"]), r["score_kind"])


def read_committed_embeddings(cfg: Config, name: str, version: str, columns: list[str]):
    """(user rows, item rows, the pair's CommittedEmbeddings): both embedding tables of one
    model version as Arrow tables, each at the table version the pair was committed with.
    Refuses a pair whose rows name another run than the committed one."""
    pair = committed_embeddings(cfg, name, version)
    part = [("model_name", "=", name), ("model_version", "=", version)]
    cols = list(dict.fromkeys([*columns, "run_id"]))
    sides = {}
    for side, table_version in (("user", pair.user_table_version), ("item", pair.item_table_version)):
        uri = cfg.warehouse.uri(f"{side}_embeddings")
        t = delta_io.read_arrow(uri, cols, part, version=table_version)
        runs = set(t.column("run_id").to_pylist())
        if runs != {pair.run_id}:
            raise BadInputError(f"{uri} version {table_version} holds run(s) {sorted(runs)} for model {name} version "
                             f"{version}, but {cfg.warehouse.uri('model_versions')} commits run {pair.run_id}: "
                             "the user and item embeddings do not belong together; rerun jobs/write_embeddings.py")
        sides[side] = t.select(columns)
    return sides["user"], sides["item"], pair


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def run_dir(cfg: Config, *parts: str) -> str:
    # run.name and run.version are validated slugs (RunConf): the folder stays under output_dir
    return os.path.join(os.path.abspath(cfg.run.output_dir), cfg.run.name, cfg.run.version, *parts)


RUN_FILE = "run.json"


def start_run(cfg: Config, folder: str) -> str:
    """The run id of a job whose state lives in ``folder``: under ``train.resume=auto`` the
    id of the unfinished run recorded there (its trainings then continue from their last
    complete epoch), else a new one, recorded as started."""
    path = os.path.join(folder, RUN_FILE)
    if cfg.train.resume == "auto":
        state = read_json_object(path, "run file")
        if state and state.get("run_id") and not state.get("finished"):
            logging.getLogger(__name__).info("train.resume=auto: continuing the unfinished run %s (%s)",
                                             state["run_id"], path)
            return str(state["run_id"])
    run_id = new_run_id()
    write_json_atomic(path, {"run_id": run_id, "finished": False,
                             "started_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    return run_id


def finish_run(folder: str, run_id: str) -> None:
    """Record the run of ``folder`` as finished: a later ``train.resume=auto`` starts anew."""
    write_json_atomic(os.path.join(folder, RUN_FILE),
                      {"run_id": run_id, "finished": True, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat()})


TRAINING_RECORD = "result.json"


def training_record_path(out_dir: str, run_id: str) -> str:
    """Where run ``run_id`` records its finished training in ``out_dir``: beside its checkpoints."""
    return os.path.join(out_dir, "checkpoints", run_id, TRAINING_RECORD)


def record_training(out_dir: str, run_id: str, fingerprint: str, result: dict) -> None:
    """Record the finished training of run ``run_id`` in ``out_dir`` with its result, written
    last (after its checkpoints, metrics and tracking): a rerun of the run under
    ``train.resume=auto`` reads it back instead of training again."""
    write_json_atomic(training_record_path(out_dir, run_id),
                      {"run_id": run_id, "fingerprint": fingerprint, "result": result,
                       "finished_at": dt.datetime.now(dt.timezone.utc).isoformat()})


def recorded_training(out_dir: str, run_id: str, fingerprint: str) -> Optional[dict]:
    """The result of run ``run_id``'s finished training in ``out_dir``; None when there is no
    record, or it was trained with another conf, spec or teachers (``fingerprint``), or its
    checkpoint is gone: the training then runs (and continues from its last epoch)."""
    path = training_record_path(out_dir, run_id)
    log = logging.getLogger(__name__)
    record = read_json_object(path, "training record")
    if record is None:
        return None
    result = record.get("result")
    if not isinstance(result, dict) or record.get("run_id") != run_id:
        log.warning("ignoring the training record %s: not a result of run %s", path, run_id)
        return None
    if record.get("fingerprint") != fingerprint:
        log.info("train.resume=auto: the training recorded in %s had another conf, spec or teachers: "
                 "training again", path)
        return None
    if not os.path.isfile(str(result.get("checkpoint"))):
        log.warning("train.resume=auto: %s names the checkpoint %s, which is gone: training again", path,
                    result.get("checkpoint"))
        return None
    return result


def features_ready(cfg: Config) -> bool:
    return file_exists(cfg.warehouse.spec_path) and all(
        delta_io.table_exists(cfg.warehouse.uri(t)) for t in FEATURE_TABLES)


def load_spec(cfg: Config) -> FeatureSpec:
    """The spec ETL resolved; its features must be the ones this run's conf declares."""
    try:
        spec = FeatureSpec.load(cfg.warehouse.spec_path)
    except FileNotFoundError as exc:
        raise InputNotFoundError(str(exc)) from None
    except ValueError as exc:   # malformed JSON or a spec that does not validate
        raise BadInputError(f"cannot read the feature spec {cfg.warehouse.spec_path}: "
                             f"{' '.join(str(exc).split())[:500]}") from None
    declared = [f.name for f in cfg.spec.features]
    built = [f.name for f in spec.features]
    if declared != built:
        raise ConfigError(f"the feature tables at {cfg.warehouse.root} were built for features {built}, "
                         f"but the conf declares {declared}: rerun jobs/build_features.py")
    split = cfg.data.split.model_dump()
    if spec.split is not None and spec.split != split:
        raise ConfigError(f"the feature tables at {cfg.warehouse.root} were split with data.split={spec.split}, "
                         f"but the conf declares {split}: rerun jobs/build_features.py")
    return spec


def pinned_version(spec: FeatureSpec, table: str) -> Optional[int]:
    """The version of ``table`` the spec was built with (None: the latest)."""
    return (spec.table_versions or {}).get(table)


def training_files(cfg: Config, spec: FeatureSpec) -> dict[str, list[str]]:
    uri = cfg.warehouse.uri("samples")
    version = pinned_version(spec, "samples")
    try:
        files = {s: delta_io.snapshot_files(uri, [("split", "=", s)], version) for s in ("train", "valid", "test")}
    except FileNotFoundError as exc:   # no table, or the pinned version is gone
        raise InputNotFoundError(str(exc)) from None
    for split, paths in files.items():
        if not paths:
            raise BadInputError(f"the samples table at {uri} has no {split} rows: rerun jobs/build_features.py")
    # the catalogue: corpus negatives (student.objective=mixed) and the valid retrieval
    items_uri = cfg.warehouse.uri("item_features")
    try:
        files["items"] = delta_io.snapshot_files(items_uri, None, pinned_version(spec, "item_features"))
    except FileNotFoundError as exc:
        raise InputNotFoundError(str(exc)) from None
    if not files["items"]:
        raise BadInputError(f"the item feature table at {items_uri} has no rows: rerun jobs/build_features.py")
    return files

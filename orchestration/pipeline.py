"""The workflow the jobs chain, as library calls a notebook can make too.

    ensure_features -> train (teacher | pfd | student) -> export student -> write_embeddings
    -> retrieval_metrics (orchestration.evaluation; jobs/evaluate.py for the full evaluation)

Where the stages find each other's outputs (run folders, pinned feature tables):
``orchestration.artifacts``.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from etl import delta_io
from orchestration.artifacts import (FEATURE_TABLES, EmbeddingsNotCommitted, ModelTag, committed_embeddings,
                                     features_ready, finish_run, load_spec, new_run_id, pinned_version,
                                     record_training, recorded_training, run_dir, start_run, training_files)
from rec_models.config import BadInputError, Config, ConfigError, InputNotFoundError, parse_params
from rec_models.spec import FeatureSpec
from rec_models.state_files import write_json_atomic

log = logging.getLogger(__name__)
__all__ = ["FEATURE_TABLES", "ModelTag", "check_training_env", "ensure_features", "ensure_teachers",
           "export_student_of", "features_ready", "finish_run", "head_metrics", "load_spec", "new_run_id", "pinned_version",
           "retrieval_metrics", "run_dir", "run_method", "start_run", "train", "training_files", "validate_params", "write_embeddings",
           "check_embedding_inputs", "embeddings_committed"]


def ensure_features(spark, cfg: Config, rebuild: bool = False) -> FeatureSpec:
    """The resolved spec, building the feature tables first when they are missing."""
    if rebuild or not features_ready(cfg):
        from etl.build import build_features

        log.info("building feature tables under %s", cfg.warehouse.root)
        return build_features(spark, cfg).spec
    return load_spec(cfg)


def train(cfg: Config, spec: FeatureSpec, kind: str, out_dir: str, run_id: str,
          teacher_checkpoint: Optional[str] = None, teachers: Optional[dict[str, str]] = None) -> dict:
    """Train ``kind`` in ``out_dir`` as part of run ``run_id``; under ``train.resume=auto`` a
    training this run finished before (same conf, spec and teachers) is read back, not redone."""
    from rec_models.training.loop import TrainJob, run_fingerprint

    check_training_env(cfg)
    os.makedirs(out_dir, exist_ok=True)
    job = TrainJob(kind=kind, config=cfg.model_dump(mode="json"), spec_json=spec.to_json(),
                   files=training_files(cfg, spec), out_dir=out_dir, teacher_checkpoint=teacher_checkpoint,
                   teachers=dict(teachers or {}),
                   tags={"run_id": run_id, "name": cfg.run.name, "version": cfg.run.version})
    fingerprint = run_fingerprint(job)
    if cfg.train.resume == "auto":
        done = recorded_training(out_dir, run_id, fingerprint)
        if done is not None:
            log.info("train.resume=auto: %s of run %s finished before (%s): not trained again", kind, run_id,
                     done["checkpoint"])
            return done
    log.info("training %s with backend %s, loader %s", kind, cfg.train.backend, cfg.train.loader)
    result = _run_job(job, cfg, spec)
    if cfg.train.refit == "train_valid":
        result = refit_on_valid(job, cfg, spec, result)
    from orchestration import tracking

    tracking.current().log_training(kind, result, dtt_run_id=run_id)   # per-epoch and test metrics
    record_training(out_dir, run_id, fingerprint, result)   # last: the training is complete
    return result


def _run_job(job, cfg: Config, spec: FeatureSpec) -> dict:
    from orchestration.spark_training.launchers import run_training

    if cfg.train.loader == "petastorm":
        from orchestration.spark_training.petastorm_converter import petastorm_job

        with petastorm_job(job, cfg, spec) as converted:   # the converter's cache is deleted after
            return run_training(converted, cfg.train)
    return run_training(job, cfg.train)


def refit_on_valid(job, cfg: Config, spec: FeatureSpec, selection: dict) -> dict:
    """``train.refit=train_valid``: ``job``'s model trained again, from the same seed, on
    train + valid for the epochs ``selection`` chose on valid; that model is the result's
    checkpoint, test metrics and (for a student) the served embeddings.

    The result keeps the selection's per-epoch history, selected epoch and valid figures
    (what hyper-parameters are chosen on), and reports under ``refit`` the refit's epochs,
    seconds and the selection model's test metrics; ``train_seconds`` counts both."""
    from rec_models.training.loop import publish_checkpoint

    epochs = int(selection["selected_epoch"]) + 1
    refit_dir = os.path.join(job.out_dir, "refit")
    os.makedirs(refit_dir, exist_ok=True)
    log.info("train.refit=train_valid: %s again on train + valid for %d epochs (selected on valid)", job.kind, epochs)
    refit = _run_job(job.as_refit(epochs, refit_dir), cfg, spec)
    result = {**refit, "history": selection["history"], "selected_epoch": selection["selected_epoch"],
              "train_seconds": selection["train_seconds"] + refit["train_seconds"],
              "refit": {"epochs": epochs, "train_seconds": refit["train_seconds"], "history": refit["history"],
                        "selection_checkpoint": selection["checkpoint"], "selection_test": selection["test"]}}
    # checkpoints/last.pt and metrics.json of the training folder: the served model and its
    # selection history, where jobs/evaluate.py looks
    publish_checkpoint(refit["checkpoint"], os.path.join(job.out_dir, "checkpoints", "last.pt"))
    write_json_atomic(os.path.join(job.out_dir, "metrics.json"), result)
    return result


def check_training_env(cfg: Config) -> None:
    """Fail before any ETL or training if this environment cannot train with ``cfg`` (e.g.
    train.loader=petastorm beside pyspark 4): a job should not build tables first."""
    from orchestration.spark_training.launchers import check_backend_available
    from rec_models.loaders.factory import check_loader_available

    check_loader_available(cfg.train)
    check_backend_available(cfg.train)   # train.backend=horovod without Horovod installed


def validate_params(cfg: Config, method: str) -> None:
    """Check, before any ETL or training, what ``method`` will read from the conf that the
    config's schema leaves to the method: ``distill.params`` (with ``method``'s own params
    model, as its builder will), ``distill.teacher_params`` of every teacher, and the
    teacher checkpoints it is given. A :class:`ConfigError` naming the key, else nothing."""
    from rec_models.methods import METHODS, get_method

    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; known: {', '.join(sorted(METHODS))}")
    for name, raw in cfg.distill.teacher_params.items():
        if name not in METHODS:
            raise ConfigError(f"distill.teacher_params.{name}: unknown method '{name}'; "
                              f"known: {', '.join(sorted(METHODS))}")
        _check_params(name, raw, f"distill.teacher_params.{name}")
    _check_params(method, cfg.distill.params, "distill.params")
    for name in get_method(method).teachers:
        if name in cfg.distill.teachers and not os.path.isfile(cfg.distill.teachers[name]):
            raise InputNotFoundError(f"distill.teachers.{name}: no checkpoint at {cfg.distill.teachers[name]}")
    if method == "pfd" and cfg.distill.teacher_checkpoint and not os.path.isfile(cfg.distill.teacher_checkpoint):
        raise InputNotFoundError(f"distill.teacher_checkpoint: no checkpoint at {cfg.distill.teacher_checkpoint}")


def _check_params(method: str, raw, where: str) -> None:
    from rec_models.methods import get_method

    model = get_method(method).params_model()
    if model is None:
        if raw:
            raise ConfigError(f"{where}: method '{method}' takes no parameters, got {', '.join(map(str, raw))}")
        return
    try:
        parse_params(model, raw, method)
    except ConfigError as exc:   # parse_params names distill.params.<key>; say where they came from
        raise ConfigError(str(exc).replace("distill.params.", f"{where}.")) from None


def ensure_teachers(cfg: Config, spec: FeatureSpec, method: str, run_id: str) -> dict[str, str]:
    """Checkpoint of every frozen teacher ``method`` needs: given in distill.teachers, or
    trained now (with distill.teacher_params[name]) under the run's teachers/ folder."""
    from rec_models.methods import get_method
    from rec_models.training.loop import teacher_config

    validate_params(cfg, method)
    paths = {}
    for name in get_method(method).teachers:
        if name in cfg.distill.teachers:
            paths[name] = cfg.distill.teachers[name]
            if not os.path.exists(paths[name]):
                raise InputNotFoundError(f"distill.teachers.{name}: no checkpoint at {paths[name]}")
        else:
            result = train(teacher_config(cfg, name), spec, name, run_dir(cfg, "teachers", name), run_id)
            paths[name] = result["checkpoint"]
    return paths


def run_method(spark, cfg: Config, method: str) -> dict:
    """Features (if missing) -> teachers -> the method -> baseline -> student embeddings +
    metrics, tracked as one MLflow run (the job's, or its own when called from a notebook)."""
    from orchestration import tracking

    with tracking.job_scope(cfg, f"run_method.{method}"):
        return _run_method(spark, cfg, method)


def _run_method(spark, cfg: Config, method: str) -> dict:
    """Features (if missing) -> teachers -> the method -> baseline -> student embeddings + metrics."""
    from rec_models.methods import get_method

    validate_params(cfg, method)   # a typo in distill.params fails here, before any ETL
    check_training_env(cfg)
    spec = ensure_features(spark, cfg)
    warnings = method_warnings(spec, method)   # also in the result: a run that is not what it says
    # train.resume=auto: an unfinished run of this method keeps its id and continues
    tag = ModelTag(cfg.run.name, cfg.run.version, start_run(cfg, run_dir(cfg, method)))
    from orchestration import tracking

    tracker = tracking.current()
    tracker.start(tag.run_id)            # train.resume=auto: the unfinished run's MLflow run goes on
    tracker.log_artifact(cfg.warehouse.spec_path, "feature_spec")
    teachers = ensure_teachers(cfg, spec, method, tag.run_id)
    result = train(cfg, spec, method, run_dir(cfg, method), tag.run_id,
                   teacher_checkpoint=cfg.distill.teacher_checkpoint if method == "pfd" else None,
                   teachers=teachers)
    heads = sorted(k[:-len("_auc")] for k in result["test"] if k.endswith("_auc"))
    metrics = {head: head_metrics(result["test"], head) for head in heads}
    if cfg.distill.train_baseline and get_method(method).role == "distill":
        # each method's own undistilled student (DSSM for PFD/KD/ENDX, the token towers for
        # VIRT, DDE, ERNIE-Search, TRMD): like for like, only the teacher is missing
        undistilled = get_method(method).undistilled or "dssm"
        base = train(undistilled_config(cfg, method), spec, undistilled, run_dir(cfg, "baseline"), tag.run_id)
        metrics["baseline"] = {**head_metrics(base["test"], "student"), "method": undistilled}
        # the same towers and objective without a teacher: what distillation adds to retrieval
        from orchestration.evaluation import retrieval_of_checkpoint

        metrics["baseline_retrieval"] = retrieval_of_checkpoint(cfg, base["checkpoint"])
    out = {"run_id": tag.run_id, "method": method, "model": {"name": tag.name, "version": tag.version},
           "metrics": metrics, "tables": {t: cfg.warehouse.uri(t) for t in FEATURE_TABLES},
           "checkpoint": result["checkpoint"], "teachers": teachers,
           "train_seconds": result["train_seconds"], "selected_epoch": result["selected_epoch"],
           # the selected epoch's validation figures: what hyper-parameters are chosen on
           "valid": {k[len("valid_"):]: v for k, v in next(
               (h for h in result["history"] if h["epoch"] == result["selected_epoch"]), {}).items()
               if k.startswith("valid_")},
           "backend": cfg.train.backend,
           # from the ranks themselves: a run that silently trained in fewer processes shows here
           "world_size": result["world_size"], "ranks": result.get("ranks", [])}
    if "refit" in result:   # train.refit=train_valid: what was served, beside what selected it
        out["refit"] = {k: v for k, v in result["refit"].items() if k != "history"}
    out["warnings"] = warnings
    if "student" in heads:
        bundle = run_dir(cfg, "student.pt")
        if cfg.train.resume == "auto" and os.path.isfile(bundle) and embeddings_committed(cfg, tag):
            log.info("train.resume=auto: the embeddings of run %s are committed: not exported or written again",
                     tag.run_id)
            tracker.recorded_links(tag.run_id)   # the registered model, for the catalogue's table properties
            out["tables"].update({t: cfg.warehouse.uri(t)
                                  for t in ("user_embeddings", "item_embeddings", "model_versions")})
        else:
            bundle = export_student_of(result["checkpoint"], bundle, tag)
            links = tracker.log_student(bundle, cfg, tag.run_id)   # registered first: the tables record its version
            out["tables"].update(write_embeddings(spark, cfg, bundle, tag, links))
        out["bundle"] = bundle
        metrics["student_retrieval"] = retrieval_metrics(cfg, tag)
    if cfg.eval.baselines:   # most popular, ALS, BPR on the same split and metric code
        from orchestration.baselines import retrieval_baselines

        metrics["retrieval_baselines"] = retrieval_baselines(cfg)
    from orchestration.catalog import register_tables

    out["catalog"] = register_tables(spark, cfg, list(out["tables"]), links=tracker.links())
    if tracker.run_id:
        out["mlflow"] = {"run_id": tracker.run_id, **tracker.links(), "ui": tracking.ui_command(cfg)}
    finish_run(run_dir(cfg, method), tag.run_id)
    return out


def undistilled_config(cfg: Config, method: str) -> Config:
    """``cfg`` for ``method``'s undistilled student: its ``distill.params`` are the student's
    part of the method's params (a token method's layers, heads, pooling), none for DSSM;
    its ``train`` is ``distill.baseline_train`` over the method's."""
    from rec_models.methods import get_method

    model = get_method(method).params_model()
    params = parse_params(model, cfg.distill.params, method) if model is not None else None
    student = params.student_params() if hasattr(params, "student_params") else {}
    return cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"params": student}),
                                  "train": cfg.undistilled_train()})


def embeddings_committed(cfg: Config, tag: ModelTag) -> bool:
    """Whether ``model_versions`` commits run ``tag.run_id``'s embeddings for its model version."""
    try:
        return committed_embeddings(cfg, tag.name, tag.version).run_id == tag.run_id
    except EmbeddingsNotCommitted:
        return False


def export_student_of(checkpoint: str, path: str, tag: ModelTag) -> str:
    """Export the student towers of a trained model (PFD or student-only checkpoint)."""
    from rec_models.serving.export import export_student
    from rec_models.training.loop import load_trained

    model, spec, _ = load_trained(checkpoint)
    return export_student(model.student, spec, path, meta={"name": tag.name, "version": tag.version,
                                                           "run_id": tag.run_id, "checkpoint": checkpoint})


def check_embedding_inputs(cfg: Config, bundle_spec: FeatureSpec, student, bundle: str) -> None:
    """Everything the embedding job and its metrics read, checked before the first write:
    the warehouse's spec file, the feature tables, and that the bundle's towers read
    columns those tables have."""
    spec = load_spec(cfg)
    missing = [t for t in FEATURE_TABLES if not delta_io.table_exists(cfg.warehouse.uri(t))]
    if missing:
        raise InputNotFoundError(f"no Delta table {', '.join(cfg.warehouse.uri(t) for t in missing)}: "
                                 "run jobs/build_features.py first")
    built = {f.name for f in spec.features}
    for side in ("user", "item"):
        unknown = sorted(set(getattr(student, f"{side}_input_names")) - built)
        if unknown:
            raise BadInputError(f"the student in {bundle} reads {side} columns {unknown} that the feature tables at "
                             f"{cfg.warehouse.root} (spec {cfg.warehouse.spec_path}) do not have")


def write_embeddings(spark, cfg: Config, bundle: str, tag: ModelTag,
                     links: Optional[dict[str, str]] = None) -> dict[str, str]:
    from orchestration import tracking
    from orchestration.embeddings import write_embeddings as _write

    if links is None:   # a job of its own (jobs/write_embeddings.py): the links its training run recorded
        links = tracking.current().recorded_links(tag.run_id)
    return _write(spark, cfg, bundle, tag, links)


def retrieval_metrics(cfg: Config, tag: ModelTag) -> dict:
    """Recall@K, NDCG@K and coverage@K of the embedding tables against the test split's
    clicks, items seen in train/valid excluded: ``orchestration.evaluation``'s, the one implementation."""
    from orchestration.evaluation import retrieval_metrics as _retrieval

    return _retrieval(cfg, tag.name, tag.version)


def head_metrics(test: dict, head: str) -> dict:
    """One model head's test metrics, from ``train_worker``'s evaluation dict."""
    return {"auc": test[f"{head}_auc"], "logloss": test[f"{head}_logloss"], "rows": test["rows"]}


def method_warnings(spec: FeatureSpec, method: str) -> list[str]:
    """What makes a run weaker than its name says, logged and listed in the result.

    PFD without a privileged column still trains (a warning, not a refusal): its teacher
    then sees only the student's public features and is just a larger public ranker.
    """
    warnings = []
    if method == "pfd" and not spec.privileged_names:
        warnings.append("method pfd: the FeatureSpec has no privileged feature (role: privileged), so the "
                        "teacher sees only public features and is a larger public ranker, not a privileged "
                        "teacher; declare privileged features in data.feature_spec.features")
    for w in warnings:
        log.warning(w)
    return warnings

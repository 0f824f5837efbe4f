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

from orchestration.artifacts import (FEATURE_TABLES, ModelTag, features_ready, load_spec, new_run_id, pinned_version,
                                     run_dir, training_files)
from rec_models.config import Config
from rec_models.spec import FeatureSpec

log = logging.getLogger(__name__)
__all__ = ["FEATURE_TABLES", "ModelTag", "check_training_env", "ensure_features", "ensure_teachers",
           "export_student_of", "features_ready", "head_metrics", "load_spec", "new_run_id", "pinned_version",
           "retrieval_metrics", "run_dir", "run_method", "train", "training_files", "write_embeddings"]


def ensure_features(spark, cfg: Config, rebuild: bool = False) -> FeatureSpec:
    """The resolved spec, building the feature tables first when they are missing."""
    if rebuild or not features_ready(cfg):
        from etl.build import build_features

        log.info("building feature tables under %s", cfg.warehouse.root)
        return build_features(spark, cfg).spec
    return load_spec(cfg)


def train(cfg: Config, spec: FeatureSpec, kind: str, out_dir: str, run_id: str,
          teacher_checkpoint: Optional[str] = None, teachers: Optional[dict[str, str]] = None) -> dict:
    from orchestration.spark_training.launchers import run_training
    from rec_models.training.loop import TrainJob

    check_training_env(cfg)
    os.makedirs(out_dir, exist_ok=True)
    job = TrainJob(kind=kind, config=cfg.model_dump(mode="json"), spec_json=spec.to_json(),
                   files=training_files(cfg, spec), out_dir=out_dir, teacher_checkpoint=teacher_checkpoint,
                   teachers=dict(teachers or {}),
                   tags={"run_id": run_id, "name": cfg.run.name, "version": cfg.run.version})
    log.info("training %s with backend %s, loader %s", kind, cfg.train.backend, cfg.train.loader)
    if cfg.train.loader == "petastorm":
        from orchestration.spark_training.petastorm_converter import petastorm_job

        with petastorm_job(job, cfg, spec) as converted:   # the converter's cache is deleted after
            return run_training(converted, cfg.train)
    return run_training(job, cfg.train)


def check_training_env(cfg: Config) -> None:
    """Fail before any ETL or training if this environment cannot train with ``cfg`` (e.g.
    train.loader=petastorm beside pyspark 4): a job should not build tables first."""
    from orchestration.spark_training.launchers import check_backend_available
    from rec_models.loaders.factory import check_loader_available

    check_loader_available(cfg.train)
    check_backend_available(cfg.train)   # train.backend=horovod without Horovod installed


def ensure_teachers(cfg: Config, spec: FeatureSpec, method: str, run_id: str) -> dict[str, str]:
    """Checkpoint of every frozen teacher ``method`` needs: given in distill.teachers, or
    trained now (with distill.teacher_params[name]) under the run's teachers/ folder."""
    from rec_models.methods import get_method
    from rec_models.training.loop import teacher_config

    paths = {}
    for name in get_method(method).teachers:
        if name in cfg.distill.teachers:
            paths[name] = cfg.distill.teachers[name]
            if not os.path.exists(paths[name]):
                raise FileNotFoundError(f"distill.teachers.{name}: no checkpoint at {paths[name]}")
        else:
            result = train(teacher_config(cfg, name), spec, name, run_dir(cfg, "teachers", name), run_id)
            paths[name] = result["checkpoint"]
    return paths


def run_method(spark, cfg: Config, method: str) -> dict:
    """Features (if missing) -> teachers -> the method -> baseline -> student embeddings + metrics."""
    from rec_models.methods import get_method

    check_training_env(cfg)
    spec = ensure_features(spark, cfg)
    tag = ModelTag(cfg.run.name, cfg.run.version, new_run_id())
    teachers = ensure_teachers(cfg, spec, method, tag.run_id)
    result = train(cfg, spec, method, run_dir(cfg, method), tag.run_id,
                   teacher_checkpoint=cfg.distill.teacher_checkpoint if method == "pfd" else None,
                   teachers=teachers)
    heads = sorted(k[:-len("_auc")] for k in result["test"] if k.endswith("_auc"))
    metrics = {head: head_metrics(result["test"], head) for head in heads}
    if cfg.distill.train_baseline and get_method(method).role == "distill":
        base = train(cfg, spec, "dssm", run_dir(cfg, "baseline"), tag.run_id)
        metrics["baseline"] = head_metrics(base["test"], "student")
    out = {"run_id": tag.run_id, "method": method, "model": {"name": tag.name, "version": tag.version},
           "metrics": metrics, "tables": {t: cfg.warehouse.uri(t) for t in FEATURE_TABLES},
           "checkpoint": result["checkpoint"], "teachers": teachers,
           "train_seconds": result["train_seconds"], "backend": cfg.train.backend}
    if "student" in heads:
        bundle = export_student_of(result["checkpoint"], run_dir(cfg, "student.pt"), tag)
        out["tables"].update(write_embeddings(spark, cfg, bundle, tag))
        out["bundle"] = bundle
        metrics["student_retrieval"] = retrieval_metrics(cfg, tag)
    return out


def export_student_of(checkpoint: str, path: str, tag: ModelTag) -> str:
    """Export the student towers of a trained model (PFD or student-only checkpoint)."""
    from rec_models.serving.export import export_student
    from rec_models.training.loop import load_trained

    model, spec, _ = load_trained(checkpoint)
    return export_student(model.student, spec, path, meta={"name": tag.name, "version": tag.version,
                                                           "run_id": tag.run_id, "checkpoint": checkpoint})


def write_embeddings(spark, cfg: Config, bundle: str, tag: ModelTag) -> dict[str, str]:
    from orchestration.embeddings import write_embeddings as _write

    return _write(spark, cfg, bundle, tag)


def retrieval_metrics(cfg: Config, tag: ModelTag) -> dict:
    """Recall@K, NDCG@K and coverage@K of the embedding tables against the test split's
    clicks, items seen in train/valid excluded: ``orchestration.evaluation``'s, the one implementation."""
    from orchestration.evaluation import retrieval_metrics as _retrieval

    return _retrieval(cfg, tag.name, tag.version)


def head_metrics(test: dict, head: str) -> dict:
    """One model head's test metrics, from ``train_worker``'s evaluation dict."""
    return {"auc": test[f"{head}_auc"], "logloss": test[f"{head}_logloss"], "rows": test["rows"]}

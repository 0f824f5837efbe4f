"""Where the pipeline's stages find each other's outputs: the feature tables and spec ETL
wrote (pinned to the table versions the spec was built with), the run folders, the tag
that names a model version. Shared by the pipeline, the evaluation and the Petastorm
converter, so that none of them imports another for these.

Runs are laid out by name and version, so that separately scheduled jobs find each
other's outputs: ``{run.output_dir}/{run.name}/{run.version}/{method,teachers,baseline}/``
and the exported ``student.pt``. A rerun of the same version replaces them.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Optional

from etl import delta_io
from rec_models.config import Config
from rec_models.spec import FeatureSpec

FEATURE_TABLES = ("user_features", "item_features", "samples")


@dataclass(frozen=True)
class ModelTag:
    """One model version in the embedding and metrics tables."""
    name: str
    version: str
    run_id: str


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def run_dir(cfg: Config, *parts: str) -> str:
    return os.path.join(os.path.abspath(cfg.run.output_dir), cfg.run.name, cfg.run.version, *parts)


def features_ready(cfg: Config) -> bool:
    return os.path.exists(cfg.warehouse.spec_path) and all(
        delta_io.table_exists(cfg.warehouse.uri(t)) for t in FEATURE_TABLES)


def load_spec(cfg: Config) -> FeatureSpec:
    """The spec ETL resolved; its features must be the ones this run's conf declares."""
    spec = FeatureSpec.load(cfg.warehouse.spec_path)
    declared = [f.name for f in cfg.spec.features]
    built = [f.name for f in spec.features]
    if declared != built:
        raise ValueError(f"the feature tables at {cfg.warehouse.root} were built for features {built}, "
                         f"but the conf declares {declared}: rerun jobs/build_features.py")
    split = cfg.data.split.model_dump()
    if spec.split is not None and spec.split != split:
        raise ValueError(f"the feature tables at {cfg.warehouse.root} were split with data.split={spec.split}, "
                         f"but the conf declares {split}: rerun jobs/build_features.py")
    return spec


def pinned_version(spec: FeatureSpec, table: str) -> Optional[int]:
    """The version of ``table`` the spec was built with (None: the latest)."""
    return (spec.table_versions or {}).get(table)


def training_files(cfg: Config, spec: FeatureSpec) -> dict[str, list[str]]:
    uri = cfg.warehouse.uri("samples")
    version = pinned_version(spec, "samples")
    files = {s: delta_io.snapshot_files(uri, [("split", "=", s)], version) for s in ("train", "valid", "test")}
    for split, paths in files.items():
        if not paths:
            raise ValueError(f"the samples table at {uri} has no {split} rows: rerun jobs/build_features.py")
    return files

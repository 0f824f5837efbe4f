"""``warehouse.root`` and ``run.output_dir`` given as ``file:`` URIs (``file:/p``,
``file:///p``, ``file://localhost/p``) name the local folder ``p``: the tables, the spec
file and the run folders land there, wherever the driver runs, and nothing lands in a
folder called ``file:`` under the working directory."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jobs import distill
from rec_models.config import ConfigError, load_config


@pytest.mark.parametrize("form", ["file:{p}", "file://{p}", "file://localhost{p}"])
def test_a_file_uri_names_its_local_folder(tmp_path, monkeypatch, form):
    from orchestration.artifacts import run_dir

    monkeypatch.chdir(tmp_path)
    wh, runs = tmp_path / "a b" / "wh", tmp_path / "runs"
    root = form.format(p=str(wh).replace(" ", "%20"))     # a URI quotes its spaces
    cfg = load_config(overrides=[f"warehouse.root={root}", f"run.output_dir={form.format(p=runs)}",
                                 f"warehouse.tables.metrics={form.format(p=tmp_path / 'm')}"])
    assert cfg.warehouse.root == str(wh) and cfg.run.output_dir == str(runs)
    assert cfg.warehouse.uri("samples") == f"{wh}/samples"
    assert cfg.warehouse.uri("metrics") == str(tmp_path / "m")      # a table of its own, where it says
    assert cfg.warehouse.spec_path == f"{wh}/feature_spec.json"
    assert run_dir(cfg, "pfd") == str(runs / "pfd_student" / "v1" / "pfd")


@pytest.mark.parametrize("key, value, fragment", [
    ("warehouse.root", "file:wh", "not an absolute local file URI"),
    ("run.output_dir", "file://otherhost/runs", "not an absolute local file URI"),
    ("warehouse.root", "file:///wh?x=1", "not an absolute local file URI"),
    ("warehouse.tables.samples", "file:samples", "not an absolute local file URI"),
])
def test_a_file_uri_that_names_no_local_folder_is_refused(key, value, fragment):
    with pytest.raises(ConfigError, match=rf"{key}.*{fragment}"):
        load_config(overrides=[f"{key}={value}"])


@pytest.mark.slow
def test_the_pipeline_with_file_uris(spark, tmp_path, monkeypatch):
    """jobs/distill.py end to end with both roots as file: URIs, run from another folder."""
    from tests.test_faults_jobs import _run

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data = tmp_path / "data"
    code, out, err = _run(distill, cwd, "train.epochs=1", "eval.baselines=false", "tracking.enabled=false",
                          f"warehouse.root=file://{data}/wh", f"run.output_dir=file:{data}/runs")
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert sorted(os.listdir(cwd)) == [], os.listdir(cwd)       # no file: folder, no wh/ or runs/ here
    assert (data / "wh" / "feature_spec.json").is_file()
    for table in ("user_features", "item_features", "samples", "user_embeddings", "item_embeddings",
                  "model_versions"):
        assert (data / "wh" / table / "_delta_log").is_dir(), table
        assert result["tables"][table] == f"{data}/wh/{table}"
    assert result["checkpoint"].startswith(f"{data}/runs/pfd_student/v1/pfd/")
    assert Path(result["bundle"]) == data / "runs" / "pfd_student" / "v1" / "student.pt"
    assert result["metrics"]["student_retrieval"] and result["metrics"]["student"]["auc"] > 0

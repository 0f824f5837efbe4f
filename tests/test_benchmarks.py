"""The benchmark scripts still run against the library (they are not imported by anything
else, so an API change can break them silently): a tiny run of each, checking what they
report, never how fast."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_bench_training_runs_every_model_kind(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--quick", "--skip-distributor",
         "--rows", "4000", "--eval-rows", "1000", "--batch-sizes", "512", "--threads", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    trained = {(r["kind"], r["backend"]) for r in results if r["kind"] != "-"}
    assert trained == {("dssm", "local"), ("pfd", "local")}
    assert all(r["samples_per_second"] > 0 and r["steps"] > 0 for r in results if r["kind"] != "-")


# ---- benchmarks/compare_methods.py: the statistics of its tables ------------------------
def _rows():
    # seed 3's dssm row lacks recall@50: the summary must still count every seed
    rows = []
    for seed, (base, pfd, kd) in {1: (0.20, 0.23, 0.21), 2: (0.22, 0.24, 0.21), 3: (None, 0.25, 0.22)}.items():
        rows.append({"method": "dssm", "role": "baseline", "seed": seed, "train_seconds": 1.0,
                     "student_auc": 0.60 + seed / 100, **({"recall@50": base} if base is not None else {})})
        rows.append({"method": "pfd", "role": "distill", "seed": seed, "train_seconds": 2.0, "recall@50": pfd,
                     "student_auc": 0.62 + seed / 100, "teacher_auc": 0.80})
        rows.append({"method": "kd", "role": "distill", "seed": seed, "train_seconds": 2.0, "recall@50": kd,
                     "extra_only_in_seed_2": 1.0} if seed == 2 else
                    {"method": "kd", "role": "distill", "seed": seed, "train_seconds": 2.0, "recall@50": kd})
    return rows


def test_summary_keeps_every_seed_and_every_column():
    from benchmarks.compare_methods import summarise

    summary = {r["method"]: r for r in summarise(_rows(), ["dssm", "pfd", "kd", "absent"])}
    assert set(summary) == {"dssm", "pfd", "kd"}
    assert summary["dssm"]["seeds"] == 3 and summary["dssm"]["recall@50_n"] == 2
    assert summary["dssm"]["recall@50"] == pytest.approx(0.21)
    assert summary["kd"]["extra_only_in_seed_2"] == 1.0 and summary["kd"]["extra_only_in_seed_2_n"] == 1


def test_paired_tests_pair_each_method_with_its_undistilled_student():
    from scipy.stats import ttest_rel

    from benchmarks.compare_methods import paired_tests

    tests = {(t["method"], t["metric"]): t for t in paired_tests(_rows(), ("recall@50", "student_auc"))}
    pfd = tests[("pfd", "recall@50")]
    assert pfd["undistilled"] == "dssm" and pfd["seeds"] == 2   # seed 3 has no dssm recall@50
    assert pfd["gain"] == pytest.approx(((0.23 - 0.20) + (0.24 - 0.22)) / 2)
    assert pfd["p_value"] == pytest.approx(ttest_rel([0.23, 0.24], [0.20, 0.22]).pvalue)
    assert pfd["wins"] == 2
    auc = tests[("pfd", "student_auc")]
    assert auc["seeds"] == 3 and auc["gap_closed"] == pytest.approx(0.02 / (0.80 - 0.62))
    assert ("dssm", "recall@50") not in tests   # a baseline is not paired with anything


def test_set_for_reaches_only_its_method(monkeypatch):
    from benchmarks import compare_methods
    from orchestration import pipeline

    seen = {}

    def run_method(spark, cfg, method):
        seen[method] = cfg.student.temperature
        return {"metrics": {"student": {}}, "train_seconds": 0.0, "selected_epoch": 0, "valid": {}}

    monkeypatch.setattr(pipeline, "load_spec", lambda cfg: None)
    monkeypatch.setattr(pipeline, "run_method", run_method)
    rows, _ = compare_methods.run_seed(None, "synthetic", ["dssm", "pfd"], ["eval.baselines=false"],
                                       per_method={"pfd": ["student.temperature=0.01"]})
    assert seen == {"dssm": 0.02, "pfd": 0.01} and [r["method"] for r in rows] == ["dssm", "pfd"]


@pytest.mark.parametrize("item", ["youtube_dnn:train.epochs=2", "pfd", "pfd:train.epochs"])
def test_bad_set_for_stops_before_any_work(item, capsys):
    from benchmarks import compare_methods

    assert compare_methods.main(["--methods", "dssm,pfd", "--set-for", item]) == 2
    assert item in capsys.readouterr().err


def test_set_for_with_a_bad_key_is_a_config_error_naming_it():
    from benchmarks import compare_methods
    from rec_models.config import ConfigError

    with pytest.raises(ConfigError, match="student.temperatur"):
        compare_methods.main(["--methods", "dssm,pfd", "--set-for", "pfd:student.temperatur=0.01"])

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

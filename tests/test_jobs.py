"""The spark-submit entry points as a user runs them: exit codes and messages."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _job(name, *args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--set", "train.backend=nope"], "unknown train.backend 'nope'"),
    (["--set", "train.bogus=1"], "train.bogus: unknown key"),
    (["--method", "nope"], "no method conf 'nope'"),
    (["--set", "train.epochs=zero"], "train.epochs"),
    (["--set", "train.epochs"], "not of the form key=value"),
])
def test_bad_options_fail_fast_with_a_named_error(args, message):
    done = _job("distill_pfd", *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stdout == ""          # no result line on failure


def test_write_embeddings_without_a_bundle_says_what_to_run(tmp_path):
    done = _job("write_embeddings", "--set", f"run.output_dir={tmp_path}")
    assert done.returncode == 2
    assert "no student bundle" in done.stderr and "distill_pfd" in done.stderr


@pytest.mark.slow
def test_spark_submit_builds_features(tmp_path):
    """The real launcher: spark-submit jobs/build_features.py, result JSON on stdout."""
    submit = Path(sys.executable).parent / "spark-submit"
    if not submit.exists():
        pytest.skip("spark-submit is not in this environment")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    out = tmp_path / "result.json"
    done = subprocess.run(
        [str(submit), "--master", "local[2]", str(ROOT / "jobs" / "build_features.py"),
         "--set", f"warehouse.root={tmp_path / 'wh'}", "--set", "data.source.synthetic.n_events=5000",
         "--set", "data.source.synthetic.n_users=100", "--set", "data.source.synthetic.n_items=80",
         "--json-out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # spark-submit sends the driver's stderr (logs) to stdout too: the result is the last line
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert sum(result["rows"].values()) == 5000
    assert set(result["tables"]) == {"user_features", "item_features", "samples"}

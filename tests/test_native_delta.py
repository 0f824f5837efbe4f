"""Native Delta (delta-spark: Delta's jars from Maven, its SQL extension and catalog), the
writer ``make run`` uses, as on Databricks. Spark allows one session per JVM and this
suite's shared session is plain Spark (delta-rs commits), so tests/native/ runs in a
pytest process of its own, with its own session: both writers against each other,
concurrent writers and commit conflicts (native_writers.py), and the pipeline end to end
with catalog tables queried by name and the MLflow round trip (native_pipeline.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NATIVE = sorted((ROOT / "tests" / "native").glob("native_*.py"))


@pytest.mark.timeout(1500)   # one test for the whole native suite (about 3 min on an idle 2-core machine)
def test_native_delta_suite(tmp_path):
    assert NATIVE, "tests/native holds no native_*.py module"
    report = tmp_path / "native.xml"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_files=native_*.py",
         f"--junitxml={report}", "--basetemp", str(tmp_path / "t"), *map(str, NATIVE)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1440)
    cases = ET.parse(report).getroot().iter("testcase") if report.exists() else []
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    tail = "\n".join(l for l in done.stdout.splitlines() if " WARN " not in l)[-6000:]
    assert done.returncode == 0, f"native Delta tests failed: {failed}\n{tail}\n{done.stderr[-3000:]}"
    assert "passed" in done.stdout and " skipped" not in done.stdout.splitlines()[-1], tail

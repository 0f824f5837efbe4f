"""Shared fixtures: one SparkSession for the whole test session, temp warehouses."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
ML100K = SHARED / "data" / "ml-100k"


@pytest.fixture(scope="session")
def spark():
    from etl.spark import get_spark
    from rec_models.config import SparkConf

    session = get_spark(SparkConf(master="local[2]", app_name="tests", conf={
        "spark.sql.shuffle.partitions": 4,
        "spark.default.parallelism": 4,
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.enabled": False,
        "spark.ui.showConsoleProgress": False,
        "spark.sql.execution.arrow.pyspark.enabled": True,
        "spark.driver.memory": "3g",
    }))
    yield session
    session.stop()


def in_ci() -> bool:
    """CI (the variable CI, as CI services set it) or DTT_REQUIRE_MOVIELENS=1: data the tests
    need must be there, so that a missing ../shared fails instead of skipping silently."""
    return (os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
            or os.environ.get("DTT_REQUIRE_MOVIELENS") == "1")


def require_movielens(path: Path, marker: str) -> Path:
    """``path`` if its MovieLens files (``marker``) are there; else skip, or fail in CI."""
    if not (path / marker).exists():
        msg = f"MovieLens not found at {path / marker} (../shared is absent); licence forbids shipping it"
        if in_ci():
            pytest.fail(f"CI is set but {msg}", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture
def ml100k_dir():
    return require_movielens(ML100K, "ml-100k.inter")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: one intra-op torch thread (OpenMP threads spinning on a busy 2-core box
    are ~50x slower). Modules ask for it with ``pytestmark = pytest.mark.usefixtures``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

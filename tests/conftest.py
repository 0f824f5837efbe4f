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


@pytest.fixture
def ml100k_dir():
    if not (ML100K / "ml-100k.inter").exists():
        pytest.skip(f"MovieLens 100K not found at {ML100K} (../shared is absent); licence forbids shipping it")
    return ML100K


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: one intra-op torch thread (OpenMP threads spinning on a busy 2-core box
    are ~50x slower). Modules ask for it with ``pytestmark = pytest.mark.usefixtures``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

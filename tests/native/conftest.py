"""The native-Delta tests' own SparkSession: Delta's jars, SQL extension and catalog
(``spark.delta: true``, as ``make run``). Spark allows one session per JVM and the main
test session is plain Spark (delta-rs commits), so these modules run in a pytest process
of their own: tests/test_native_delta.py starts it. Files are named ``native_*.py`` so
that the main run does not collect them."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from etl.spark import get_spark
    from rec_models.config import SparkConf

    session = get_spark(SparkConf(master="local[2]", app_name="tests-native-delta", delta=True, conf={
        "spark.sql.shuffle.partitions": 2,
        "spark.default.parallelism": 2,
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.enabled": False,
        "spark.ui.showConsoleProgress": False,
        "spark.sql.execution.arrow.pyspark.enabled": True,
        "spark.driver.memory": "2g",
        "spark.databricks.delta.snapshotPartitions": 2,
        "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("spark-warehouse")),
    }))
    yield session
    session.stop()

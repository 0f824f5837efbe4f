"""The SparkSession: one per process, configured from conf (local default or a cluster's)."""
from __future__ import annotations

import os
import sys
from typing import Optional

from pyspark.sql import SparkSession

from rec_models.config import SparkConf


def get_spark(conf: Optional[SparkConf] = None) -> SparkSession:
    """Return the active session, or build one from ``conf``.

    Under spark-submit or on Databricks a session (or its master) already exists and its
    settings win; locally the conf's master and options apply. Workers use this Python.
    """
    conf = conf or SparkConf()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder = SparkSession.builder.appName(conf.app_name)
    if conf.master and "spark.master" not in _submitted_conf():
        builder = builder.master(conf.master)
    for key, value in conf.conf.items():
        builder = builder.config(key, str(value).lower() if isinstance(value, bool) else str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("DTT_SPARK_LOG_LEVEL", "WARN"))
    return spark


def _submitted_conf() -> dict:
    """Options spark-submit passed to this driver (it exports them as system properties)."""
    from pyspark import SparkConf as _PySparkConf

    return dict(_PySparkConf().getAll()) if os.environ.get("SPARK_ENV_LOADED") or os.environ.get("PYSPARK_GATEWAY_PORT") else {}

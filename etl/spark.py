"""The SparkSession: one per process, configured from conf (local default or a cluster's).

Delta, locally, the way Delta's own docs set it up: ``delta.configure_spark_with_delta_pip``
names the ``io.delta`` Maven artifact of the installed (pinned) delta-spark, Spark's Ivy
resolves it from Maven Central once and caches it (``~/.ivy2.5.2``, or
``spark.jars.ivy``), and the session gets Delta's SQL extension and catalog. Under
spark-submit the JVM is already running, so the jars must come with it
(``--packages``, see ``delta_package`` and the Makefile): the session then gets the
extension and catalog only if Delta's classes are really on the classpath. On Databricks
the session exists and Delta is built in; nothing here applies.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from pyspark.sql import SparkSession

from rec_models.config import SparkConf

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def get_spark(conf: Optional[SparkConf] = None) -> SparkSession:
    """Return the active session, or build one from ``conf``.

    Under spark-submit or on Databricks a session (or its master) already exists and its
    settings win; locally the conf's master and options apply, and ``spark.delta: true``
    adds Delta (see the module docstring). Workers use this Python.
    """
    conf = conf or SparkConf()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    submitted = _submitted_conf()
    builder = SparkSession.builder.appName(conf.app_name)
    if conf.master and "spark.master" not in submitted:
        builder = builder.master(conf.master)
    options = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in conf.conf.items()}
    if conf.delta:
        options = _with_delta(options, launched_here=not _jvm_running())
    for key, value in options.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("DTT_SPARK_LOG_LEVEL", "WARN"))
    return spark


def delta_package() -> str:
    """The Maven coordinates of Delta's jars for the installed delta-spark and pyspark, as
    ``configure_spark_with_delta_pip`` derives them (e.g. for ``spark-submit --packages``)."""
    from delta import configure_spark_with_delta_pip

    return configure_spark_with_delta_pip(SparkSession.Builder())._options["spark.jars.packages"]


def _with_delta(options: dict[str, str], launched_here: bool) -> dict[str, str]:
    """``options`` plus Delta's jars (when this process starts the JVM), SQL extension and
    catalog; unchanged (with a log line) where the running JVM has no Delta classes."""
    options = dict(options)
    if launched_here:
        packages = [p for p in options.get("spark.jars.packages", "").split(",") if p]
        delta = delta_package()
        if not any(p.startswith("io.delta:delta-spark") for p in packages):
            packages.insert(0, delta)
        options["spark.jars.packages"] = ",".join(packages)
    elif not _delta_on_classpath():
        log.warning("spark.delta is true but the running JVM has no Delta jars (spark-submit without "
                    "--packages %s): plain Spark, Delta tables committed with delta-rs", delta_package())
        return options
    extensions = [e for e in options.get("spark.sql.extensions", "").split(",") if e]
    if DELTA_EXTENSION not in extensions:
        extensions.append(DELTA_EXTENSION)
    options["spark.sql.extensions"] = ",".join(extensions)
    options.setdefault("spark.sql.catalog.spark_catalog", DELTA_CATALOG)
    return options


def _jvm_running() -> bool:
    """True where the JVM exists before the session (spark-submit, pyspark shell)."""
    from pyspark import SparkContext

    return bool(os.environ.get("PYSPARK_GATEWAY_PORT") or SparkContext._gateway is not None)


def _delta_on_classpath() -> bool:
    from pyspark import SparkContext

    try:
        SparkContext._ensure_initialized()
        jvm = SparkContext._jvm
        jvm.org.apache.spark.util.Utils.getContextOrSparkClassLoader().loadClass(DELTA_EXTENSION)
        return True
    except Exception:
        return False


def _submitted_conf() -> dict:
    """Options spark-submit passed to this driver (it exports them as system properties)."""
    from pyspark import SparkConf as _PySparkConf, SparkContext

    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        # the JVM spark-submit started is there: connect first, or SparkConf() is an empty
        # Python dict and the conf's master would override spark-submit's --master
        SparkContext._ensure_initialized()
    return dict(_PySparkConf().getAll()) if os.environ.get("SPARK_ENV_LOADED") or os.environ.get("PYSPARK_GATEWAY_PORT") else {}

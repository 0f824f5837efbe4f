"""Distilled two-tower training on Spark, with embeddings written to Delta.

The dependency pins live here and only here. The base requirements are what a Spark
cluster runtime (Databricks ML) does not already provide; pyspark and torch are in the
``local`` extra so that installing the wheel on a cluster never replaces the runtime's.
"""
from setuptools import find_packages, setup

BASE = [
    "pyyaml>=6.0",
    "pydantic>=2.6,<3",
    "omegaconf>=2.3,<3",
    "numpy>=1.26",
    "pandas>=2.0,<3",      # pyspark 4.2 does not support pandas 3
    "pyarrow>=14",         # the extras narrow it: >=18 for pyspark 4, 14.0.2 for Petastorm
    "deltalake==1.6.6",    # delta-rs: Delta commits where Spark has no Delta jars
    "scikit-learn>=1.3",
    "matplotlib>=3.8",     # evaluation report plots (Agg backend, no display needed)
    "implicit==0.7.3",     # ALS / BPR retrieval baselines (rec_models/baselines), CPU models
]
LOCAL = [
    "pyspark==4.2.0",      # delta-spark 4.4 requires pyspark <= 4.2.0
    "pyarrow>=18",         # pyspark 4.x refuses older pyarrow for Arrow features
    # Delta's jars come from Maven Central (etl/spark.py: configure_spark_with_delta_pip names
    # io.delta:delta-spark_<spark major.minor>_2.13:<this version>); 4.4.1's jars are not on
    # Maven Central, 4.4.0's are
    "delta-spark==4.4.0",
    # tracking (orchestration/tracking.py); Databricks ML runtimes ship their own, so not in
    # BASE: the wheel must not replace it. mlflow 3.17 caps pyarrow below 26.
    "mlflow==3.17.2",
    "torch==2.13.0",       # the CPU wheel on these machines; a range would pull CUDA builds
]
# Horovod 0.28.1 (the last release) does not build against torch >= 2.1 as released:
# scripts/install_horovod.sh builds a patched wheel, caches it and installs this extra
# with that wheel (`make horovod`). Never its [spark] extra: it pins pyarrow<11.
HOROVOD = [
    "horovod==0.28.1",
    "psutil>=5.9",         # horovod.spark's driver and task services
    "cloudpickle>=2.0",    # ships the training function to the Spark tasks
]
# The Petastorm lane (.ci/lane_petastorm.sh, `make test-petastorm`): an environment like
# Databricks Runtime 15.4 LTS ML. Petastorm 0.13.1 (the last release) imports
# pyarrow.filesystem and the legacy ParquetDataset, gone in pyarrow 15; pyspark 4 refuses
# pyarrow < 18, so this extra excludes `local` and pins Spark 3.5. deltalake 1.6.6 needs
# no pyarrow itself (its [pyarrow] extra, not installed, asks for >= 21).
PETASTORM = [
    "pyspark==3.5.9",
    "pyarrow==14.0.2",
    "numpy==1.26.4",
    "pandas==2.2.3",
    "torch==2.13.0",       # the CPU wheel on these machines; a range would pull CUDA builds
    # petastorm 0.13.1's own requirements, less setuptools<70 (see PETASTORM_NO_DEPS)
    "dill>=0.2.1", "diskcache>=3.0.0", "future>=0.10.2", "packaging>=15.0", "psutil>=4.0.0",
    "pyzmq>=14.0.0", "six>=1.5.0", "fsspec",
]
# Installed with `pip install --no-deps` after the extra (the lane script reads this list):
# petastorm 0.13.1 declares setuptools<70, torch 2.13.0 setuptools>=77.0.3, and pip cannot
# override a requirement. Petastorm only needs distutils' LooseVersion from setuptools,
# which setuptools >= 77 still provides on Python 3.11 (with a DeprecationWarning).
PETASTORM_NO_DEPS = ["petastorm==0.13.1"]
NOTEBOOK = [             # notebooks/: query the embedding tables from DuckDB, run them in tests
    "duckdb==1.5.5",
    "duckdb-extension-delta==1.5.5",  # loaded by file path: INSTALL delta needs the network
    "nbformat>=5.9",
    "nbclient>=0.10",
    "ipykernel>=6.29",
]
TEST = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "scipy>=1.10",                 # paired t-tests of benchmarks/compare_methods.py (also under implicit)
    "build>=1.2",                  # tests/test_bundle.py builds the wheel the bundle installs
    "databricks-bundles==1.22.1",  # its typed job model checks resources/*.yml (tests/test_bundle.py)
]

setup(
    name="distill-two-tower",
    version="0.1.0",
    description="Distributed distillation of two-tower recommenders on Spark, embeddings to Delta",
    packages=find_packages(include=["etl", "etl.*", "orchestration", "orchestration.*", "rec_models", "rec_models.*",
                                    "jobs", "jobs.*"]),
    python_requires=">=3.10",
    install_requires=BASE,
    # the jobs as one console script (the Databricks bundle's python_wheel_task entry point)
    entry_points={"console_scripts": ["dtt=jobs._common:cli"]},
    extras_require={"local": LOCAL, "test": TEST, "notebook": NOTEBOOK, "dev": LOCAL + TEST + NOTEBOOK, "petastorm": PETASTORM, "horovod": HOROVOD},
)

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
    "pyarrow>=18",         # pyspark 4.x refuses older pyarrow for Arrow features
    "deltalake==1.6.6",    # delta-rs: Delta commits where Spark has no Delta jars
    "scikit-learn>=1.3",
    "tqdm>=4.66",
]
LOCAL = [
    "pyspark==4.2.0",      # delta-spark 4.4.1 requires pyspark <= 4.2.0
    "delta-spark==4.4.1",
    "torch==2.13.0",       # the CPU wheel on these machines; a range would pull CUDA builds
]
TEST = [
    "pytest>=8",
    "pytest-timeout>=2.3",
]

setup(
    name="distill-two-tower",
    version="0.1.0",
    description="Distributed distillation of two-tower recommenders on Spark, embeddings to Delta",
    packages=find_packages(include=["etl", "etl.*", "rec_models", "rec_models.*", "jobs", "jobs.*"]),
    python_requires=">=3.10",
    install_requires=BASE,
    extras_require={"local": LOCAL, "test": TEST, "dev": LOCAL + TEST},
)

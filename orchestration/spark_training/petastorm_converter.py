"""Petastorm on the driver (``train.loader=petastorm``): the train split as a Petastorm
``SparkDatasetConverter``, made with Spark, handed to the workers inside the training job.

The train split's rows, model columns only, with the loader's types and null handling
applied in Spark (ints -> int32, numerics -> float32, lists -> ``array<int>``, nulls -> 0),
are materialised by ``make_spark_converter`` under ``train.petastorm_cache_dir`` (default
``<run dir>/petastorm_cache``). With several ranks the rows are first repartitioned
round-robin into a multiple of the rank count, so every rank's shard has about the same
rows. The converter (picklable, no Spark inside) rides in a :class:`PetastormTrainJob` to
the workers, where ``rec_models.loaders.petastorm.PetastormLoader`` reads it; its files
are deleted when training ends, also on failure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

from etl import delta_io
from orchestration.artifacts import pinned_version
from rec_models.config import Config, is_uri
from rec_models.loaders.arrow import _INT, _LIST, LoaderError, _column_kind
from rec_models.loaders.petastorm import PetastormUnavailableError, require_petastorm
from rec_models.spec import FeatureSpec
from rec_models.training.loop import TrainJob, model_columns

log = logging.getLogger(__name__)


@dataclass
class PetastormTrainJob(TrainJob):
    """A :class:`TrainJob` that also carries the driver's ``SparkDatasetConverter`` (picklable)."""
    converter: Any = None


def _cache_url(path: str) -> str:
    if is_uri(path):   # file:, dbfs:, s3://, ...: as the warehouse's own rule
        return path
    return "file://" + os.path.abspath(path)


def _typed_columns(df, spec: FeatureSpec, columns: list[str]):
    """``df`` reduced to ``columns`` with the loader's types; nulls -> 0, a null list -> padding."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LoaderError(f"columns {missing} are not in the training DataFrame (it has {df.columns})")
    exprs = []
    for name in columns:
        col = _column_kind(spec, name)
        c = F.col(name)
        if col.kind == _LIST:
            ints = F.transform(c.cast(T.ArrayType(T.IntegerType())), lambda x: F.coalesce(x, F.lit(0)))
            e = F.coalesce(ints, F.array_repeat(F.lit(0), col.max_len))
        elif col.kind == _INT:
            e = F.coalesce(c.cast(T.IntegerType()), F.lit(0))
        else:
            e = F.coalesce(c.cast(T.FloatType()), F.lit(0.0).cast(T.FloatType()))
        exprs.append(e.alias(name))
    return df.select(*exprs)


def make_train_converter(spark, cfg: Config, spec: FeatureSpec, columns: list[str], cache_dir: str,
                         world_size: int = 1, splits: tuple[str, ...] = ("train",)):
    """The training ``splits`` of the samples table (the spec's pinned version; train + valid
    for ``train.refit``), ``columns`` only, materialised by Petastorm under ``cache_dir``.
    Driver only (needs Spark)."""
    require_petastorm()
    try:
        from petastorm.spark import SparkDatasetConverter, make_spark_converter
    except Exception as exc:   # an ImportError, or a version clash found at import
        raise PetastormUnavailableError(f"train.loader=petastorm: petastorm.spark does not import here "
                                        f"({type(exc).__name__}: {exc}); use train.loader=arrow") from None

    df = delta_io.read_table(spark, cfg.warehouse.uri("samples"), columns, [("split", "in", list(splits))],
                             pinned_version(spec, "samples"))
    df = _typed_columns(df, spec, columns)
    if world_size > 1:
        # round-robin into a multiple of the ranks: equal files, so equal shards
        parts = max(df.rdd.getNumPartitions(), world_size)
        df = df.repartition(-(-parts // world_size) * world_size)
    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, _cache_url(cache_dir))
    converter = make_spark_converter(df, dtype=None)   # types already cast above
    log.info("petastorm: %d training rows in %d files under %s", len(converter), len(converter.file_urls),
             converter.cache_dir_url)
    return converter


def _world_size(cfg: Config) -> int:
    return cfg.train.num_processes if cfg.train.backend != "local" else 1


@contextlib.contextmanager
def petastorm_job(job: TrainJob, cfg: Config, spec: FeatureSpec, spark=None) -> Iterator[PetastormTrainJob]:
    """``job`` with a converter of its train split; the converter's files are deleted on exit."""
    from etl.spark import get_spark

    spark = spark or get_spark(cfg.spark)
    cache_dir = cfg.train.petastorm_cache_dir or os.path.join(job.out_dir, "petastorm_cache")
    converter = make_train_converter(spark, cfg, spec, model_columns(spec), cache_dir, _world_size(cfg),
                                     job.train_splits)
    try:
        fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.init}
        yield PetastormTrainJob(**{**fields, "converter": converter})
    finally:
        converter.delete()
        if "://" not in cache_dir and os.path.isdir(cache_dir) and not os.listdir(cache_dir):
            os.rmdir(cache_dir)

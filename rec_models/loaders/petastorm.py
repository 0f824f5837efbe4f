"""Training batches from a Petastorm ``SparkDatasetConverter`` (``train.loader=petastorm``):
the worker side. The converter is made on the driver, with Spark, by
``orchestration.spark_training.petastorm_converter``; it is picklable and rides in the
training job to the workers, which need no Spark.

Why: on Databricks Runtime ML up to 15.4 LTS, Petastorm's ``make_spark_converter`` is the
documented way from a Spark DataFrame to torch. :class:`PetastormLoader` yields exactly
the batches :class:`rec_models.loaders.arrow.ArrowBatchLoader` yields (same keys, dtypes,
shapes), the same number on every rank, and has ``len`` and ``set_epoch``: per epoch, ``converter.make_torch_dataloader(...,
  cur_shard=rank, shard_count=world, data_loader_fn=BatchedDataLoader, num_epochs=1)``.
  Petastorm gives row group ``i`` (in its own enumeration of the files' row groups) to
  shard ``i % world``; the loader enumerates them the same way (Petastorm's own
  ``load_row_groups``) from the footers, so ``len`` = ``min over ranks of rows //
  batch_size`` is known before reading, and a rank stops after that many batches.

Petastorm 0.13.1 (its last release) needs pyarrow < 15 and so pyspark 3.5: it runs in the
petastorm lane (``.ci/lane_petastorm.sh``), not beside pyspark 4. Elsewhere
:func:`require_petastorm` says so, and what to use instead. Its batch order is not
reproducible (reader threads race), unlike ArrowBatchLoader's.
"""
from __future__ import annotations

import logging
import warnings
from importlib import metadata
from typing import Any, Iterator, Optional

import numpy as np
import torch

from rec_models.config import ConfigError
from rec_models.loaders.arrow import _FLOAT, _INT, _LIST, LoaderError, _column_kind
from rec_models.spec import FeatureSpec

__all__ = ["PetastormLoader", "PetastormUnavailableError", "guard_end_of_data", "petastorm_unavailable",
           "require_petastorm", "shard_rows"]

log = logging.getLogger(__name__)

PETASTORM_VERSION = "0.13.1"
_INSTEAD = ("Use train.loader=arrow (ArrowBatchLoader: the same batches, read straight from the "
            "Parquet files), or run in the petastorm lane's environment: `make test-petastorm` "
            "(.ci/lane_petastorm.sh) builds .venv-petastorm with setup.py's petastorm extra "
            "(pyspark 3.5, pyarrow 14.0.2, like Databricks Runtime 15.4 LTS ML).")


class PetastormUnavailableError(ConfigError):
    """train.loader=petastorm in an environment where Petastorm cannot run (says why and what instead)."""


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> tuple[int, int]:
    parts = (version.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


def petastorm_unavailable() -> Optional[str]:
    """Why Petastorm cannot run here (None if it can), from installed versions only: cheap,
    imports nothing, so a pyspark 4 environment can ask."""
    pyspark, pyarrow, petastorm = _version("pyspark"), _version("pyarrow"), _version("petastorm")
    problems = []
    if pyspark is None:
        problems.append("pyspark is not installed")
    elif _major_minor(pyspark) >= (4, 0):
        problems.append(f"this environment has pyspark {pyspark}, which refuses pyarrow < 18")
    if pyarrow is None:
        problems.append("pyarrow is not installed")
    elif _major_minor(pyarrow) >= (15, 0):
        problems.append(f"pyarrow {pyarrow} is installed, and Petastorm imports pyarrow.filesystem and the "
                        "legacy ParquetDataset, which pyarrow 15 removed")
    if petastorm is None:
        problems.append("petastorm is not installed")
    if not problems:
        return None
    return (f"train.loader=petastorm needs Petastorm {PETASTORM_VERSION}, which works only with pyarrow < 15 "
            f"and therefore pyspark 3.5.x: " + "; ".join(problems) + ". " + _INSTEAD)


def require_petastorm() -> None:
    """Raise :class:`PetastormUnavailableError` unless Petastorm's reader imports and can run
    here (the driver's converter checks ``petastorm.spark`` as well)."""
    reason = petastorm_unavailable()
    if reason is None:
        try:
            import petastorm.pytorch  # noqa: F401
        except Exception as exc:  # an ImportError, or a version clash found at import
            reason = (f"train.loader=petastorm: petastorm is installed but does not import here "
                      f"({type(exc).__name__}: {exc}). " + _INSTEAD)
    if reason is not None:
        raise PetastormUnavailableError(reason)


# ---- worker ---------------------------------------------------------------------------------
def _row_group_rows(file_urls: list[str]) -> list[int]:
    """Rows of each row group, in the order Petastorm's reader numbers them (the same
    ParquetDataset and ``load_row_groups`` calls as ``petastorm.reader.Reader``)."""
    import pyarrow.parquet as pq
    from petastorm.etl.dataset_metadata import load_row_groups
    from petastorm.fs_utils import get_filesystem_and_path_or_paths
    from petastorm.reader import normalize_dataset_url_or_urls

    urls = normalize_dataset_url_or_urls(list(file_urls))
    fs, paths = get_filesystem_and_path_or_paths(urls)
    footers: dict[str, Any] = {}
    rows = []
    with warnings.catch_warnings():   # pyarrow 14 warns on every legacy-dataset call Petastorm makes
        warnings.simplefilter("ignore", FutureWarning)
        dataset = pq.ParquetDataset(paths, filesystem=fs, validate_schema=False, metadata_nthreads=10)
        for piece in load_row_groups(dataset):
            if piece.path not in footers:
                footers[piece.path] = piece.get_metadata()
            rows.append(footers[piece.path].row_group(piece.row_group).num_rows)
    return rows


def guard_end_of_data(reader) -> None:
    """Make ``reader`` (a Petastorm ``Reader`` on a thread pool) stop only when the data ends.

    Petastorm 0.13.1's ``ThreadPool.get_results`` decides "no more data" from two checks
    made one after the other: every ventilated row group processed, then the ventilator
    completed. If the ventilator thread hands out all the remaining row groups between the
    two (at most ``4 x workers`` of them: the start of a small epoch, or the tail of any
    epoch), the reader ends the epoch early, silently: about one run in two on a
    one-row-group shard here. Re-checking in the safe order (ventilator completed first, so
    every row group was handed out before, then all processed) and reading on otherwise
    removes that. Petastorm 0.13.1 is the last release; the lane pins it, so these
    attributes do not move. Other pool types are left as they are.
    """
    from petastorm.workers_pool import EmptyResultError

    pool, ventilator = reader._workers_pool, reader.ventilator
    all_done = getattr(pool, "all_workers_done", None)
    if all_done is None or ventilator is None:
        return
    racy = pool.get_results

    def get_results():
        while True:
            try:
                return racy()
            except EmptyResultError:
                if ventilator.completed() and all_done():
                    raise

    pool.get_results = get_results


def shard_rows(row_group_rows: list[int], world_size: int) -> list[int]:
    """Rows per rank when row group ``i`` goes to shard ``i % world_size`` (Petastorm's rule)."""
    return [sum(row_group_rows[rank::world_size]) for rank in range(world_size)]


class PetastormLoader:
    """Batches of ``columns`` from a Petastorm ``SparkDatasetConverter``, as ArrowBatchLoader's.

    Tensors: int32 ``[B]`` for ids and buckets, int32 ``[B, max_len]`` for lists, float32
    ``[B]`` for numerics, label and weight. ``len`` is the same on every rank (``min over
    ranks of rows // batch_size``; ``ceil`` with ``drop_last=False``), and so are
    ``num_rows`` (rows this rank yields per epoch), ``total_rows`` and ``rank_rows`` (each
    shard's rows), as in ArrowBatchLoader. Call ``set_epoch`` before each epoch for a new
    row-group order and shuffle.
    """

    def __init__(self, converter, spec: FeatureSpec, columns: list[str], batch_size: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 shuffling_queue_capacity: int = 200_000, workers_count: int = 2, drop_last: bool = True,
                 data_loader: str = "batched"):
        require_petastorm()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if data_loader not in ("batched", "default"):
            raise ValueError(f"data_loader must be 'batched' or 'default', got '{data_loader}'")
        self.converter = converter
        self.spec = spec
        self.columns = list(columns)
        self._cols = [_column_kind(spec, c) for c in self.columns]
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.shuffling_queue_capacity = max(0, int(shuffling_queue_capacity))
        self.workers_count = int(workers_count)
        self.drop_last = bool(drop_last)
        self.data_loader = data_loader
        self.epoch = 0

        self._check_schema()
        rows = _row_group_rows(converter.file_urls)
        if len(rows) < self.world_size:
            raise LoaderError(
                f"the Petastorm cache {converter.cache_dir_url} has {len(rows)} row groups, fewer than the "
                f"{self.world_size} ranks: Petastorm shards by row group (convert with world_size={self.world_size} "
                "to repartition, or use train.loader=arrow, which slices row groups)")
        self.rank_rows = shard_rows(rows, self.world_size)
        self.total_rows = sum(self.rank_rows)
        least = min(self.rank_rows)
        self._num_batches = least // self.batch_size if self.drop_last else -(-least // self.batch_size)
        self.num_rows = min(self.rank_rows[self.rank], self._num_batches * self.batch_size)

    def _check_schema(self) -> None:
        import pyarrow.parquet as pq
        from petastorm.fs_utils import get_filesystem_and_path_or_paths
        from petastorm.reader import normalize_dataset_url_or_urls

        if not self.converter.file_urls:
            raise LoaderError(f"the Petastorm cache {self.converter.cache_dir_url} holds no files")
        fs, path = get_filesystem_and_path_or_paths(normalize_dataset_url_or_urls(self.converter.file_urls[0]))
        with fs.open(path, "rb") as fh:
            names = pq.read_schema(fh).names
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise LoaderError(f"columns {missing} are not in the Petastorm cache {self.converter.cache_dir_url} "
                              f"(it has {names}): the converter was made for other columns")

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _reader_seed(self) -> int:
        return int(np.random.SeedSequence([self.seed % (1 << 64), self.epoch, self.rank]).generate_state(1)[0])

    def _adapt(self, batch: dict, index: int) -> dict[str, torch.Tensor]:
        out = {}
        for col in self._cols:
            t = batch[col.name]
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(np.asarray(t))
            if col.kind == _LIST:
                if t.dim() != 2 or t.shape[1] != col.max_len:
                    raise LoaderError(f"list column '{col.name}': Petastorm gave shape {tuple(t.shape)} in batch "
                                      f"{index}; every list must have max_len={col.max_len} values (ETL pads with 0)")
                t = t.to(torch.int32)
            elif col.kind == _INT:
                t = t.reshape(-1).to(torch.int32)
            elif col.kind == _FLOAT:
                t = t.reshape(-1).to(torch.float32)
            out[col.name] = t.contiguous()
        return out

    def _dataloader(self):
        from petastorm.pytorch import BatchedDataLoader, DataLoader

        kwargs = dict(batch_size=self.batch_size, num_epochs=1, workers_count=self.workers_count,
                      shuffling_queue_capacity=self.shuffling_queue_capacity if self.shuffle else 0,
                      data_loader_fn=BatchedDataLoader if self.data_loader == "batched" else DataLoader,
                      shuffle_row_groups=self.shuffle, seed=self._reader_seed())
        if self.world_size > 1:
            kwargs.update(cur_shard=self.rank, shard_count=self.world_size)
        return self.converter.make_torch_dataloader(**kwargs)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        expected = self._num_batches
        if expected == 0:
            return
        done = 0
        with self._dataloader() as loader:      # exiting stops and joins Petastorm's reader threads
            guard_end_of_data(loader.reader)
            for batch in loader:
                out = self._adapt(batch, done)
                n = len(out[self._cols[0].name])
                if n != self.batch_size and (self.drop_last or done != expected - 1):
                    raise LoaderError(f"Petastorm gave a batch of {n} rows (batch {done} of {expected} on rank "
                                      f"{self.rank}); expected {self.batch_size}")
                yield out
                done += 1
                if done == expected:
                    return
        raise LoaderError(f"Petastorm yielded {done} batches on rank {self.rank}, expected {expected} "
                          f"({self.rank_rows[self.rank]} rows in this shard): the cache at {self.converter.cache_dir_url} "
                          "changed, Petastorm's sharding rule is not i % shard_count, or its reader ended "
                          "the epoch early (see guard_end_of_data)")

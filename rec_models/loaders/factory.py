"""The training loader ``train.loader`` names, built in each worker by ``_train``.

One call site for every loader, so that the training loop (``rec_models.training.loop._train``)
needs no change when a loader is added; each loader yields the same batch dicts, the
same number on every rank, and has ``len`` and ``set_epoch``. Importing this module
imports no optional dependency: Petastorm is imported only when asked for.
"""
from __future__ import annotations

from rec_models.config import LOADERS, Config, TrainConf
from rec_models.loaders.arrow import ArrowBatchLoader
from rec_models.spec import FeatureSpec

__all__ = ["check_loader_available", "make_train_loader"]


def check_loader_available(train: TrainConf) -> None:
    """Fail at job start (before ETL or any training) if ``train.loader`` cannot run in this
    environment; cheap (looks at installed versions only)."""
    if train.loader == "petastorm":
        from rec_models.loaders.petastorm import petastorm_unavailable, PetastormUnavailableError

        reason = petastorm_unavailable()
        if reason is not None:
            raise PetastormUnavailableError(reason)


def make_train_loader(files: list[str], converter, spec: FeatureSpec, columns: list[str], rank: int, world: int,
                      cfg: Config):
    """This rank's shuffled training loader over the train split: its Parquet ``files``
    (``train.loader=arrow``), or a Petastorm ``converter`` made on the driver
    (``train.loader=petastorm``; ``orchestration.spark_training.petastorm_converter``)."""
    tc = cfg.train
    if tc.loader == "arrow":
        return ArrowBatchLoader(files, spec, columns, tc.batch_size, rank=rank, world_size=world,
                                shuffle=True, seed=cfg.run.seed, shuffle_buffer_rows=tc.shuffle_buffer_rows,
                                prefetch_batches=tc.prefetch_batches)
    if tc.loader == "petastorm":
        from rec_models.loaders.petastorm import PetastormLoader, require_petastorm

        require_petastorm()
        if converter is None:
            raise ValueError("train.loader=petastorm, but the training job carries no Petastorm converter: build "
                             "it with orchestration.pipeline.train, or wrap the job in orchestration.spark_training."
                             "petastorm_converter.petastorm_job on the driver (the converter needs Spark, the "
                             "workers have none)")
        return PetastormLoader(converter, spec, columns, tc.batch_size, rank=rank, world_size=world,
                               shuffle=True, seed=cfg.run.seed, shuffling_queue_capacity=tc.shuffle_buffer_rows,
                               workers_count=tc.petastorm_workers)
    raise ValueError(f"unknown train.loader '{tc.loader}'; known: {', '.join(LOADERS)}")

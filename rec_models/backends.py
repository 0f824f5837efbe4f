"""Training backends behind one call: ``run_training(job, train_conf)``.

- ``local``: the loop in this process (one worker, no process group).
- ``torch_distributor``: Spark's TorchDistributor starts ``num_processes`` workers (on the
  driver with ``local_mode``, else as barrier tasks on the executors) and DDP joins them
  (gloo on CPU, NCCL on GPU). Its return value is rank 0's.
"""
from __future__ import annotations

import dataclasses
import logging

from rec_models.config import BACKENDS, TrainConf
from rec_models.train import TrainJob, train_worker

log = logging.getLogger(__name__)


def run_training(job: TrainJob, train: TrainConf) -> dict:
    if train.backend == "local":
        return train_worker(job)
    if train.backend == "torch_distributor":
        return _torch_distributor(job, train)
    raise ValueError(f"unknown train.backend '{train.backend}'; known: {', '.join(BACKENDS)}")


def _torch_distributor(job: TrainJob, train: TrainConf) -> dict:
    from pyspark.ml.torch.distributor import TorchDistributor

    # two processes on two cores: one torch thread each, or they fight for the cores
    if not train.num_threads and train.local_mode:
        job = dataclasses.replace(job, config={**job.config, "train": {**job.config["train"], "num_threads": 1}})
    log.info("TorchDistributor: %d processes, local_mode=%s, use_gpu=%s",
             train.num_processes, train.local_mode, train.use_gpu)
    distributor = TorchDistributor(num_processes=train.num_processes, local_mode=train.local_mode,
                                   use_gpu=train.use_gpu)
    return distributor.run(train_worker, job)

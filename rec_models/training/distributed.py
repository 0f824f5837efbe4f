"""The few collectives the training loop needs, behind one interface per process group.

The loop in :mod:`rec_models.training.loop` is the same under every backend; what differs is how
gradients are averaged and how rank 0's decisions reach the other ranks:

- :class:`NoCollective`: one process (``train.backend=local``).
- :class:`TorchCollective`: ``torch.distributed`` (TorchDistributor or torchrun describe the
  group in the environment; gloo on CPU, NCCL on GPU); DDP averages the gradients.
- :class:`HorovodCollective`: Horovod (``horovod.spark.run``); ``hvd.DistributedOptimizer``
  averages the gradients, after rank 0's parameters and optimizer state are broadcast.

Both averaging schemes sum the ranks' gradients and divide by the world size, so the same
seed and data give the same model under either (checked by tests/test_horovod.py).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Protocol

import torch
import torch.distributed as dist
from torch import nn

HOROVOD_INSTALL_HINT = ("train.backend=horovod needs Horovod built for this torch: run "
                        "scripts/install_horovod.sh (or `make horovod`) with this Python")


class Collective(Protocol):
    """What the training loop asks of a process group."""

    rank: int
    world_size: int

    def device(self, use_gpu: bool) -> torch.device:
        """This process's device (its local GPU when ``use_gpu`` and CUDA is there)."""

    def distribute(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                   named_parameters: Iterable[tuple[str, nn.Parameter]]
                   ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """``(module, optimizer)`` whose steps average gradients over the ranks, starting
        from rank 0's parameters (and optimizer state)."""

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""

    def close(self, failed: bool = False) -> None:
        """Leave the group (if this object joined it). ``failed``: this rank is raising."""


def _cuda_device(local_rank: int, use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")


class NoCollective:
    """A world of one: nothing to average or broadcast."""

    rank, world_size = 0, 1

    def device(self, use_gpu: bool) -> torch.device:
        return _cuda_device(0, use_gpu)

    def distribute(self, module, optimizer, named_parameters):
        return module, optimizer

    def broadcast_flag(self, flag: bool) -> bool:
        return flag

    def broadcast_object(self, obj):
        return obj

    def close(self, failed: bool = False) -> None:
        pass


class TorchCollective:
    """``torch.distributed``, joined from the environment TorchDistributor / torchrun set
    (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...), unless already joined."""

    def __init__(self, use_gpu: bool):
        self._owned = not dist.is_initialized()
        if self._owned:
            dist.init_process_group(backend="nccl" if use_gpu and torch.cuda.is_available() else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def device(self, use_gpu: bool) -> torch.device:
        return _cuda_device(int(os.environ.get("LOCAL_RANK", 0)), use_gpu)

    def distribute(self, module, optimizer, named_parameters):
        # DDP broadcasts rank 0's parameters and buffers at construction and averages the
        # gradients in backward; the optimizer state starts empty on every rank
        device = next(module.parameters()).device
        ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
        return ddp, optimizer

    def broadcast_flag(self, flag: bool) -> bool:
        # NCCL cannot broadcast CPU tensors
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def broadcast_object(self, obj):
        shared = [obj]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def close(self, failed: bool = False) -> None:
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()


class HorovodCollective:
    """Horovod (Gloo controller on CPU; NCCL when Horovod was built with it)."""

    def __init__(self):
        try:
            import horovod.torch as hvd
        except ImportError as exc:
            raise ImportError(f"{HOROVOD_INSTALL_HINT} ({exc})") from exc
        self._hvd = hvd
        self._owned = not hvd.is_initialized()
        if self._owned:
            hvd.init()
        self.rank, self.world_size = hvd.rank(), hvd.size()

    def device(self, use_gpu: bool) -> torch.device:
        return _cuda_device(self._hvd.local_rank(), use_gpu)

    def distribute(self, module, optimizer, named_parameters):
        hvd = self._hvd
        hvd.broadcast_parameters(module.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        buffers = list(module.buffers())
        if buffers:
            # as DDP's broadcast_buffers: each forward starts from rank 0's buffers (e.g. a
            # retrieval student's running calibration), so both backends train the same model
            def sync_buffers(_module, _inputs):
                for i, b in enumerate(buffers):
                    hvd.broadcast_(b, root_rank=0, name=f"dtt.buffer.{i}")
            module.register_forward_pre_hook(sync_buffers)
        return module, hvd.DistributedOptimizer(optimizer, named_parameters=list(named_parameters),
                                                op=hvd.Average)

    def broadcast_flag(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0])
        return bool(self._hvd.broadcast(t, root_rank=0, name="dtt.flag").item())

    def broadcast_object(self, obj):
        return self._hvd.broadcast_object(obj, root_rank=0, name="dtt.object")

    def close(self, failed: bool = False) -> None:
        # a failing rank leaves without Horovod's shutdown handshake: its peers may be
        # blocked in an allreduce, and the launcher ends them when this process exits
        if self._owned and not failed:
            self._hvd.shutdown()


def join(backend: str, use_gpu: bool) -> Collective:
    """The process group of this training process under ``backend``."""
    if backend == "horovod":
        return HorovodCollective()
    if dist.is_available() and (dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return TorchCollective(use_gpu)
    return NoCollective()

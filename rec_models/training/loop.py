"""The training loop, identical under every backend.

``train_worker`` runs in each training process (the driver for ``local``, a
TorchDistributor or Horovod process otherwise): it reads its shard of the training split,
trains with gradients averaged over the ranks when the world is larger than one (DDP or
Horovod, behind :mod:`rec_models.training.distributed`), evaluates on the validation split each
epoch, checkpoints on rank 0 and returns the test metrics of rank 0.

A model is any module with ``training_loss(batch, step) -> (loss, logs)`` and
``forward(batch) -> {head: logit}`` (heads: "teacher", "student").
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from rec_models.training import distributed
from rec_models.config import Config, validate_config
from rec_models.loaders.arrow import ArrowBatchLoader
from rec_models.loaders.factory import make_train_loader
from rec_models.metrics import auc, logloss
from rec_models.spec import FeatureSpec

log = logging.getLogger(__name__)

@dataclass
class TrainJob:
    """Everything a worker needs, picklable (sent to TorchDistributor processes).

    ``kind``: a method name of ``rec_models.methods``; ``teachers``: checkpoint of each
    frozen teacher the method needs; ``teacher_checkpoint``: PFD distilling from a
    pre-trained PFD teacher instead of joint training.
    """
    kind: str
    config: dict
    spec_json: str
    files: dict[str, list[str]]
    out_dir: str
    teacher_checkpoint: Optional[str] = None
    teachers: dict[str, str] = field(default_factory=dict)
    tags: dict = field(default_factory=dict)


def build_model(kind: str, spec: FeatureSpec, cfg: Config, teacher_checkpoint: Optional[str] = None,
                teachers: Optional[dict[str, nn.Module]] = None) -> nn.Module:
    """The method ``kind``, with its frozen ``teachers`` (name -> trained model)."""
    from rec_models.methods import get_method

    if kind == "pfd" and teacher_checkpoint:
        from rec_models.distill.pfd import PFDModel

        model = PFDModel(spec, cfg.model, cfg.distill, teacher_frozen=True)
        model.load_teacher(load_checkpoint(teacher_checkpoint)["model"])
        return model
    return get_method(kind).build(spec, cfg, teachers or {})


def load_teachers(paths: dict[str, str]) -> dict[str, nn.Module]:
    """Trained teachers from their checkpoints, frozen and in eval mode."""
    from rec_models.distill.base import freeze

    return {name: freeze(load_trained(path)[0]) for name, path in paths.items()}


class _LossModule(nn.Module):
    """Routes ``training_loss`` through ``forward`` so that DDP's gradient hooks run."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, step: int):
        return self.model.training_loss(batch, step)


def train_worker(job: TrainJob) -> dict:
    """Train ``job`` in this process, joined to the process group of ``train.backend``."""
    cfg = validate_config(job.config)
    spec = FeatureSpec.from_json(job.spec_json)
    collective = distributed.join(cfg.train.backend, cfg.train.use_gpu)
    threads = torch.get_num_threads()
    failed = True
    try:
        result = _train(job, cfg, spec, collective)
        failed = False
        return result
    finally:
        torch.set_num_threads(threads)  # the local backend runs in the caller's process
        collective.close(failed=failed)


def _train(job: TrainJob, cfg: Config, spec: FeatureSpec, collective: distributed.Collective) -> dict:
    rank, world = collective.rank, collective.world_size
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = collective.device(tc.use_gpu)
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)

    model = build_model(job.kind, spec, cfg, job.teacher_checkpoint, load_teachers(job.teachers)).to(device)
    columns = model_columns(spec)
    # train.loader: arrow (the split's files) | petastorm (a converter the driver made)
    loader = make_train_loader(job.files["train"], getattr(job, "converter", None), spec, columns, rank, world, cfg)
    if len(loader) == 0:
        raise ValueError(f"the training split has too few rows ({loader.num_rows} on rank {rank}) "
                         f"for one batch of {tc.batch_size}")
    step_module = _LossModule(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    # gradients averaged over the ranks (DDP or Horovod), from rank 0's initial weights
    step_module, optimizer = collective.distribute(
        step_module, optimizer, [(n, p) for n, p in step_module.named_parameters() if p.requires_grad])

    history, step, best_auc, since_best, best_epoch = [], 0, -1.0, 0, None
    train_seconds = 0.0  # the epoch loops only: evaluation and checkpoints excluded
    for epoch in range(tc.epochs):
        model.train()
        loader.set_epoch(epoch)
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss, logs = step_module(batch, step)
            optimizer.zero_grad()   # grads to None (torch's default); Horovod's wrapper takes no argument
            loss.backward()
            optimizer.step()
            step += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if rank == 0 and step % tc.log_every == 0:
                log.info("epoch %d step %d %s", epoch, step, " ".join(f"{k}={v:.4f}" for k, v in logs.items()))
        train_seconds += time.perf_counter() - t0
        record = {"epoch": epoch, "steps": step, **{f"train_{k}": v / max(1, len(loader)) for k, v in sums.items()}}
        if rank == 0:
            record.update({f"valid_{k}": v for k, v in evaluate(model, job.files["valid"], spec, cfg, device).items()})
            save_checkpoint(os.path.join(job.out_dir, "checkpoints", f"epoch_{epoch}.pt"), model, optimizer, epoch, step, job)
            log.info("epoch %d: %s", epoch, json.dumps(record))
        history.append(record)
        key = _selection_metric(record)   # None on ranks > 0: they do not evaluate
        if key is not None and record[key] > best_auc + 1e-4:
            best_auc, best_epoch, since_best = record[key], epoch, 0
        elif key is not None:
            since_best += 1
        stop = bool(tc.early_stopping_patience) and since_best >= tc.early_stopping_patience
        # rank 0 decides (it alone evaluates); every rank follows, or the next
        # gradient average would wait forever for the ranks that stopped
        if collective.broadcast_flag(stop):
            break
    result: dict = {}
    if rank == 0:
        selected = epoch
        if tc.restore_best_epoch and best_epoch is not None and best_epoch != epoch:
            # rank 0 alone scores the test split and writes the result: only its weights matter
            best = load_checkpoint(os.path.join(job.out_dir, "checkpoints", f"epoch_{best_epoch}.pt"))
            model.load_state_dict(best["model"])
            selected = best_epoch
        final = os.path.join(job.out_dir, "checkpoints", "last.pt")
        save_checkpoint(final, model, optimizer, selected, step, job)
        result = {
            "kind": job.kind, "checkpoint": final, "history": history, "selected_epoch": selected,
            "train_seconds": train_seconds, "steps": step, "world_size": world,
            "samples_per_second": step * tc.batch_size * world / max(train_seconds, 1e-9),
            "test": evaluate(model, job.files["test"], spec, cfg, device),
        }
        with open(os.path.join(job.out_dir, "metrics.json"), "w") as fh:
            json.dump(result, fh, indent=2)
    if world > 1:
        # every process returns rank 0's result: TorchDistributor keeps whichever output
        # file a process wrote last, not necessarily rank 0's
        result = collective.broadcast_object(result)
    return result


def _selection_metric(record: dict) -> Optional[str]:
    """The validation metric that selects epochs: the student's AUC, else the teacher's."""
    return next((k for k in ("valid_student_auc", "valid_teacher_auc") if k in record), None)


def model_columns(spec: FeatureSpec) -> list[str]:
    """Columns the loader reads: all model inputs, the label and the weight."""
    cols = [f.name for f in spec.input_features()] + [spec.label.name]
    if spec.weight is not None:
        cols.append(spec.weight.name)
    return cols


@torch.no_grad()
def predict(model: nn.Module, files: list[str], spec: FeatureSpec, cfg: Config, device) -> tuple[np.ndarray, dict]:
    """Labels and each head's probabilities over ``files``, in file order."""
    model.eval()
    loader = ArrowBatchLoader(files, spec, model_columns(spec), cfg.train.eval_batch_size, shuffle=False,
                              drop_last=False, prefetch_batches=cfg.train.prefetch_batches)
    labels, probs = [], {}
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        for head, logit in model(batch).items():
            probs.setdefault(head, []).append(torch.sigmoid(logit).float().cpu().numpy())
        labels.append(batch[spec.label.name].cpu().numpy())
    model.train()
    if not labels:
        raise ValueError("evaluation split is empty")
    return np.concatenate(labels), {h: np.concatenate(p) for h, p in probs.items()}


def evaluate(model: nn.Module, files: list[str], spec: FeatureSpec, cfg: Config, device) -> dict:
    labels, probs = predict(model, files, spec, cfg, device)
    out = {"rows": int(labels.size), "positive_rate": float(labels.mean())}
    for head, p in probs.items():
        out[f"{head}_auc"] = auc(labels, p)
        out[f"{head}_logloss"] = logloss(labels, p)
    return out


def save_checkpoint(path: str, model: nn.Module, optimizer, epoch: int, step: int, job: TrainJob) -> None:
    """Atomic: a reader sees the previous checkpoint or this one, never a torn file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
             "kind": job.kind, "spec_json": job.spec_json, "config": job.config, "tags": job.tags}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_trained(path: str) -> tuple[nn.Module, FeatureSpec, Config]:
    """Rebuild a model from its checkpoint (works whichever backend wrote it)."""
    from rec_models.methods import get_method

    ckpt = load_checkpoint(path)
    cfg = validate_config(ckpt["config"])
    spec = FeatureSpec.from_json(ckpt["spec_json"])
    # frozen teachers are submodules: rebuild their structure, the state dict fills them
    teachers = {t: get_method(t).build(spec, teacher_config(cfg, t), {}) for t in get_method(ckpt["kind"]).teachers}
    model = build_model(ckpt["kind"], spec, cfg, teachers=teachers)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, spec, cfg


def teacher_config(cfg: Config, teacher: str) -> Config:
    """The config a teacher is trained with: this run's, with the teacher's own params."""
    raw = cfg.model_dump(mode="json")
    raw["distill"] = {**raw["distill"], "method": teacher, "params": cfg.distill.teacher_params.get(teacher, {})}
    return validate_config(raw)

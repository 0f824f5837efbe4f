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

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch
from torch import nn

from rec_models.training import distributed
from rec_models.config import Config, ConfigError, BadInputError, InputNotFoundError, validate_config
from rec_models.loaders.arrow import ArrowBatchLoader
from rec_models.loaders.factory import make_train_loader
from rec_models.objectives import uses_item_bank
from rec_models.state_files import read_json_object, write_json_atomic
from rec_models.training.validation import RetrievalValidation, has_towers, load_item_bank
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
    # train.refit=train_valid's second training: exactly this many epochs on files["train"]
    # (train + valid), no validation, no epoch selection (orchestration.pipeline.train)
    refit_epochs: Optional[int] = None

    @property
    def train_splits(self) -> tuple[str, ...]:
        """The sample splits this job trains on: a refit's valid rows are training rows too."""
        return ("train", "valid") if self.refit_epochs is not None else ("train",)

    def as_refit(self, epochs: int, out_dir: str) -> "TrainJob":
        """This job trained again for ``epochs`` on its ``train_splits`` as a refit (train + valid)."""
        job = replace(self, out_dir=out_dir, refit_epochs=epochs)
        return replace(job, files={**self.files, "train": [f for s in job.train_splits for f in self.files[s]]})


def build_model(kind: str, spec: FeatureSpec, cfg: Config, teacher_checkpoint: Optional[str] = None,
                teachers: Optional[dict[str, nn.Module]] = None) -> nn.Module:
    """The method ``kind``, with its frozen ``teachers`` (name -> trained model)."""
    from rec_models.methods import get_method

    if kind == "pfd" and teacher_checkpoint:
        from rec_models.distill.pfd import PFDModel

        model = PFDModel(spec, cfg.model, cfg.distill, teacher_frozen=True, student_conf=cfg.student)
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
        raise ConfigError(f"the training split has too few rows ({loader.num_rows} on rank {rank}) "
                          f"for one batch of train.batch_size={tc.batch_size}")
    if uses_item_bank(model):
        if not job.files.get("items"):
            raise ConfigError("student.objective=mixed draws corpus negatives from the item feature table, and this "
                              "training has none (files['items']): build the features with jobs/build_features.py, "
                              "or set student.objective=sampled_softmax")
        model.item_bank = load_item_bank(job.files["items"], spec, list(model.student.item_input_names))
    refit = job.refit_epochs is not None   # valid is in the training files: nothing to validate on
    # rank 0 selects a student's epochs by valid retrieval over the whole catalogue
    retrieval = RetrievalValidation(job.files, spec, model.student, cfg) \
        if rank == 0 and not refit and "items" in job.files and has_towers(model) else None
    step_module = _LossModule(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    # gradients averaged over the ranks (DDP or Horovod), from rank 0's initial weights
    step_module, optimizer = collective.distribute(
        step_module, optimizer, [(n, p) for n, p in step_module.named_parameters() if p.requires_grad])

    history, step, best_auc, since_best, best_epoch = [], 0, -1.0, 0, None
    train_seconds = 0.0  # the epoch loops only: evaluation and checkpoints excluded
    # this run's checkpoints live under its run id: a rerun never mixes its epochs with another's
    run_id = job.tags.get("run_id") or "unnamed"
    ckpt_dir = os.path.join(job.out_dir, "checkpoints", run_id)
    fingerprint = run_fingerprint(job)
    start, epoch, stopped = 0, -1, False
    resumed = resume_point(job, fingerprint) if tc.resume == "auto" else None
    if resumed is not None:
        ckpt = load_checkpoint(resumed)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loop_state = ckpt["loop"]
        history, step, best_auc = list(loop_state["history"]), int(ckpt["step"]), float(loop_state["best_auc"])
        since_best, best_epoch = int(loop_state["since_best"]), loop_state["best_epoch"]
        train_seconds, stopped = float(loop_state["train_seconds"]), bool(loop_state["stopped"])
        epoch = int(ckpt["epoch"])
        start = epoch + 1
        _set_rng_state(ckpt["rng"], device)
        if rank == 0:
            log.info("train.resume=auto: run %s continues after epoch %d from %s", run_id, epoch, resumed)
    for epoch in range(start, 0 if stopped else (job.refit_epochs if refit else tc.epochs)):
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
        if rank == 0 and not refit:
            record.update({f"valid_{k}": v for k, v in evaluate(model, job.files["valid"], spec, cfg, device).items()})
            if retrieval is not None:
                record.update({f"valid_{k}": v for k, v in retrieval(model.student, device).items()})
        if rank == 0:
            log.info("epoch %d: %s", epoch, json.dumps(record))
        history.append(record)
        key = _selection_metric(record, cfg.eval.select_k)   # None on ranks > 0: they do not evaluate
        if key is not None and record[key] > best_auc + 1e-4:
            best_auc, best_epoch, since_best = record[key], epoch, 0
        elif key is not None:
            since_best += 1
        stop = bool(tc.early_stopping_patience) and since_best >= tc.early_stopping_patience
        if rank == 0:
            # everything a resumed run needs to go on exactly as this one would (train.resume=auto)
            loop_state = {"history": history, "best_auc": best_auc, "since_best": since_best,
                          "best_epoch": best_epoch, "train_seconds": train_seconds, "stopped": stop}
            path = os.path.join(ckpt_dir, f"epoch_{epoch}.pt")
            save_checkpoint(path, model, optimizer, epoch, step, job,
                            extra={"loop": loop_state, "rng": _rng_state(device)})
            write_run_state(job.out_dir, {"run_id": run_id, "kind": job.kind, "fingerprint": fingerprint,
                                          "last_complete_epoch": epoch, "checkpoint": path, "finished": False})
        # rank 0 decides (it alone evaluates); every rank follows, or the next
        # gradient average would wait forever for the ranks that stopped
        if collective.broadcast_flag(stop):
            break
    result: dict = {}
    if rank == 0:
        selected = epoch
        if tc.restore_best_epoch and best_epoch is not None and best_epoch != epoch:
            # rank 0 alone scores the test split and writes the result: only its weights matter
            best = load_checkpoint(os.path.join(ckpt_dir, f"epoch_{best_epoch}.pt"))
            model.load_state_dict(best["model"])
            selected = best_epoch
        final = os.path.join(ckpt_dir, "last.pt")
        save_checkpoint(final, model, optimizer, selected, step, job)
        # checkpoints/last.pt: the last finished run's model, where jobs/evaluate.py looks
        publish_checkpoint(final, os.path.join(job.out_dir, "checkpoints", "last.pt"))
        result = {
            "kind": job.kind, "checkpoint": final, "history": history, "selected_epoch": selected,
            "train_seconds": train_seconds, "steps": step, "world_size": world,
            "samples_per_second": step * tc.batch_size * world / max(train_seconds, 1e-9),
            "test": evaluate(model, job.files["test"], spec, cfg, device),
        }
        for folder in (ckpt_dir, job.out_dir):   # the run's own, and the training folder's latest
            with open(os.path.join(folder, "metrics.json"), "w") as fh:
                json.dump(result, fh, indent=2)
        write_run_state(job.out_dir, {"run_id": run_id, "kind": job.kind, "fingerprint": fingerprint,
                                      "last_complete_epoch": epoch, "checkpoint": final, "finished": True})
    if world > 1:
        # every process returns rank 0's result: TorchDistributor keeps whichever output
        # file a process wrote last, not necessarily rank 0's
        result = collective.broadcast_object(result)
    return result


def _selection_metric(record: dict, select_k: int) -> Optional[str]:
    """The validation metric that selects epochs: a student's Recall@select_k over the
    catalogue (its embeddings serve retrieval), else the student's AUC, else the teacher's."""
    return next((k for k in (f"valid_student_recall@{select_k}", "valid_student_auc", "valid_teacher_auc")
                 if k in record), None)


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


def save_checkpoint(path: str, model: nn.Module, optimizer, epoch: int, step: int, job: TrainJob,
                    extra: Optional[dict] = None) -> None:
    """Atomic: a reader sees the previous checkpoint or this one, never a torn file.

    Plain data only (tensors, numbers, strings, lists, dicts), so that
    :func:`load_checkpoint` can read it with ``weights_only=True``. ``extra``: an epoch
    checkpoint's loop state and RNG states, for ``train.resume=auto``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
             "kind": job.kind, "spec_json": job.spec_json, "config": job.config, "tags": job.tags, **(extra or {})}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


CHECKPOINT_KEYS = ("model", "kind", "config", "spec_json")


def load_checkpoint(path: str) -> dict:
    """A checkpoint's contents, read with ``weights_only=True`` (tensors and plain data: a
    crafted file cannot run code). A missing, empty, truncated or foreign file is a user
    error naming the file."""
    if not os.path.exists(path):
        raise InputNotFoundError(f"no checkpoint at {path}")
    if os.path.isdir(path):
        raise BadInputError(f"checkpoint {path} is a folder, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BadInputError(f"checkpoint {path} is not loadable as plain data (weights_only=True refused it: "
                             f"it holds other objects, or is not a checkpoint): "
                             f"{' '.join(str(exc).split())[:300]}") from None
    except (EOFError, RuntimeError, OSError, ValueError) as exc:
        size = os.path.getsize(path)
        raise BadInputError(f"checkpoint {path} ({size} bytes) is empty, truncated or not a checkpoint: "
                             f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise BadInputError(f"checkpoint {path} is not a training checkpoint of this project: "
                             f"missing {', '.join(missing)}")
    return ckpt


# ---------------------------------------------------------------- train.resume=auto

RUN_STATE = "run_state.json"


def run_fingerprint(job: TrainJob) -> str:
    """What makes two trainings "the same run": method, conf (train.resume aside), spec and
    the teachers' checkpoints. A resumed run must match the interrupted one on all of them."""
    config = json.loads(json.dumps(job.config, default=str))
    config.get("train", {}).pop("resume", None)
    payload = {"kind": job.kind, "config": config, "spec_json": job.spec_json, "teachers": job.teachers,
               "teacher_checkpoint": job.teacher_checkpoint}
    if job.refit_epochs is not None:   # left out otherwise: fingerprints of earlier runs still match
        payload["refit_epochs"] = job.refit_epochs
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_run_state(out_dir: str) -> Optional[dict]:
    """The run state of ``out_dir`` (None when there is none or it is unreadable)."""
    return read_json_object(os.path.join(out_dir, RUN_STATE), "run state")


def write_run_state(out_dir: str, state: dict) -> None:
    """Atomically: which run last trained in ``out_dir``, its last complete epoch, whether it finished."""
    write_json_atomic(os.path.join(out_dir, RUN_STATE), state)


def resume_point(job: TrainJob, fingerprint: str) -> Optional[str]:
    """The epoch checkpoint ``job`` continues from under ``train.resume=auto``: the last
    complete epoch of the same run (same run id and fingerprint) in ``job.out_dir``; None
    to start from scratch."""
    state = read_run_state(job.out_dir)
    run_id = job.tags.get("run_id")
    if not state or state.get("run_id") != run_id or state.get("last_complete_epoch") is None:
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("train.resume=auto: run %s in %s was trained with another conf, spec or teachers; "
                 "starting from scratch", run_id, job.out_dir)
        return None
    path = os.path.join(job.out_dir, "checkpoints", run_id, f"epoch_{int(state['last_complete_epoch'])}.pt")
    return path if os.path.exists(path) else None


def _rng_state(device) -> dict:
    """Every RNG the loop draws from, as tensors and plain data (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if getattr(device, "type", "cpu") == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and getattr(device, "type", "cpu") == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def publish_checkpoint(src: str, dst: str) -> None:
    """``dst`` becomes a copy of ``src`` (a hard link where possible), atomically."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), suffix=".tmp")
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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

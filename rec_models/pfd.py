"""PFD: Privileged Features Distillation (Xu et al., "Privileged Features Distillation at
Taobao Recommendations", KDD 2020).

A teacher ranks with the public features *and* privileged ones that exist offline only
(here point-in-time user x category statistics, repeated-impression counts); the student
(a DSSM two-tower) sees public features only. Teacher and student share the public
embeddings and train jointly; the student also matches the teacher's soft labels:

    L = BCE(t, y) + BCE(s, y) + alpha(step) * T^2 * BCE(sigma(s/T), stopgrad(sigma(t/T)))
    alpha(step) = alpha * min(1, step / warmup_steps)

The distillation term never trains the teacher (the target is detached inside the loss),
so the teacher learns from labels only while the shared embeddings learn from both.
With a pre-trained teacher (``teacher_frozen=True`` / ``load_teacher``) the BCE(t, y)
term is dropped and the teacher-only parameters are frozen.

Also here: ``StudentOnly`` (the baseline: the same DSSM, BCE only) and ``TeacherOnly``
(the teacher trained alone, for jobs/train_teacher.py). All four expose
``forward(batch) -> {"student"|"teacher": logit}``, ``training_loss(batch, step) ->
(loss, logs)`` and ``loss_from_outputs(outputs, batch, step)`` (the same loss from
``forward``'s outputs, for a DDP-wrapped module whose forward must be the one called).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

from rec_models.config import DistillConf, ModelConf
from rec_models.dssm import DSSM
from rec_models.embeddings import FieldEmbeddings
from rec_models.losses import bce, linear_warmup, soft_label_distillation
from rec_models.spec import FeatureSpec, Role
from rec_models.towers import MLP

Batch = Mapping[str, torch.Tensor]


def label_and_weight(spec: FeatureSpec, batch: Batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    label = batch[spec.label.name]
    weight = batch[spec.weight.name] if spec.weight is not None else None
    return label, weight


class PFDTeacher(nn.Module):
    """Ranking teacher: logit = MLP([public user+item tokens ; privileged + context tokens]).

    ``public`` is the student's FieldEmbeddings object itself (shared, not copied); the
    privileged and context fields get this teacher's own tables (a privileged sequence
    over item ids still reuses the public item-id table).
    """

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, public: FieldEmbeddings):
        super().__init__()
        self.spec = spec
        self.model_conf = model_conf
        self.public = public
        self._public_names = [f.name for f in (*spec.user_features, *spec.item_features)]
        self._public_pos = public.positions(self._public_names)
        extra = spec.by_role(Role.privileged, Role.context)
        self.own = FieldEmbeddings(spec, extra, public.dim, shared=public) if extra else None
        n_fields = len(self._public_names) + (len(extra) if extra else 0)
        self.mlp = MLP(n_fields * public.dim, model_conf.teacher_dims, 1, model_conf.dropout)

    @property
    def input_names(self) -> list[str]:
        return self._public_names + (self.own.names if self.own is not None else [])

    def teacher_only_modules(self) -> list[nn.Module]:
        """Modules not shared with the student (privileged/context tables, the MLP)."""
        return [m for m in (self.own, self.mlp) if m is not None]

    def forward(self, batch: Batch, public_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """logit [B]. ``public_tokens``: ``public.tokens(batch)`` if already computed."""
        if public_tokens is None:
            pub = self.public.tokens(batch, self._public_names)
        else:
            pub = public_tokens[:, self._public_pos]
        parts = [pub.flatten(1)]
        if self.own is not None:
            parts.append(self.own.flat(batch))
        return self.mlp(torch.cat(parts, dim=1)).squeeze(-1)


def _teacher_state(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A PFDTeacher state dict from a path, a PFDTeacher/TeacherOnly state dict, or a
    checkpoint dict holding one under ``state_dict``/``model``."""
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(source, Mapping) and key in source and isinstance(source[key], Mapping):
            source = source[key]
    state = dict(source)
    if any(k.startswith("teacher.") for k in state):  # TeacherOnly / PFDModel layout
        state = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
    return state


class PFDModel(nn.Module):
    """Student (DSSM) + teacher (PFDTeacher) sharing ``student.public_embeddings``."""

    def __init__(
        self,
        spec: FeatureSpec,
        model_conf: ModelConf,
        distill_conf: DistillConf,
        teacher_frozen: bool = False,
    ):
        super().__init__()
        self.spec = spec
        self.distill_conf = distill_conf
        self.student = DSSM(spec, model_conf)
        self.teacher = PFDTeacher(spec, model_conf, self.student.public_embeddings)
        self.teacher_frozen = False
        if teacher_frozen:
            self.freeze_teacher()

    # ---- teacher management ------------------------------------------------------------
    def teacher_only_parameters(self) -> list[nn.Parameter]:
        """Teacher parameters the student does not share (by identity)."""
        shared = {id(p) for p in self.student.parameters()}
        return [p for p in self.teacher.parameters() if id(p) not in shared]

    def freeze_teacher(self) -> None:
        """Stop training the teacher-only parameters; the shared public embeddings stay
        trainable (by the student's losses). Build the optimiser after calling this, over
        ``p for p in model.parameters() if p.requires_grad``."""
        for p in self.teacher_only_parameters():
            p.requires_grad_(False)
        self.teacher_frozen = True
        self.train(self.training)  # puts the teacher-only modules in eval mode (dropout off)

    def load_teacher(self, source, freeze: bool = True) -> None:
        """Load a trained teacher (path, PFDTeacher or TeacherOnly state dict) and freeze it.

        The teacher's public embeddings are loaded into the shared module: they become the
        student's initial public embeddings, and keep training with the student.
        """
        self.teacher.load_state_dict(_teacher_state(source), strict=True)
        if freeze:
            self.freeze_teacher()

    def train(self, mode: bool = True) -> "PFDModel":
        super().train(mode)
        if self.teacher_frozen:
            for m in self.teacher.teacher_only_modules():
                m.eval()
        return self

    # ---- forward and loss --------------------------------------------------------------
    def _logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # shared public tokens looked up once for both models
        tokens = self.student.public_embeddings.tokens(batch)
        student = self.student.logit_from_tokens(tokens)
        if self.teacher_frozen:
            with torch.no_grad():
                teacher = self.teacher(batch, public_tokens=tokens)
        else:
            teacher = self.teacher(batch, public_tokens=tokens)
        return student, teacher

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        student, teacher = self._logits(batch)
        return {"teacher": teacher, "student": student}

    def alpha(self, step: int) -> float:
        return linear_warmup(step, self.distill_conf.warmup_steps, self.distill_conf.alpha)

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = [BCE(t, y) unless frozen] + BCE(s, y) + alpha(step) * distill(s, t)."""
        return self.loss_from_outputs(self(batch), batch, step)

    def loss_from_outputs(self, outputs: dict[str, torch.Tensor], batch: Batch, step: int):
        """The loss of ``training_loss`` from ``forward``'s outputs (call the DDP-wrapped
        module's forward, then this on the unwrapped module)."""
        label, weight = label_and_weight(self.spec, batch)
        student, teacher = outputs["student"], outputs["teacher"]
        loss_student = bce(student, label, weight)
        loss_distill = soft_label_distillation(student, teacher, self.distill_conf.temperature, weight)
        alpha = self.alpha(step)
        loss = loss_student + alpha * loss_distill
        loss_teacher = bce(teacher, label, weight)
        if not self.teacher_frozen:
            loss = loss + loss_teacher
        logs = {
            "loss": loss.item(),
            "loss_student": loss_student.item(),
            "loss_teacher": loss_teacher.item(),
            "loss_distill": loss_distill.item(),
            "alpha": alpha,
        }
        return loss, logs


class StudentOnly(nn.Module):
    """Baseline: the same DSSM student trained on labels only (no teacher); or ``student``,
    any other servable student trained with BCE alone (MVKE)."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, student: Optional[nn.Module] = None):
        super().__init__()
        self.spec = spec
        self.student = DSSM(spec, model_conf) if student is None else student

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"student": self.student(batch)}

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = BCE(s, y)."""
        return self.loss_from_outputs(self(batch), batch, step)

    def loss_from_outputs(self, outputs: dict[str, torch.Tensor], batch: Batch, step: int):
        label, weight = label_and_weight(self.spec, batch)
        loss = bce(outputs["student"], label, weight)
        value = loss.item()
        return loss, {"loss": value, "loss_student": value}


class TeacherOnly(nn.Module):
    """The PFD teacher trained alone (jobs/train_teacher.py). Its state dict loads into
    ``PFDModel.load_teacher`` (its public FieldEmbeddings has the student's layout)."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf):
        super().__init__()
        self.spec = spec
        public = FieldEmbeddings(spec, (*spec.user_features, *spec.item_features), model_conf.embedding_dim)
        self.teacher = PFDTeacher(spec, model_conf, public)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"teacher": self.teacher(batch)}

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = BCE(t, y)."""
        return self.loss_from_outputs(self(batch), batch, step)

    def loss_from_outputs(self, outputs: dict[str, torch.Tensor], batch: Batch, step: int):
        label, weight = label_and_weight(self.spec, batch)
        loss = bce(outputs["teacher"], label, weight)
        value = loss.item()
        return loss, {"loss": value, "loss_teacher": value}


# ---- builders for rec_models.methods -------------------------------------------------------
def build_student_only(spec: FeatureSpec, cfg, teachers) -> StudentOnly:
    return StudentOnly(spec, cfg.model)


def build_teacher_only(spec: FeatureSpec, cfg, teachers) -> TeacherOnly:
    return TeacherOnly(spec, cfg.model)


def build_pfd(spec: FeatureSpec, cfg, teachers) -> PFDModel:
    return PFDModel(spec, cfg.model, cfg.distill)

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

Into a retrieval student (``student.objective`` sampled_softmax or mixed,
``rec_models.objectives``) the teacher's soft label becomes each impression's positive
weight in the student's softmax over the batch's candidates:

    L = [BCE(t, y)] + L_softmax(w) + calibration,  w_r = (1 - alpha(step)) y_r + alpha(step) sigma(t_r / T)

The teacher scores the impression's own (user, item) row only: its privileged columns
(the user's recent statistics in the item's category, past impressions of the pair)
exist for that pair, not for the batch's other candidates. A non-clicked impression the
teacher finds likely becomes a partial positive; a click it finds unlikely weighs less.
With a pre-trained teacher (``teacher_frozen=True`` / ``load_teacher``) the BCE(t, y)
term is dropped and the teacher-only parameters are frozen.

The teacher is ``rec_models.models.pfd_teacher.PFDTeacher``; the baseline, the same DSSM
trained on labels alone, is ``rec_models.models.student_only.StudentOnly`` (method ``dssm``).
``loss_from_outputs(outputs, batch, step)`` is the loss from ``forward``'s outputs, for a
DDP-wrapped module whose forward must be the one called.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rec_models.batch import Batch, label_and_weight
from rec_models.config import DistillConf, ModelConf, StudentConf
from rec_models.distill.base import FrozenTeachers, teacher_state
from rec_models.losses import bce, linear_warmup, soft_label_distillation
from rec_models.objectives import ItemBank, check_soft_share, make_student, soft_positive_weights, student_loss
from rec_models.models.pfd_teacher import PFDTeacher
from rec_models.spec import FeatureSpec


class PFDModel(FrozenTeachers, nn.Module):
    """Student (DSSM) + teacher (PFDTeacher) sharing ``student.public_embeddings``."""

    def __init__(
        self,
        spec: FeatureSpec,
        model_conf: ModelConf,
        distill_conf: DistillConf,
        teacher_frozen: bool = False,
        student_conf: Optional[StudentConf] = None,
    ):
        super().__init__()
        self.spec = spec
        self.distill_conf = distill_conf
        self.student_conf = student_conf or StudentConf(objective="pointwise")
        check_soft_share("distill.alpha", distill_conf.alpha, self.student_conf.objective)
        self.student = make_student(spec, model_conf, self.student_conf)
        self.item_bank: Optional[ItemBank] = None   # given by the training loop for student.objective=mixed
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
        self.teacher.load_state_dict(teacher_state(source), strict=True)
        if freeze:
            self.freeze_teacher()

    def frozen_modules(self) -> list[nn.Module]:
        """The teacher-only modules once frozen (the shared embeddings keep training)."""
        return self.teacher.teacher_only_modules() if self.teacher_frozen else []

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
        """L = [BCE(t, y) unless frozen] + BCE(s, y) + alpha(step) * distill(s, t) (pointwise),
        or [BCE(t, y)] + the student objective with soft positives (softmax objectives)."""
        if self.student_conf.objective == "pointwise":
            return self.loss_from_outputs(self(batch), batch, step)
        label, weight = label_and_weight(self.spec, batch)
        tokens = self.student.public_embeddings.tokens(batch)
        if self.teacher_frozen:
            with torch.no_grad():
                teacher = self.teacher(batch, public_tokens=tokens)
        else:
            teacher = self.teacher(batch, public_tokens=tokens)
        alpha = self.alpha(step)
        positives = soft_positive_weights(label, teacher, alpha, self.distill_conf.temperature)
        loss, logs = student_loss(self.student, self.spec, self.student_conf, batch, positives, self.item_bank, tokens)
        loss_teacher = bce(teacher, label, weight)
        if not self.teacher_frozen:
            loss = loss + loss_teacher
        return loss, {"loss": loss.item(), **logs, "loss_teacher": loss_teacher.item(), "alpha": alpha}

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


def build_pfd(spec: FeatureSpec, cfg, teachers) -> PFDModel:
    return PFDModel(spec, cfg.model, cfg.distill, student_conf=cfg.student)

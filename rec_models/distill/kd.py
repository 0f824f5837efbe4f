"""Knowledge distillation (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural
Network", NIPS 2014 Deep Learning Workshop): the baseline every paper of the survey
compares against. A frozen cross-encoder teacher's softened click probability is a second
target for a DSSM two-tower student; nothing else of the teacher is used.

With one logit per pair the softmax over classes is a Bernoulli: p_t = sigma(t / T),
p_s = sigma(s / T), and Hinton's objective is

    L = (1 - lambda) * BCE(s, y) + lambda * T^2 * mean_w KL( Bern(p_t) || Bern(p_s) )
    KL(p || q) = p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q))

T^2 keeps the soft term's gradient scale independent of T (dKL/ds = (p_s - p_t) / T).
The KL is zero exactly when s == t (unlike the cross-entropy form, which is minimal but
equals the teacher's entropy there); its gradient is the same. The teacher is frozen and
detached: the loss never trains it.

Into a retrieval student (``student.objective`` sampled_softmax or mixed) the teacher
scores each impression's own (user, item) row and its softened probability becomes that
row's positive weight in the student's softmax over the batch's candidates,
w = (1 - lambda) y + lambda sigma(t / T) (``rec_models.objectives.soft_positive_weights``).

This is the worked example of adding a method (docs/architecture.md): this module, its
registry entry in ``rec_models.methods``, ``conf/method/kd.yaml`` and
``tests/test_method_kd.py``.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rec_models.batch import Batch, label_and_weight
from rec_models.config import ModelConf, StudentConf, parse_params
from rec_models.distill.base import FrozenTeachers, cross_teacher, freeze
from rec_models.losses import bce, weighted_mean
from rec_models.objectives import ItemBank, make_student, soft_positive_weights, student_loss
from rec_models.spec import FeatureSpec


# ---- losses: pure functions of tensors -----------------------------------------------------
def bernoulli_kl(student_logit: torch.Tensor, teacher_logit: torch.Tensor, temperature: float = 1.0,
                 weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * mean_w KL( Bern(sigma(t/T)) || Bern(sigma(s/T)) ), computed from logits with
    log-sigmoids (stable for large |logit|); the teacher is detached. >= 0, zero iff s == t."""
    t = float(temperature)
    a, b = teacher_logit.detach() / t, student_logit / t
    p = torch.sigmoid(a)
    kl = p * (F.logsigmoid(a) - F.logsigmoid(b)) + (1 - p) * (F.logsigmoid(-a) - F.logsigmoid(-b))
    return (t * t) * weighted_mean(kl, weight)


def hinton_kd_loss(student_logit: torch.Tensor, teacher_logit: torch.Tensor, label: torch.Tensor,
                   soft_weight: float, temperature: float = 1.0,
                   weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, BCE(s, y), T^2 KL) with L = (1 - lambda) BCE(s, y) + lambda T^2 KL, lambda = ``soft_weight``."""
    hard = bce(student_logit, label, weight)
    soft = bernoulli_kl(student_logit, teacher_logit, temperature, weight)
    return (1.0 - soft_weight) * hard + soft_weight * soft, hard, soft


# ---- model ---------------------------------------------------------------------------------
class KDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    soft_weight: float = Field(0.5, ge=0, le=1)   # lambda: the soft term's share of the loss
    temperature: float = Field(1.0, gt=0)         # T


class KDModel(FrozenTeachers, nn.Module):
    """DSSM student + frozen teacher (heads "student", "teacher"); ``.student`` is served."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, teacher: nn.Module,
                 params: Optional[Mapping] = None, student_conf: Optional[StudentConf] = None):
        super().__init__()
        self.spec = spec
        self.params = parse_params(KDParams, params, "kd")
        self.student_conf = student_conf or StudentConf(objective="pointwise")
        self.student = make_student(spec, model_conf, self.student_conf)
        self.item_bank: Optional[ItemBank] = None   # given by the training loop for student.objective=mixed
        self.teacher = freeze(teacher)   # a submodule: checkpoints hold it, load_trained refills it

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher]

    @torch.no_grad()
    def teacher_logit(self, batch: Batch) -> torch.Tensor:
        return self.teacher(batch)["teacher"]

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"student": self.student(batch), "teacher": self.teacher_logit(batch)}

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = (1 - lambda) BCE(s, y) + lambda T^2 KL(Bern(sigma(t/T)) || Bern(sigma(s/T)))
        (pointwise); the student objective with soft positives w = (1 - lambda) y +
        lambda sigma(t/T) (softmax objectives, as PFD's)."""
        label, weight = label_and_weight(self.spec, batch)
        p = self.params
        if self.student_conf.objective != "pointwise":
            positives = soft_positive_weights(label, self.teacher_logit(batch), p.soft_weight, p.temperature)
            loss, logs = student_loss(self.student, self.spec, self.student_conf, batch, positives, self.item_bank)
            return loss, {"loss": loss.item(), **logs}
        loss, hard, soft = hinton_kd_loss(self.student(batch), self.teacher_logit(batch), label,
                                          p.soft_weight, p.temperature, weight)
        return loss, {"loss": loss.item(), "loss_student": hard.item(), "loss_soft": soft.item()}


def build(spec: FeatureSpec, cfg, teachers: Mapping[str, nn.Module]) -> KDModel:
    """rec_models.methods builder: ``teachers["cross_encoder"]``, frozen here."""
    return KDModel(spec, cfg.model, cross_teacher(teachers, "kd"), cfg.distill.params, cfg.student)

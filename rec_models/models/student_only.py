"""A servable student trained on labels alone: the no-teacher baseline of every
distillation method whose student is a DSSM (method ``dssm``, trained with
``student.objective``: ``rec_models.objectives``), and the training wrapper of students
that need no teacher (MVKE, BCE)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rec_models.batch import Batch, label_and_weight
from rec_models.config import ModelConf, StudentConf
from rec_models.losses import bce
from rec_models.objectives import ItemBank, make_student, student_loss
from rec_models.spec import FeatureSpec


class StudentOnly(nn.Module):
    """Baseline: the DSSM student trained on labels only (no teacher) with the objective of
    ``student_conf`` (default pointwise BCE); or ``student``, any other servable student
    trained with BCE alone (MVKE)."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, student: Optional[nn.Module] = None,
                 student_conf: Optional[StudentConf] = None):
        super().__init__()
        self.spec = spec
        self.student_conf = student_conf if student is None and student_conf is not None else \
            StudentConf(objective="pointwise")
        self.student = make_student(spec, model_conf, self.student_conf) if student is None else student
        self.item_bank: Optional[ItemBank] = None   # given by the training loop for student.objective=mixed

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"student": self.student(batch)}

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = the student objective's loss (BCE(s, y) for pointwise)."""
        if self.student_conf.objective != "pointwise":
            loss, logs = student_loss(self.student, self.spec, self.student_conf, batch, bank=self.item_bank)
            return loss, {"loss": loss.item(), **logs}
        return self.loss_from_outputs(self(batch), batch, step)

    def loss_from_outputs(self, outputs: dict[str, torch.Tensor], batch: Batch, step: int):
        label, weight = label_and_weight(self.spec, batch)
        loss = bce(outputs["student"], label, weight)
        value = loss.item()
        return loss, {"loss": value, "loss_student": value}


def build_student_only(spec: FeatureSpec, cfg, teachers) -> StudentOnly:
    return StudentOnly(spec, cfg.model, student_conf=cfg.student)

"""A servable student trained on labels alone: the no-teacher baseline of every
distillation method whose student is a DSSM (method ``dssm``), and the training wrapper of
students that need no teacher (MVKE)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rec_models.batch import Batch, label_and_weight
from rec_models.config import ModelConf
from rec_models.losses import bce
from rec_models.models.dssm import DSSM
from rec_models.spec import FeatureSpec


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


def build_student_only(spec: FeatureSpec, cfg, teachers) -> StudentOnly:
    return StudentOnly(spec, cfg.model)

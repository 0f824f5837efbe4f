"""The undistilled baselines of the token students: the same student architecture and
``student.objective`` as a distillation method, trained on labels alone (no teacher), so
that a method's gain is measured like for like (``Method.undistilled``).

    method                    student                                   baseline of
    token_dual_encoder        TokenDualEncoder, mean pooling            distilled_dual_encoder, ernie_search
    token_dual_encoder_attn   TokenDualEncoder, attention pooling       virt
    trmd_student              TRMDStudent (``rec_models.distill.trmd``)   trmd

    L = tower_loss(student)   (``rec_models.objectives``: BCE for pointwise; the in-batch
                               softmax of the stored score kind + the calibration BCE for
                               sampled_softmax / mixed)

``distill.params`` are the student's ``DualEncoderParams`` (layers, heads, pooling): keep
them equal to the distilled method's student params (conf/method/<name>.yaml does at the
defaults) for the comparison to hold.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rec_models.batch import Batch
from rec_models.config import StudentConf, parse_params
from rec_models.models.dual_encoder import DualEncoderParams
from rec_models.objectives import ItemBank, make_token_student, tower_loss
from rec_models.spec import FeatureSpec


class TokenStudentOnly(nn.Module):
    """A token student trained on labels only under ``student_conf`` (heads: "student")."""

    def __init__(self, spec: FeatureSpec, student: nn.Module, student_conf: Optional[StudentConf] = None):
        super().__init__()
        self.spec = spec
        self.student = student
        self.student_conf = student_conf or StudentConf(objective="pointwise")
        self.item_bank: Optional[ItemBank] = None   # given by the training loop for student.objective=mixed

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"student": self.student(batch)}

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = tower_loss of the student's stored vectors (module docstring)."""
        u, v = self.student.encode_user(batch), self.student.encode_item(batch)
        loss, logs = tower_loss(self.student, self.spec, self.student_conf, batch, u, v, bank=self.item_bank)
        return loss, {"loss": loss.item(), **logs}


def build_token_dual_encoder(spec: FeatureSpec, cfg, teachers) -> TokenStudentOnly:
    """rec_models.methods builder of ``token_dual_encoder`` / ``token_dual_encoder_attn``."""
    params = parse_params(DualEncoderParams, cfg.distill.params, cfg.distill.method).model_dump()
    return TokenStudentOnly(spec, make_token_student(spec, cfg.model, params, cfg.student), cfg.student)

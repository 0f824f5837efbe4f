"""Distilled-DualEncoder (Wang et al., "Distilled Dual-Encoder Model for Vision-Language
Understanding", arXiv 2021), on feature-field tokens.

As VIRT (``rec_models.distill.virt``): a frozen cross-encoder teaches a ``TokenDualEncoder`` whose
towers never see the other side. Two differences: the attention maps are compared as
distributions (each user token's row over the item tokens sums to 1, so KL rather than
L2), and the student's logit also matches the teacher's soft label.

    A_t = cross-encoder user -> item attention [B, Fu, Fi]          (frozen teacher)
    A_s = softmax_{item tokens}(H_u H_v^T / sqrt(D))                 student, training only
    KL_attn = mean_b mean_{a in user tokens} sum_c A_t[b,a,c] (log A_t[b,a,c] - log A_s[b,a,c])
    L = BCE(s, y) + attn_weight * KL_attn + soft_weight * T^2 * BCE(sigma(s/T), sigma(t/T))

The soft-label term is ``rec_models.losses.soft_label_distillation`` (teacher detached).
Serving is a pure dual encoder: u, v stored, score kind ``dot``.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rec_models.config import ModelConf, parse_params
from rec_models.distill.base import CrossTeacherDistill, cross_teacher, student_params
from rec_models.losses import bce, soft_label_distillation, weighted_mean
from rec_models.models.cross_encoder import CrossEncoder
from rec_models.models.dual_encoder import TokenDualEncoder
from rec_models.spec import FeatureSpec

Batch = Mapping[str, torch.Tensor]
EPS = 1e-12


def attention_kl(student_attention: torch.Tensor, teacher_attention: torch.Tensor,
                 weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(A_t || A_s) per row (user token), averaged over rows and the batch.

    L = mean_w_b[ (1 / Fu) sum_a sum_c P[b,a,c] (log P[b,a,c] - log Q[b,a,c]) ]
        P = stopgrad(A_t), Q = A_s; [..., Fu, Fi] maps whose last axis sums to 1

    >= 0, zero iff Q == P on every row (0 log 0 = 0; log Q clamped at 1e-12). The teacher
    map is detached here: this never trains the teacher.
    """
    p = teacher_attention.detach()
    per_row = (torch.xlogy(p, p) - p * student_attention.clamp_min(EPS).log()).sum(-1)   # [B, Fu]
    return weighted_mean(per_row.mean(-1), weight)


class DistilledDualEncoderParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attn_weight: float = Field(1.0, ge=0)    # weight of KL(A_t || A_s)
    soft_weight: float = Field(1.0, ge=0)    # weight of the soft-label term
    temperature: float = Field(1.0, gt=0)    # soft-label temperature T
    layers: int = Field(1, ge=1)             # student tower transformer layers
    heads: int = Field(2, ge=1)
    pooling: str = Field("mean", pattern="^(mean|attention)$")


class DistilledDualEncoderModel(CrossTeacherDistill):
    """Heads "teacher" (cross-encoder) and "student"; ``.student`` is the servable dual encoder."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, teacher: CrossEncoder,
                 params: Optional[dict] = None):
        p = parse_params(DistilledDualEncoderParams, params, "distilled_dual_encoder")
        student = TokenDualEncoder(spec, model_conf, student_params(p.layers, p.heads, p.pooling))
        super().__init__(spec, teacher, student)
        self.params = p

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = BCE(s, y) + attn_weight * KL(A_t || A_s) + soft_weight * soft_label(s, t; T)."""
        p = self.params
        label, weight = self.label_weight(batch)
        teacher = self.teacher_outputs(batch)
        logit, hu, hv = self.student_pass(batch)
        loss_student = bce(logit, label, weight)
        loss_attn = attention_kl(TokenDualEncoder.virtual_attention(hu, hv), teacher.attention, weight)
        loss_soft = soft_label_distillation(logit, teacher.logit, p.temperature, weight)
        loss = loss_student + p.attn_weight * loss_attn + p.soft_weight * loss_soft
        return loss, {"loss": loss.item(), "loss_student": loss_student.item(),
                      "loss_attn": loss_attn.item(), "loss_soft": loss_soft.item()}


def build(spec: FeatureSpec, cfg, teachers: Mapping[str, nn.Module]) -> DistilledDualEncoderModel:
    return DistilledDualEncoderModel(spec, cfg.model, cross_teacher(teachers, "distilled_dual_encoder"),
                                     cfg.distill.params)

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

Into a retrieval student (``student.objective`` sampled_softmax or mixed,
``rec_models.objectives``) the student is a ``CalibratedTokenDualEncoder``, the hard loss
is the student objective and the paper's logit distillation becomes listwise, as in dense
retrieval: the teacher's scores of a query's candidates are the soft labels of the
student's softmax over the same candidates; the paper's soft label of the pair itself
becomes each impression's positive weight in the softmax, as PFD's does (``pfd``):

    w_r = (1 - soft_weight) y_r + soft_weight sigma(t_r / T)                           soft positives
    L = L_softmax(u, v; tau; w) + calibration_weight * BCE(calibrated(sg <u, v>), y)   tower_loss
      + attn_weight * KL_attn                                                           own rows
      + listwise_weight * mean_q KL( softmax_j(t_qj / T') || softmax_j(<u_q, v_j> / tau) )  candidates

What the teacher scores: each impression's own (user, item) row, privileged columns
included, for the attention maps A_t and the soft positive t_r; and the listwise term's
candidates of each clicked row q, its positive and M - 1 other items of the batch
(``rec_models.distill.listwise``: pair inputs, neutral privileged columns, cost Q x M
teacher passes). Under the softmax objectives ``soft_weight`` lies in [0, 1] (it mixes the
click and the soft label; 0: hard positives only) and the calibrated logit is trained by
its own BCE on the clicks.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from pydantic import ConfigDict, Field
from torch import nn

from rec_models.config import ModelConf, StudentConf, parse_params
from rec_models.distill.base import CrossTeacherDistill, cross_teacher, student_params
from rec_models.distill.listwise import ListwiseParams, ListwiseTargets
from rec_models.losses import bce, soft_label_distillation, weighted_mean
from rec_models.models.cross_encoder import CrossEncoder
from rec_models.models.dual_encoder import TokenDualEncoder
from rec_models.objectives import (ItemBank, check_soft_share, make_token_student, soft_positive_weights,
                                  tower_loss)
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


class DistilledDualEncoderParams(ListwiseParams):
    """listwise_*: the listwise term of the softmax objectives (``ListwiseParams``)."""
    model_config = ConfigDict(extra="forbid")
    listwise_weight: float = Field(0.0, ge=0)   # off: it lowered valid Recall@50 (docs/results.md 5.4)
    attn_weight: float = Field(1.0, ge=0)    # weight of KL(A_t || A_s)
    soft_weight: float = Field(1.0, ge=0)    # soft-label term: its weight (pointwise), its share of w_r (softmax)
    temperature: float = Field(1.0, gt=0)    # soft-label temperature T
    layers: int = Field(1, ge=1)             # student tower transformer layers
    heads: int = Field(2, ge=1)
    pooling: str = Field("mean", pattern="^(mean|attention)$")

    def student_params(self) -> dict:
        """The student's ``DualEncoderParams`` (its undistilled baseline: method
        ``token_dual_encoder``, or ``token_dual_encoder_attn`` with attention pooling)."""
        return student_params(self.layers, self.heads, self.pooling)


class DistilledDualEncoderModel(CrossTeacherDistill):
    """Heads "teacher" (cross-encoder) and "student"; ``.student`` is the servable dual encoder."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, teacher: CrossEncoder,
                 params: Optional[dict] = None, student_conf: Optional[StudentConf] = None):
        p = parse_params(DistilledDualEncoderParams, params, "distilled_dual_encoder")
        conf = student_conf or StudentConf(objective="pointwise")
        check_soft_share("distill.params.soft_weight", p.soft_weight, conf.objective)
        super().__init__(spec, teacher, make_token_student(spec, model_conf, p.student_params(), conf))
        self.params = p
        self.student_conf = conf
        self.item_bank: Optional[ItemBank] = None   # given by the training loop for student.objective=mixed

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = BCE(s, y) + attn_weight * KL(A_t || A_s) + soft_weight * soft_label(s, t; T)
        (pointwise); the student objective with soft positives + attn_weight * KL(A_t || A_s)
        + listwise_weight * L_listwise (softmax objectives: module docstring)."""
        p, st, conf = self.params, self.student, self.student_conf
        label, weight = self.label_weight(batch)
        teacher = self.teacher_outputs(batch)
        hu, hv = st.user_states(batch), st.item_states(batch)
        u, v = st.user_vector(hu), st.item_vector(hv)
        loss_attn = attention_kl(TokenDualEncoder.virtual_attention(hu, hv), teacher.attention, weight)
        if conf.objective == "pointwise":
            logit = st.score(u, v)
            loss_student = bce(logit, label, weight)
            loss_soft = soft_label_distillation(logit, teacher.logit, p.temperature, weight)
            loss = loss_student + p.attn_weight * loss_attn + p.soft_weight * loss_soft
            return loss, {"loss": loss.item(), "loss_student": loss_student.item(),
                          "loss_attn": loss_attn.item(), "loss_soft": loss_soft.item()}
        positives = soft_positive_weights(label, teacher.logit, p.soft_weight, p.temperature)
        loss_student, logs = tower_loss(st, self.spec, conf, batch, u, v, positives, bank=self.item_bank)
        loss = loss_student + p.attn_weight * loss_attn
        loss_listwise = torch.zeros(())
        if p.listwise_weight > 0:   # Q x M teacher passes, skipped when the term is off
            loss_listwise = ListwiseTargets.of_batch(self.teacher, self.spec, batch, p).kl(
                st.score_kind, u, v, conf.temperature)
            loss = loss + p.listwise_weight * loss_listwise
        return loss, {"loss": loss.item(), **logs, "loss_attn": loss_attn.item(),
                      "loss_listwise": loss_listwise.item()}


def build(spec: FeatureSpec, cfg, teachers: Mapping[str, nn.Module]) -> DistilledDualEncoderModel:
    return DistilledDualEncoderModel(spec, cfg.model, cross_teacher(teachers, "distilled_dual_encoder"),
                                     cfg.distill.params, cfg.student)

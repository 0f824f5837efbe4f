"""VIRT (Li et al., "VIRT: Improving Representation-based Models for Text Matching through
Virtual Interaction", arXiv 2021), on feature-field tokens.

Teacher: the frozen cross-encoder. Its last layer's user -> item attention block
A_t [B, Fu, Fi] (heads averaged, rows renormalised to sum to 1) is the interaction that
a two-tower model cannot compute. Student: ``TokenDualEncoder`` with attention pooling
(VIRT's attention-weighted representation of the last layer's states).

    H_u = Enc_u(tokens_u),  H_v = Enc_v(tokens_v)                 towers, each side alone
    A_s = softmax_{item tokens}(H_u H_v^T / sqrt(D))   [B, Fu, Fi] virtual attention (training only)
    u = normalize(W_u sum_f a_f H_u[f]),  a = softmax_f(<q_u, H_u[f]> / sqrt(D))    (same for v)
    s = exp(log_s) <u, v> + b
    L = BCE(s, y) + attn_weight * mean_b || A_s[b] - A_t[b] ||_F^2

Into a retrieval student (``student.objective`` sampled_softmax or mixed,
``rec_models.objectives``) the student is a ``CalibratedTokenDualEncoder`` and

    L = L_softmax(u, v; tau) + calibration_weight * BCE(calibrated(sg <u, v>), y)     tower_loss
      + attn_weight * mean_b || A_s[b] - A_t[b] ||_F^2                                own rows
      + listwise_weight * mean_q KL( softmax_j(t_qj / T) || softmax_j(<u_q, v_j> / tau) )  candidates

What the teacher scores: its attention map A_t is computed on each impression's own
(user, item) row (with its privileged columns), as in the pointwise loss; for the listwise
term it scores the in-batch candidates of each clicked row q (its positive and M - 1 other
items of the batch, at most ``listwise_queries`` queries: ``rec_models.distill.listwise``,
which also says how the pair inputs are built and what they cost). The student's
distribution over those candidates is the retrieval softmax's (<u, v> / tau).

The virtual attention exists at training time only: it lets the towers learn states whose
dot products reproduce the teacher's cross attention, so the interaction knowledge is
baked into each side's representation. Serving is a pure dual encoder (score kind ``dot``).
The paper distils every layer's attention; the student here has its own (usually
shallower) stack, so only the last layer's states are aligned with the teacher's last layer.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import ConfigDict, Field

from rec_models.batch import Batch
from rec_models.config import ModelConf, StudentConf, parse_params
from rec_models.distill.base import CrossTeacherDistill, cross_teacher, student_params
from rec_models.distill.listwise import ListwiseParams, ListwiseTargets
from rec_models.losses import bce, weighted_mean
from rec_models.models.cross_encoder import CrossEncoder
from rec_models.models.dual_encoder import TokenDualEncoder
from rec_models.objectives import ItemBank, make_token_student, tower_loss
from rec_models.spec import FeatureSpec


# ---- losses ------------------------------------------------------------------------------
def attention_l2(student_attention: torch.Tensor, teacher_attention: torch.Tensor,
                 weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """VIRT's attention distillation: squared Frobenius distance, mean over the batch.

    L = mean_w_b[ sum_{a, c} (A_s[b, a, c] - stopgrad(A_t[b, a, c]))^2 ]      A: [B, Fu, Fi]

    Zero iff A_s == A_t; the teacher map is detached here, so this never trains the teacher.
    """
    diff = student_attention - teacher_attention.detach()
    return weighted_mean(diff.pow(2).sum((-2, -1)), weight)


# ---- VIRT --------------------------------------------------------------------------------
class VIRTParams(ListwiseParams):
    """listwise_*: the listwise term of the softmax objectives (``ListwiseParams``)."""
    model_config = ConfigDict(extra="forbid")
    attn_weight: float = Field(1.0, ge=0)   # weight of the attention L2 term
    layers: int = Field(1, ge=1)            # student tower transformer layers
    heads: int = Field(2, ge=1)

    def student_params(self) -> dict:
        """The student's ``DualEncoderParams``: attention pooling, VIRT's attention-weighted
        representation (its undistilled baseline: method ``token_dual_encoder_attn``)."""
        return student_params(self.layers, self.heads, "attention")


class VIRTModel(CrossTeacherDistill):
    """Heads "teacher" (cross-encoder) and "student"; ``.student`` is the servable dual encoder."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, teacher: CrossEncoder,
                 params: Optional[dict] = None, student_conf: Optional[StudentConf] = None):
        p = parse_params(VIRTParams, params, "virt")
        conf = student_conf or StudentConf(objective="pointwise")
        super().__init__(spec, teacher, make_token_student(spec, model_conf, p.student_params(), conf))
        self.params = p
        self.student_conf = conf
        self.item_bank: Optional[ItemBank] = None   # given by the training loop for student.objective=mixed

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = BCE(s, y) + attn_weight * attention_l2(A_s, A_t) (pointwise); the student
        objective + attn_weight * attention_l2 + listwise_weight * L_listwise (softmax
        objectives: module docstring)."""
        p, st, conf = self.params, self.student, self.student_conf
        label, weight = self.label_weight(batch)
        teacher = self.teacher_outputs(batch)
        hu, hv = st.user_states(batch), st.item_states(batch)
        u, v = st.user_vector(hu), st.item_vector(hv)
        loss_attn = attention_l2(TokenDualEncoder.virtual_attention(hu, hv), teacher.attention, weight)
        if conf.objective == "pointwise":
            loss_student = bce(st.score(u, v), label, weight)
            loss = loss_student + p.attn_weight * loss_attn
            return loss, {"loss": loss.item(), "loss_student": loss_student.item(), "loss_attn": loss_attn.item()}
        loss_student, logs = tower_loss(st, self.spec, conf, batch, u, v, bank=self.item_bank)
        loss_listwise = ListwiseTargets.of_batch(self.teacher, self.spec, batch, p).kl(
            st.score_kind, u, v, conf.temperature)
        loss = loss_student + p.attn_weight * loss_attn + p.listwise_weight * loss_listwise
        return loss, {"loss": loss.item(), **logs, "loss_attn": loss_attn.item(),
                      "loss_listwise": loss_listwise.item()}


def build(spec: FeatureSpec, cfg, teachers) -> VIRTModel:
    return VIRTModel(spec, cfg.model, cross_teacher(teachers, "virt"), cfg.distill.params, cfg.student)

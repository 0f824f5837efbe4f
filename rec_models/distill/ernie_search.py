"""ERNIE-Search (Lu et al., "ERNIE-Search: Bridging Cross-Encoder with Dual-Encoder via Self
On-the-fly Distillation for Dense Passage Retrieval", arXiv 2022), on feature-field tokens.

A cascade trained on the fly, in one model and one optimiser:

    cross-encoder (frozen, trained before)  ->  ColBERT (trained here)  ->  dual encoder (trained here)

The late-interaction ColBERT sits between the two: it keeps token vectors per side (so
it can follow the cross-encoder's token-level attention) yet is itself a two-tower
model (so the dual encoder can follow it closely). Notation: t, A_t the cross-encoder's
logit and user -> item attention [B, Fu, Fi]; E_u [B, Fu, d], E_v [B, Fi, d] ColBERT's unit
token vectors, c its logit; u, v the student's unit vectors, s its logit, H_u, H_v its
tower states; sg = stop-gradient.

Stage 1, ColBERT learns from the labels and the cross-encoder:
    A_c = ColBERT.interaction(E_u, E_v) = softmax_{item tokens}(sqrt(d) E_u E_v^T)
    L_C = BCE(c, y) + colbert_soft_weight * SL(c, t) + colbert_attn_weight * KL(A_t || A_c)

Stage 2, the dual encoder learns from the labels and sg(ColBERT):
    A_s  = softmax_{item tokens}(H_u H_v^T / sqrt(D))                        virtual attention
    u_c  = normalize(mean_a E_u[a]),  v_c = normalize(mean_b E_v[b])          (same size as u, v)
    S_c[i, j] = exp(log_s_c) * late(E_u[i], E_v[j]) / Fu + b_c                ColBERT's in-batch logits
    S_s[i, j] = exp(log_s_s) * <u_i, v_j> + b_s                               student's in-batch logits
    L_S = BCE(s, y)
        + alpha(step) * ( logit_weight * SL(s, sg c)                              logit
                        + rep_weight   * (||u - sg u_c||^2 + ||v - sg v_c||^2)    representation
                        + attn_weight  * KL(sg A_c || A_s)                        attention
                        + dist_weight  * T^2 KL(P_c || P_s) )                     distribution
      P(j | i) = softmax_j(S[i, j] / T) over the batch's items, per user row i
      alpha(step) = min(1, step / warmup_steps) (1 without warm-up)

    L = L_C + L_S

Into a retrieval student (``student.objective`` sampled_softmax or mixed,
``rec_models.objectives``) the dual encoder is a ``CalibratedTokenDualEncoder`` and every
score distillation is listwise, as in the paper's dense retrieval setting; the ColBERT
keeps its labels' BCE (its own logit is reported as head "colbert"):

    L_C = BCE(c, y) + colbert_soft_weight * SL(c, t) + colbert_attn_weight * KL(A_t || A_c)
        + listwise_weight * mean_q KL( softmax_j(t_qj / T_l) || softmax_j(c_qj / T_l) )
    L_S = L_softmax(u, v; tau) + calibration_weight * BCE(calibrated(sg <u, v>), y)       tower_loss
        + alpha(step) * ( rep_weight  * (||u - sg u_c||^2 + ||v - sg v_c||^2)
                        + attn_weight * KL(sg A_c || A_s)
                        + dist_weight * mean_w_i KL( softmax_j(S_c[i, j] / T) || softmax_j(<u_i, v_j> / tau) )
                        + listwise_weight * mean_q KL( softmax_j(t_qj / T_l) || softmax_j(<u_q, v_j> / tau) ) )

What the teachers score: the cross-encoder scores each impression's own row (SL(c, t)
and A_t for the ColBERT, privileged columns included) and, for the listwise terms, the
candidates of each clicked row q: its positive and M - 1 other items of the batch
(``rec_models.distill.listwise``: pair inputs, neutral privileged columns, Q x M teacher
passes; T_l = ``listwise_temperature``); those scores teach the ColBERT (c_qj its logit of
the same pairs) and the dual encoder directly. The ColBERT, a two-tower model, scores every
row i against every distinct item j of the batch (S_c, its logits), which teaches the
dual encoder's retrieval distribution over the same items (dist). The pointwise
logit term SL(s, sg c) is not added under the softmax objectives (the calibrated logit
learns from its own BCE only).

SL is ``rec_models.losses.soft_label_distillation`` at temperature T; KL on attention is
``rec_models.distill.distilled_dual_encoder.attention_kl`` (row-wise, mean over user tokens and
batch). Every auxiliary loss detaches its teacher argument: the student never trains the
ColBERT, the ColBERT never trains the cross-encoder. ``.student`` is the final dual
encoder alone (score kind ``dot``); forward also reports heads "teacher" (cross-encoder)
and "colbert" (the intermediate).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from rec_models.batch import item_ids
from rec_models.config import ModelConf, StudentConf, parse_params
from rec_models.distill.base import CrossTeacherDistill, cross_teacher, student_params
from rec_models.distill.distilled_dual_encoder import attention_kl
from rec_models.distill.listwise import ListwiseParams, ListwiseTargets, candidate_scores, listwise_kl
from rec_models.losses import bce, in_batch_candidates, linear_warmup, soft_label_distillation, weighted_mean
from rec_models.models.colbert import ColBERT
from rec_models.models.cross_encoder import CrossEncoder
from rec_models.models.dual_encoder import TokenDualEncoder
from rec_models.objectives import ItemBank, make_token_student, tower_loss
from rec_models.serving.scoring import score_all
from rec_models.spec import FeatureSpec

Batch = Mapping[str, torch.Tensor]

__all__ = ["attention_kl", "representation_mse", "in_batch_distribution_kl", "mean_token_vector",
           "ErnieSearchParams", "ErnieSearchModel", "build"]


# ---- losses ------------------------------------------------------------------------------
def representation_mse(student: torch.Tensor, teacher: torch.Tensor,
                       weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Representation alignment: squared L2 distance of the vectors, mean over the batch.

    L = mean_w_b || x_s[b] - stopgrad(x_t[b]) ||^2          x: [B, d]

    Zero iff x_s == x_t (for unit vectors it is 2 - 2 cos); the teacher is detached.
    """
    return weighted_mean((student - teacher.detach()).pow(2).sum(-1), weight)


def in_batch_distribution_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                             temperature: float = 1.0, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL between in-batch distributions over items, per user row.

    P_t(j | i) = softmax_j(stopgrad(S_t[i, j]) / T),  P_s(j | i) = softmax_j(S_s[i, j] / T)   S: [B, B]
    L = T^2 * mean_w_i sum_j P_t(j | i) (log P_t(j | i) - log P_s(j | i))

    >= 0, zero iff each row of S_s equals the row of S_t up to a constant (softmax ignores a
    shift: a common bias cancels). T^2 keeps the gradient scale independent of T (Hinton
    et al. 2015). ``weight``: the weight of each user row.
    """
    t = float(temperature)
    log_p = F.log_softmax(teacher_scores.detach() / t, dim=-1)
    log_q = F.log_softmax(student_scores / t, dim=-1)
    per_row = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (t * t) * weighted_mean(per_row, weight)


def mean_token_vector(tokens: torch.Tensor) -> torch.Tensor:
    """normalize(mean_a E[a]): one unit vector [B, d] from token vectors [B, T, d]."""
    return F.normalize(tokens.mean(1), dim=-1)


# ---- model -------------------------------------------------------------------------------
class ErnieSearchParams(ListwiseParams):
    """listwise_*: the listwise terms of the softmax objectives (``ListwiseParams``)."""
    model_config = ConfigDict(extra="forbid")
    # stage 1: cross-encoder -> ColBERT
    colbert_soft_weight: float = Field(1.0, ge=0)   # SL(c, t)
    colbert_attn_weight: float = Field(1.0, ge=0)   # KL(A_t || A_c)
    # stage 2: ColBERT -> dual encoder
    logit_weight: float = Field(1.0, ge=0)          # SL(s, c)
    rep_weight: float = Field(1.0, ge=0)            # ||u - u_c||^2 + ||v - v_c||^2
    attn_weight: float = Field(1.0, ge=0)           # KL(A_c || A_s)
    dist_weight: float = Field(1.0, ge=0)           # T^2 KL(P_c || P_s)
    temperature: float = Field(1.0, gt=0)           # T of the soft labels and the in-batch distributions
    warmup_steps: int = Field(0, ge=0)              # linear warm-up of the stage-2 auxiliary losses
    # architectures
    layers: int = Field(1, ge=1)                    # student towers
    heads: int = Field(2, ge=1)
    pooling: str = Field("mean", pattern="^(mean|attention)$")
    colbert_layers: int = Field(1, ge=1)            # intermediate ColBERT towers
    colbert_heads: int = Field(2, ge=1)

    def student_params(self) -> dict:
        """The dual encoder's ``DualEncoderParams`` (its undistilled baseline: method
        ``token_dual_encoder``, or ``token_dual_encoder_attn`` with attention pooling)."""
        return student_params(self.layers, self.heads, self.pooling)


def _freeze_colbert_unused(colbert: ColBERT) -> ColBERT:
    """ColBERT scores with its token projection; the inherited pooling query and pooled
    projections are never read: frozen, so every trainable parameter gets a gradient
    (DistributedDataParallel requires it)."""
    for module in (colbert.user_proj, colbert.item_proj):
        module.requires_grad_(False)
    colbert.user_query.requires_grad_(False)
    colbert.item_query.requires_grad_(False)
    return colbert


class ErnieSearchModel(CrossTeacherDistill):
    """Heads "teacher" (cross-encoder), "colbert" (intermediate), "student" (dual encoder);
    ``.student`` is the servable dual encoder, ``.colbert`` the intermediate model."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, teacher: CrossEncoder,
                 params: Optional[dict] = None, student_conf: Optional[StudentConf] = None):
        p = parse_params(ErnieSearchParams, params, "ernie_search")
        conf = student_conf or StudentConf(objective="pointwise")
        super().__init__(spec, teacher, make_token_student(spec, model_conf, p.student_params(), conf))
        self.params = p
        self.student_conf = conf
        self.item_bank: Optional[ItemBank] = None   # given by the training loop for student.objective=mixed
        self.colbert = _freeze_colbert_unused(
            ColBERT(spec, model_conf, student_params(p.colbert_layers, p.colbert_heads, "mean")))

    def colbert_logit_matrix(self, eu: torch.Tensor, ev: torch.Tensor) -> torch.Tensor:
        """S_c [U, I]: ColBERT's logit of every user row with every item row (diagonal: its logits)."""
        c = self.colbert
        return c.log_scale.exp() * score_all(c.score_kind, eu, ev) / c.n_user_tokens + c.bias

    def student_logit_matrix(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """S_s [U, I]: the student's logit of every user row with every item row."""
        s = self.student
        return s.log_scale.exp() * score_all(s.score_kind, u, v) + s.bias

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"teacher": self.teacher_outputs(batch).logit, "colbert": self.colbert(batch),
                "student": self.student(batch)}

    def alpha(self, step: int) -> float:
        return linear_warmup(step, self.params.warmup_steps, 1.0)

    def losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Every term; "colbert" = L_C and "student" = L_S (their sum is the training loss)."""
        p = self.params
        label, weight = self.label_weight(batch)
        teacher = self.teacher_outputs(batch)

        # stage 1: the intermediate ColBERT, taught by the frozen cross-encoder
        col = self.colbert
        eu, ev = col.user_token_vectors(col.user_states(batch)), col.item_token_vectors(col.item_states(batch))
        c_logit = col.score(eu, ev)
        a_c = col.interaction(eu, ev)
        out = {"colbert_hard": bce(c_logit, label, weight),
               "colbert_soft": soft_label_distillation(c_logit, teacher.logit, p.temperature, weight),
               "colbert_attn": attention_kl(a_c, teacher.attention, weight)}
        out["colbert"] = (out["colbert_hard"] + p.colbert_soft_weight * out["colbert_soft"]
                          + p.colbert_attn_weight * out["colbert_attn"])

        if self.student_conf.objective != "pointwise":
            return self._retrieval_losses(batch, step, out, eu, ev, a_c)

        # stage 2: the dual encoder, taught by the ColBERT (each loss detaches it)
        st = self.student
        hu, hv = st.user_states(batch), st.item_states(batch)
        u, v = st.user_vector(hu), st.item_vector(hv)
        s_logit = st.score(u, v)
        out["student_hard"] = bce(s_logit, label, weight)
        out["logit"] = soft_label_distillation(s_logit, c_logit, p.temperature, weight)
        out["rep"] = (representation_mse(u, mean_token_vector(eu), weight)
                      + representation_mse(v, mean_token_vector(ev), weight))
        out["attn"] = attention_kl(TokenDualEncoder.virtual_attention(hu, hv), a_c, weight)
        out["dist"] = in_batch_distribution_kl(self.student_logit_matrix(u, v), self.colbert_logit_matrix(eu, ev),
                                               p.temperature, weight)
        aux = (p.logit_weight * out["logit"] + p.rep_weight * out["rep"]
               + p.attn_weight * out["attn"] + p.dist_weight * out["dist"])
        out["student"] = out["student_hard"] + self.alpha(step) * aux
        return out

    def _retrieval_losses(self, batch: Batch, step: int, out: dict[str, torch.Tensor], eu: torch.Tensor,
                          ev: torch.Tensor, a_c: torch.Tensor) -> dict[str, torch.Tensor]:
        """``losses`` under the softmax objectives (module docstring), from stage 1's terms
        ``out`` and the ColBERT's token vectors and attention."""
        p, st, conf, col = self.params, self.student, self.student_conf, self.colbert
        _, weight = self.label_weight(batch)
        targets = ListwiseTargets.of_batch(self.teacher, self.spec, batch, p)
        # stage 1 + listwise: the ColBERT's logits c_qj of the teacher's candidates
        if targets.empty:
            out["colbert_listwise"] = (eu.sum() + ev.sum()) * 0.0
        else:
            late = candidate_scores(col.score_kind, eu, ev, targets.queries, targets.cand)
            c_scores = col.log_scale.exp() * late / col.n_user_tokens + col.bias
            out["colbert_listwise"] = listwise_kl(c_scores, targets.teacher_scores, p.listwise_temperature,
                                                  p.listwise_temperature, targets.weight)
        out["colbert"] = out["colbert"] + p.listwise_weight * out["colbert_listwise"]

        # stage 2: the retrieval student, taught by the ColBERT (detached) and the cross-encoder
        hu, hv = st.user_states(batch), st.item_states(batch)
        u, v = st.user_vector(hu), st.item_vector(hv)
        out["student_hard"], _ = tower_loss(st, self.spec, conf, batch, u, v, bank=self.item_bank)
        out["rep"] = (representation_mse(u, mean_token_vector(eu), weight)
                      + representation_mse(v, mean_token_vector(ev), weight))
        out["attn"] = attention_kl(TokenDualEncoder.virtual_attention(hu, hv), a_c, weight)
        first, _, _ = in_batch_candidates(item_ids(self.spec, batch))   # the batch's distinct items
        out["dist"] = listwise_kl(score_all(st.score_kind, u, v[first]),
                                  self.colbert_logit_matrix(eu, ev[first]), conf.temperature, p.temperature, weight)
        out["listwise"] = targets.kl(st.score_kind, u, v, conf.temperature)
        aux = (p.rep_weight * out["rep"] + p.attn_weight * out["attn"] + p.dist_weight * out["dist"]
               + p.listwise_weight * out["listwise"])
        out["student"] = out["student_hard"] + self.alpha(step) * aux
        return out

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = L_C + L_S (module docstring)."""
        out = self.losses(batch, step)
        loss = out["colbert"] + out["student"]
        logs = {"loss": loss.item(), "alpha": self.alpha(step)}
        logs.update({f"loss_{k}": v.item() for k, v in out.items()})
        return loss, logs


def build(spec: FeatureSpec, cfg, teachers: Mapping[str, nn.Module]) -> ErnieSearchModel:
    return ErnieSearchModel(spec, cfg.model, cross_teacher(teachers, "ernie_search"), cfg.distill.params,
                            cfg.student)

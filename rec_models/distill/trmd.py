"""TRMD (Choi et al., "Improving Bi-Encoder Document Ranking Models with Two Rankers and
Multi-Teacher Distillation", SIGIR 2021): a two-tower student with two rankers, each
taught by its own frozen teacher, whose scores are summed.

Student (``TRMDStudent``, token-level towers as in ``TokenDualEncoder``; each side alone):

    H_u = Enc_u(tokens_u) [B, Fu, D],  H_v = Enc_v(tokens_v) [B, Fi, D]
    CLS head:  u_0 = normalize(W_u pool(H_u)),  v_0 = normalize(W_v pool(H_v))     [B, d]
    REP head:  E_u = normalize(W H_u) [B, Fu, d],  E_v = normalize(W H_v) [B, Fi, d]  (ColBERT's)
    score   = <u_0, v_0> + (1/Fu) sum_a max_b <E_u[a], E_v[b]>
    logit   = s * score + b      (s = exp(log_s) > 0)

Stored vectors (score kind ``dot+late``): encode_user = [u_0 ; E_u / sqrt(Fu)] [B, 1 + Fu, d],
encode_item = [v_0 ; E_v / sqrt(Fu)] [B, 1 + Fi, d]; scaling both token sets by 1/sqrt(Fu)
turns the stored late-interaction sum into the mean over user tokens (both rankers then
score in [-1, 1]), so ``scoring.score_pairs("dot+late", u, v) == score`` exactly.

Teachers (frozen, never optimised): the cross-encoder (its logit t_ce: CLS-level) and
ColBERT (its unit-norm token vectors T_u = teacher.encode_user, T_v = teacher.encode_item).

    L = BCE(logit, y)
      + cls_weight * T^2 * BCE(sigma(z_cls / T), sigma(t_ce / T))       z_cls = s_c <u_0, v_0> + b_c
      + rep_weight * L_rep
    L_rep = mean_{b,a,k} (E_u - T_u)^2 + mean_{b,c,k} (E_v - T_v)^2

What the REP head aligns, and why: the student's unit-norm *token vectors* E_u, E_v, with
the ColBERT teacher's unit-norm token vectors (same spec -> same tokens in the same order,
same output_dim), not its score. These vectors are exactly what ColBERT's late
interaction scores, so matching them transfers the teacher's token-level geometry
(Fu + Fi targets per pair instead of one scalar), and when they match, the REP ranker's
score equals the teacher's normalised late-interaction score. The CLS head is a single
vector per side, which has no token-level counterpart in the cross-encoder; it learns the
cross-encoder's *score* instead (soft labels through its own training-only scale s_c and
bias b_c, since the cross-encoder's logit has its own range).

Into a retrieval student (``student.objective`` sampled_softmax or mixed,
``rec_models.objectives``). The retrieval vectors are what the tables store,
encode_user = [u_0 ; E_u / sqrt(Fu)] and encode_item = [v_0 ; E_v / sqrt(Fu)], and the
retrieval score is the stored score kind ``dot+late``, the two rankers summed:
score(u, v) = <u_0, v_0> + (1/Fu) sum_a max_b <E_u[a], E_v[b]>, in [-2, 2]. TRMD is not a
single-vector dot-product student, so its in-batch softmax ranks the candidates by that
very score (``objectives.softmax_loss_of_kind("dot+late")``): the training softmax and the
tables rank the same way. The student is a ``CalibratedTRMDStudent`` (same towers and
stored vectors, logit calibrated on running statistics of that score), and

    L = L_softmax(score; tau) + calibration_weight * BCE(calibrated(sg score), y)          tower_loss
      + listwise_weight * mean_q KL( softmax_j(t_qj / T_l) || softmax_j(<u_q0, v_j0> / tau) )   CLS head
      + rep_weight * L_rep                                                                  REP head

Each head keeps its own teacher, as in the paper: the cross-encoder scores the candidates
of each clicked row q (its positive and M - 1 other items of the batch;
``rec_models.distill.listwise``: pair inputs, neutral privileged columns, Q x M teacher
passes, T_l = ``listwise_temperature``) and teaches the CLS ranker's distribution over
them; ColBERT's token vectors of each impression's own row teach the REP head (L_rep,
unchanged). The pointwise CLS term (``cls_weight``, ``temperature``) and its training-only
scale and bias are not used under the softmax objectives (frozen there, so every
trainable parameter still gets a gradient).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from rec_models.batch import Batch, label_and_weight
from rec_models.config import ModelConf, StudentConf, parse_params
from rec_models.distill.base import FrozenTeachers, freeze
from rec_models.distill.listwise import ListwiseParams, ListwiseTargets
from rec_models.layers.calibration import RunningCalibration
from rec_models.layers.tokens import PublicTokens
from rec_models.losses import bce, soft_label_distillation
from rec_models.models.dual_encoder import DualEncoderParams, TokenDualEncoder
from rec_models.models.token_baselines import TokenStudentOnly
from rec_models.objectives import SOFTMAX_OBJECTIVES, ItemBank, tower_loss
from rec_models.serving.scoring import score_pairs
from rec_models.spec import FeatureSpec

INIT_SCALE = 4.0   # score in [-2, 2] -> initial logits in [-8, 8], as the other students


# ---- losses: pure functions of tensors ---------------------------------------------------
def token_mse(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """mean_{b, a, k} (S[b, a, k] - T[b, a, k])^2 over [B, F, d] token vectors; T detached."""
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f"student token vectors {tuple(student_tokens.shape)} and teacher's "
                         f"{tuple(teacher_tokens.shape)} differ: same spec and output_dim needed")
    return F.mse_loss(student_tokens, teacher_tokens.detach())


def rep_alignment_loss(student_user: torch.Tensor, student_item: torch.Tensor,
                       teacher_user: torch.Tensor, teacher_item: torch.Tensor) -> torch.Tensor:
    """L_rep = mean (E_u - T_u)^2 + mean (E_v - T_v)^2 (``token_mse`` per side): zero iff
    the student's token vectors equal the ColBERT teacher's; never trains the teacher."""
    return token_mse(student_user, teacher_user) + token_mse(student_item, teacher_item)


def cls_distillation_loss(cls_logit: torch.Tensor, teacher_logit: torch.Tensor, temperature: float = 1.0,
                          weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_cls = T^2 * mean_w BCE( sigma(z_cls / T), stopgrad(sigma(t_ce / T)) )
    (``rec_models.losses.soft_label_distillation``): gradient zero where z_cls == t_ce."""
    return soft_label_distillation(cls_logit, teacher_logit, temperature, weight)


# ---- student ------------------------------------------------------------------------------
class TRMDStudent(TokenDualEncoder):
    """Two rankers on one pair of token towers: pooled CLS vectors (dot) + ColBERT token
    vectors (late interaction); ``encode_*`` stack them, pooled vector first."""

    score_kind = "dot+late"

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, params: Optional[dict] = None,
                 tokens: Optional[PublicTokens] = None):
        super().__init__(spec, model_conf, params, tokens)
        # one projection for both sides' tokens: token vectors live in one space (as ColBERT)
        self.token_proj = nn.Linear(model_conf.embedding_dim, model_conf.output_dim)
        self.n_user_tokens = len(self.tokens.user_names)
        self.token_scale = 1.0 / math.sqrt(self.n_user_tokens)   # a constant of the spec
        with torch.no_grad():
            self.log_scale.fill_(math.log(INIT_SCALE))

    def token_vectors(self, states: torch.Tensor) -> torch.Tensor:
        """[B, F, d] unit-norm token vectors (the REP head, aligned with ColBERT's)."""
        return F.normalize(self.token_proj(states), dim=-1)

    def user_parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(u_0 [B, d], E_u [B, Fu, d]), both unit-norm; reads only user columns."""
        states = self.user_states(batch)
        return self.user_vector(states), self.token_vectors(states)

    def item_parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_0 [B, d], E_v [B, Fi, d]), both unit-norm; reads only item columns."""
        states = self.item_states(batch)
        return self.item_vector(states), self.token_vectors(states)

    def stack(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[pooled ; tokens / sqrt(Fu)]: [B, 1 + F, d], what the embedding tables store."""
        return torch.cat([pooled.unsqueeze(1), tokens * self.token_scale], dim=1)

    def encode_user(self, batch: Batch) -> torch.Tensor:
        """[B, 1 + Fu, d]: the pooled user vector, then the scaled token vectors."""
        return self.stack(*self.user_parts(batch))

    def encode_item(self, batch: Batch) -> torch.Tensor:
        """[B, 1 + Fi, d]: the pooled item vector, then the scaled token vectors."""
        return self.stack(*self.item_parts(batch))

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """logit [B] = s * (<u_0, v_0> + late(u_1:, v_1:)) + b from stored vectors."""
        return self.log_scale.exp() * score_pairs(self.score_kind, u, v) + self.bias

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.score(self.encode_user(batch), self.encode_item(batch))


class CalibratedTRMDStudent(RunningCalibration, TRMDStudent):
    """``TRMDStudent`` for the softmax objectives: same towers, same stored vectors (score
    kind ``dot+late``); ``score`` is the calibrated logit of the summed score,
    s * (score - mu) / sigma + b + logit(pi) (state ``calibration``, ``log_scale``, ``bias``)."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, params: Optional[dict] = None,
                 tokens: Optional[PublicTokens] = None):
        super().__init__(spec, model_conf, params, tokens)
        self.init_calibration()


def make_trmd_student(spec: FeatureSpec, model_conf: ModelConf, params: Optional[dict],
                      conf: StudentConf) -> TRMDStudent:
    """TRMD's student under ``conf.objective``: ``CalibratedTRMDStudent`` for the softmax objectives."""
    cls = CalibratedTRMDStudent if conf.objective in SOFTMAX_OBJECTIVES else TRMDStudent
    return cls(spec, model_conf, params)


# ---- model -------------------------------------------------------------------------------
class TRMDParams(ListwiseParams):
    """listwise_*: the CLS head's listwise term under the softmax objectives (``ListwiseParams``);
    cls_weight and temperature: its pointwise term."""
    model_config = ConfigDict(extra="forbid")
    cls_weight: float = Field(1.0, ge=0)
    rep_weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    # the student's token towers (DualEncoderParams)
    layers: int = Field(1, ge=1)
    heads: int = Field(2, ge=1)
    pooling: str = Field("attention", pattern="^(mean|attention)$")

    def student_params(self) -> dict:
        return {k: getattr(self, k) for k in DualEncoderParams.model_fields}


class TRMDModel(FrozenTeachers, nn.Module):
    """TRMD student + frozen cross-encoder and ColBERT teachers (heads: "student", "teacher")."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, params: TRMDParams | dict | None,
                 cross_encoder: nn.Module, colbert: nn.Module, student_conf: Optional[StudentConf] = None):
        super().__init__()
        self.spec = spec
        self.params = params if isinstance(params, TRMDParams) else parse_params(TRMDParams, params, "trmd")
        self.student_conf = student_conf or StudentConf(objective="pointwise")
        self.student = make_trmd_student(spec, model_conf, self.params.student_params(), self.student_conf)
        self.item_bank: Optional[ItemBank] = None   # given by the training loop for student.objective=mixed
        self.cross_teacher = freeze(cross_encoder)
        self.colbert_teacher = freeze(colbert)   # a ColBERTModel (its .student) or a ColBERT
        late = self._colbert
        if not (hasattr(late, "encode_user") and hasattr(late, "encode_item")):
            raise TypeError(f"TRMD needs a ColBERT teacher with encode_user/encode_item, got {type(late).__name__}")
        if list(getattr(late, "user_input_names", [])) != self.student.user_input_names or \
                list(getattr(late, "item_input_names", [])) != self.student.item_input_names:
            raise ValueError("TRMD: the ColBERT teacher reads other fields than the student: same spec needed")
        teacher_dim = getattr(getattr(late, "model_conf", None), "output_dim", None)
        if teacher_dim != model_conf.output_dim:
            raise ValueError(f"TRMD: ColBERT teacher output_dim {teacher_dim} != student output_dim "
                             f"{model_conf.output_dim}: token vectors cannot be aligned")
        # CLS-head calibration for the soft labels: training only, not part of the student
        self.cls_log_scale = nn.Parameter(torch.tensor(math.log(8.0)))
        self.cls_bias = nn.Parameter(torch.zeros(()))
        if self.student_conf.objective != "pointwise":   # the CLS head's teacher term is listwise there
            self.cls_log_scale.requires_grad_(False)
            self.cls_bias.requires_grad_(False)

    @property
    def _colbert(self) -> nn.Module:
        return getattr(self.colbert_teacher, "student", self.colbert_teacher)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.cross_teacher, self.colbert_teacher]

    @torch.no_grad()
    def teacher_logit(self, batch: Batch) -> torch.Tensor:
        return self.cross_teacher(batch)["teacher"]

    @torch.no_grad()
    def teacher_tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """ColBERT's unit-norm token vectors (T_u [B, Fu, d], T_v [B, Fi, d])."""
        return self._colbert.encode_user(batch), self._colbert.encode_item(batch)

    def cls_logit(self, u0: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
        """z_cls = s_c <u_0, v_0> + b_c: the CLS ranker alone, as a logit."""
        return self.cls_log_scale.exp() * (u0 * v0).sum(-1) + self.cls_bias

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"student": self.student(batch), "teacher": self.teacher_logit(batch)}

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = BCE(logit, y) + cls_weight * L_cls(z_cls, t_ce) + rep_weight * L_rep (pointwise);
        the student objective + listwise_weight * L_listwise(CLS head) + rep_weight * L_rep
        (softmax objectives: module docstring)."""
        p, st = self.params, self.student
        label, weight = label_and_weight(self.spec, batch)
        (u0, eu), (v0, ev) = st.user_parts(batch), st.item_parts(batch)
        if self.student_conf.objective != "pointwise":
            return self._retrieval_loss(batch, u0, eu, v0, ev)
        logit = st.score(st.stack(u0, eu), st.stack(v0, ev))
        loss_student = bce(logit, label, weight)
        loss_cls = cls_distillation_loss(self.cls_logit(u0, v0), self.teacher_logit(batch), p.temperature, weight)
        loss_rep = rep_alignment_loss(eu, ev, *self.teacher_tokens(batch))
        loss = loss_student + p.cls_weight * loss_cls + p.rep_weight * loss_rep
        logs = {"loss": loss.item(), "loss_student": loss_student.item(),
                "loss_cls": loss_cls.item(), "loss_rep": loss_rep.item()}
        return loss, logs

    def _retrieval_loss(self, batch: Batch, u0: torch.Tensor, eu: torch.Tensor, v0: torch.Tensor,
                        ev: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        p, st, conf = self.params, self.student, self.student_conf
        loss_student, logs = tower_loss(st, self.spec, conf, batch, st.stack(u0, eu), st.stack(v0, ev),
                                        bank=self.item_bank)
        loss_listwise = ListwiseTargets.of_batch(self.cross_teacher, self.spec, batch, p).kl(
            "dot", u0, v0, conf.temperature)
        loss_rep = rep_alignment_loss(eu, ev, *self.teacher_tokens(batch))
        loss = loss_student + p.listwise_weight * loss_listwise + p.rep_weight * loss_rep
        return loss, {"loss": loss.item(), **logs, "loss_listwise": loss_listwise.item(),
                      "loss_rep": loss_rep.item()}


def build(spec: FeatureSpec, cfg, teachers) -> TRMDModel:
    """rec_models.methods builder: ``teachers["cross_encoder"]`` and ``teachers["colbert"]``
    frozen; params validated (an unknown key in ``distill.params`` is an error naming it)."""
    return TRMDModel(spec, cfg.model, parse_params(TRMDParams, cfg.distill.params, "trmd"),
                     teachers["cross_encoder"], teachers["colbert"], cfg.student)


def build_student_only(spec: FeatureSpec, cfg, teachers) -> TokenStudentOnly:
    """rec_models.methods builder of ``trmd_student``: TRMD's student (same towers, two
    rankers, score kind ``dot+late``) trained on labels alone under ``student.objective``,
    the undistilled baseline of ``trmd``; ``distill.params``: ``DualEncoderParams``."""
    params = parse_params(DualEncoderParams, cfg.distill.params, "trmd_student").model_dump()
    return TokenStudentOnly(spec, make_trmd_student(spec, cfg.model, params, cfg.student), cfg.student)

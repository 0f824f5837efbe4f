"""ENDX (Wang et al., "Enhancing Dual-Encoders with Question and Answer Cross-Embeddings
for Answer Retrieval", 2022): a frozen cross-encoder's *cross embeddings* teach a DSSM
two-tower student the geometry of the batch, through its Geometry Alignment Mechanism.

Teacher embeddings (cross embeddings: each side contextualised by the other, since every
user token attended to its paired item's tokens inside the cross-encoder):

    t_u,i = normalize(mean_f H^T_u[i, f]),   t_v,i = normalize(mean_g H^T_v[i, g])

Student embeddings: the DSSM's unit-norm s_u,i = encode_user, s_v,i = encode_item.

Geometry Alignment Mechanism (GAM). For a batch of B pairs, each model M in {T, S} and
each of the four pairs (X, Y) in {(u, v), (v, v), (v, u), (u, u)}:

    P^M_XY(j | i) = exp(<x^M_i, y^M_j> / tau_M) / sum_{k in J(i)} exp(<x^M_i, y^M_k> / tau_M)
    J(i) = {1..B}           for X != Y   (P(item | user), P(user | item))
    J(i) = {1..B} \\ {i}     for X == Y   (P(item | item), P(user | user): not one's own neighbour)

    L_GAM = sum_{(X, Y)} (1/B) sum_i KL( P^T_XY(. | i) || P^S_XY(. | i) )

    L = BCE(s, y) + gam_weight * L_GAM,     s = scale * <s_u, s_v> + b   (the DSSM logit)

Into a retrieval student (``student.objective`` sampled_softmax or mixed) BCE(s, y) is
replaced by that objective (``rec_models.objectives``): the GAM term already is a
listwise loss over the batch's candidates, the teacher scoring every user x item pair of
the batch through its cross embeddings, and it is added to the student's softmax as is.

Only similarity *distributions* are matched (logits only), never the vectors: teacher and
student live in spaces of different dimension (embedding_dim vs output_dim) and bases.
Both sides are L2-normalised so that <., .> is a cosine for both models and the two
temperatures alone set how sharp each model's distribution is (the cross-encoder's
states are LayerNorm outputs of arbitrary norm). The teacher is frozen: its outputs are
computed under no_grad and detached inside the loss, so it is never trained.

Default gam_weight 0.1: our cross-encoder is trained on its CLS logit only, so the
geometry of its mean token states is a by-product, not a retrieval space (on a toy
interaction task their pair cosine even ranked clicks inversely); a large weight then
pulls the student away from the labels. A two-tower student cannot reach L_GAM = 0
either: a cross embedding depends on the pair, a tower's vector on one side only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rec_models.batch import Batch, label_and_weight
from rec_models.config import ModelConf, StudentConf, parse_params
from rec_models.distill.base import FrozenTeachers, freeze
from rec_models.losses import bce
from rec_models.objectives import ItemBank, make_student, student_loss
from rec_models.spec import FeatureSpec

# name -> (side of i, side of j, exclude i itself); side 0 = user, 1 = item
GAM_PAIRS: dict[str, tuple[int, int, bool]] = {
    "ui": (0, 1, False),   # P(item j | user i)
    "ii": (1, 1, True),    # P(item j | item i), j != i
    "iu": (1, 0, False),   # P(user j | item i)
    "uu": (0, 0, True),    # P(user j | user i), j != i
}


# ---- losses: pure functions of tensors ---------------------------------------------------
def in_batch_log_probs(a: torch.Tensor, b: torch.Tensor, temperature: float,
                       exclude_self: bool = False) -> torch.Tensor:
    """log P(j | i) = log_softmax_j( <a_i, b_j> / tau ) over the batch.

    a: [B, D], b: [B, D] -> [B, B]; with ``exclude_self`` (a and b are the same side) the
    diagonal j = i is removed before the softmax -> [B, B - 1] (column order kept).
    """
    sim = a @ b.T / float(temperature)
    if exclude_self:
        n = sim.shape[0]
        off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
        sim = sim[off].view(n, n - 1)
    return torch.log_softmax(sim, dim=-1)


def distribution_kl(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """mean_i KL(P_t(. | i) || P_s(. | i)) = (1/B) sum_i sum_j P_t(j|i) (log P_t(j|i) - log P_s(j|i)).

    Inputs are log-probabilities [B, J] (rows normalised); the teacher's are detached.
    Zero iff the rows agree; an empty row (J = 0) contributes 0.
    """
    t = teacher_log_probs.detach()
    return (t.exp() * (t - student_log_probs)).sum(-1).mean()


def geometry_alignment_terms(
    teacher_user: torch.Tensor,
    teacher_item: torch.Tensor,
    student_user: torch.Tensor,
    student_item: torch.Tensor,
    temperature_teacher: float = 0.1,
    temperature_student: float = 0.1,
) -> dict[str, torch.Tensor]:
    """The four GAM terms {"ui", "ii", "iu", "uu"}: for pair (X, Y),

        L_XY = (1/B) sum_i KL( P^T_XY(. | i) || P^S_XY(. | i) ),
        P^M_XY(j | i) = softmax_{j in J(i)}( <x^M_i, y^M_j> / tau_M )   (J(i) excludes i when X == Y)

    Teacher vectors [B, D_t] and student vectors [B, D_s] may differ in dimension: only
    the B x B similarity distributions are compared. Teacher inputs are detached.
    """
    teacher = (teacher_user.detach(), teacher_item.detach())
    student = (student_user, student_item)
    terms = {}
    for name, (x, y, same_side) in GAM_PAIRS.items():
        log_t = in_batch_log_probs(teacher[x], teacher[y], temperature_teacher, same_side)
        log_s = in_batch_log_probs(student[x], student[y], temperature_student, same_side)
        terms[name] = distribution_kl(log_t, log_s)
    return terms


# ---- model ----------------------------------------------------------------------------------
class ENDXParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gam_weight: float = Field(0.1, ge=0)
    temperature_teacher: float = Field(0.1, gt=0)
    temperature_student: float = Field(0.1, gt=0)


class ENDXModel(FrozenTeachers, nn.Module):
    """DSSM student + frozen cross-encoder teacher (heads: "student", "teacher")."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, params: ENDXParams | dict | None,
                 teacher: nn.Module, student_conf: Optional[StudentConf] = None):
        super().__init__()
        if not hasattr(teacher, "outputs"):
            raise TypeError(f"ENDX needs a cross-encoder teacher with .outputs(batch), got {type(teacher).__name__}")
        self.spec = spec
        self.params = params if isinstance(params, ENDXParams) else parse_params(ENDXParams, params, "endx")
        self.student_conf = student_conf or StudentConf(objective="pointwise")
        self.student = make_student(spec, model_conf, self.student_conf)
        self.item_bank: Optional[ItemBank] = None   # given by the training loop for student.objective=mixed
        self.teacher = freeze(teacher)   # a submodule: checkpoints hold it, load_trained refills it

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher]

    @torch.no_grad()
    def teacher_embeddings(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(teacher logit [B], t_u [B, D], t_v [B, D]): unit-norm means of the cross-encoder's
        user and item token states."""
        out = self.teacher.outputs(batch)
        return (out.logit, F.normalize(out.user_states.mean(1), dim=-1),
                F.normalize(out.item_states.mean(1), dim=-1))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher = self.teacher.outputs(batch).logit
        return {"student": self.student(batch), "teacher": teacher}

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = BCE(s, y) (or the student objective) + gam_weight * (L_ui + L_ii + L_iu + L_uu)."""
        p = self.params
        u, v = self.student.encode_user(batch), self.student.encode_item(batch)
        if self.student_conf.objective == "pointwise":
            label, weight = label_and_weight(self.spec, batch)
            loss_student = bce(self.student.score(u, v), label, weight)
        else:
            loss_student, _ = student_loss(self.student, self.spec, self.student_conf, batch, bank=self.item_bank)
        _, t_u, t_v = self.teacher_embeddings(batch)
        terms = geometry_alignment_terms(t_u, t_v, u, v, p.temperature_teacher, p.temperature_student)
        loss_gam = torch.stack(list(terms.values())).sum()
        loss = loss_student + p.gam_weight * loss_gam
        logs = {"loss": loss.item(), "loss_student": loss_student.item(), "loss_gam": loss_gam.item(),
                **{f"gam_{k}": t.item() for k, t in terms.items()}}
        return loss, logs


def build(spec: FeatureSpec, cfg, teachers) -> ENDXModel:
    """rec_models.methods builder: ``teachers["cross_encoder"]`` frozen; params validated
    (an unknown key in ``distill.params`` is an error naming it)."""
    return ENDXModel(spec, cfg.model, parse_params(ENDXParams, cfg.distill.params, "endx"), teachers["cross_encoder"],
                     cfg.student)

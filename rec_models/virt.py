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

The virtual attention exists at training time only: it lets the towers learn states whose
dot products reproduce the teacher's cross attention, so the interaction knowledge is
baked into each side's representation. Serving is a pure dual encoder (score kind ``dot``).
The paper distils every layer's attention; the student here has its own (usually
shallower) stack, so only the last layer's states are aligned with the teacher's last layer.

Also here, shared by the cross-encoder-distilling methods (Distilled-DualEncoder,
ERNIE-Search): ``freeze``, ``parse_params``, ``CrossTeacherDistill``.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from rec_models.config import ConfigError, ModelConf
from rec_models.cross_encoder import CrossEncoder, CrossOutputs
from rec_models.dual_encoder import TokenDualEncoder
from rec_models.losses import bce
from rec_models.spec import FeatureSpec

Batch = Mapping[str, torch.Tensor]
TEACHER = "cross_encoder"


# ---- losses ------------------------------------------------------------------------------
def weighted_mean(per_sample: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """mean_w(l) = sum_i w_i l_i / sum_i w_i (plain mean without weights), as rec_models.losses."""
    if weight is None:
        return per_sample.mean()
    weight = weight.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1e-12)


def attention_l2(student_attention: torch.Tensor, teacher_attention: torch.Tensor,
                 weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """VIRT's attention distillation: squared Frobenius distance, mean over the batch.

    L = mean_w_b[ sum_{a, c} (A_s[b, a, c] - stopgrad(A_t[b, a, c]))^2 ]      A: [B, Fu, Fi]

    Zero iff A_s == A_t; the teacher map is detached here, so this never trains the teacher.
    """
    diff = student_attention - teacher_attention.detach()
    return weighted_mean(diff.pow(2).sum((-2, -1)), weight)


# ---- shared by the cross-encoder-distilling methods ----------------------------------------
def freeze(module: nn.Module) -> nn.Module:
    """No gradient, eval mode (dropout off): a teacher that is used, never optimised."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def parse_params(params_cls: type[BaseModel], raw: Optional[Mapping], method: str) -> BaseModel:
    """Validate ``distill.params``; an unknown key or a bad value is a ConfigError naming it."""
    try:
        return params_cls.model_validate(dict(raw or {}))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"distill.params.{where}: {msg}")
        raise ConfigError(f"invalid params of method '{method}':\n  " + "\n  ".join(problems)) from None


def cross_teacher(teachers: Mapping[str, nn.Module], method: str) -> CrossEncoder:
    teacher = teachers.get(TEACHER) if teachers else None
    if not isinstance(teacher, CrossEncoder):
        raise TypeError(f"method '{method}' needs a trained CrossEncoder as teacher '{TEACHER}', "
                        f"got {type(teacher).__name__}")
    return teacher


class CrossTeacherDistill(nn.Module):
    """Base of a model distilled from a frozen cross-encoder: holds the teacher as a
    submodule (checkpoints contain it; ``train.load_trained`` refills it), keeps it frozen
    and in eval mode, and computes its outputs without a graph."""

    def __init__(self, spec: FeatureSpec, teacher: CrossEncoder, student: TokenDualEncoder):
        super().__init__()
        if (list(teacher.tokens.user_names), list(teacher.tokens.item_names)) != (
                student.user_input_names, student.item_input_names):
            raise ValueError("the cross-encoder teacher must read the student's user and item fields, in order: "
                             f"teacher {teacher.tokens.user_names} / {teacher.tokens.item_names}, "
                             f"student {student.user_input_names} / {student.item_input_names}")
        self.spec = spec
        self.teacher = freeze(teacher)
        self.student = student

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: dropout stays off whatever the caller does
        return self

    def teacher_outputs(self, batch: Batch) -> CrossOutputs:
        with torch.no_grad():
            return self.teacher.outputs(batch)

    def label_weight(self, batch: Batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        weight = batch[self.spec.weight.name] if self.spec.weight is not None else None
        return batch[self.spec.label.name], weight

    def student_pass(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logit [B], user states [B, Fu, D], item states [B, Fi, D]) in one pass of the towers."""
        hu, hv = self.student.user_states(batch), self.student.item_states(batch)
        logit = self.student.score(self.student.user_vector(hu), self.student.item_vector(hv))
        return logit, hu, hv

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"teacher": self.teacher_outputs(batch).logit, "student": self.student(batch)}


def student_params(layers: int, heads: int, pooling: str) -> dict:
    return {"layers": layers, "heads": heads, "pooling": pooling}


def freeze_unused_pooling(student: TokenDualEncoder) -> TokenDualEncoder:
    """Mean pooling never reads the attention-pooling queries: freeze them, so that every
    trainable parameter gets a gradient (DistributedDataParallel requires it)."""
    if student.params.pooling == "mean":
        student.user_query.requires_grad_(False)
        student.item_query.requires_grad_(False)
    return student


# ---- VIRT --------------------------------------------------------------------------------
class VIRTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attn_weight: float = Field(1.0, ge=0)   # weight of the attention L2 term
    layers: int = Field(1, ge=1)            # student tower transformer layers
    heads: int = Field(2, ge=1)


class VIRTModel(CrossTeacherDistill):
    """Heads "teacher" (cross-encoder) and "student"; ``.student`` is the servable dual encoder."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, teacher: CrossEncoder,
                 params: Optional[dict] = None):
        p = parse_params(VIRTParams, params, "virt")
        # attention pooling: VIRT's attention-weighted representation
        student = TokenDualEncoder(spec, model_conf, student_params(p.layers, p.heads, "attention"))
        super().__init__(spec, teacher, student)
        self.params = p

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = BCE(s, y) + attn_weight * attention_l2(A_s, A_t)."""
        label, weight = self.label_weight(batch)
        teacher = self.teacher_outputs(batch)
        logit, hu, hv = self.student_pass(batch)
        loss_student = bce(logit, label, weight)
        loss_attn = attention_l2(TokenDualEncoder.virtual_attention(hu, hv), teacher.attention, weight)
        loss = loss_student + self.params.attn_weight * loss_attn
        return loss, {"loss": loss.item(), "loss_student": loss_student.item(), "loss_attn": loss_attn.item()}


def build(spec: FeatureSpec, cfg, teachers) -> VIRTModel:
    return VIRTModel(spec, cfg.model, cross_teacher(teachers, "virt"), cfg.distill.params)

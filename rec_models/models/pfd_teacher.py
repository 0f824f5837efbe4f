"""The PFD ranking teacher (Xu et al., "Privileged Features Distillation at Taobao
Recommendations", KDD 2020): public + privileged features, a ranker a two-tower cannot be.

``PFDTeacher`` shares the student's public embeddings when trained jointly
(``rec_models.distill.pfd``); ``TeacherOnly`` trains it alone (method ``pfd_teacher``,
jobs/train_teacher.py), and its state dict loads into ``PFDModel.load_teacher``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rec_models.batch import Batch, label_and_weight
from rec_models.config import ModelConf
from rec_models.layers.embeddings import FieldEmbeddings
from rec_models.layers.towers import MLP
from rec_models.losses import bce
from rec_models.spec import FeatureSpec, Role


class PFDTeacher(nn.Module):
    """Ranking teacher: logit = MLP([public user+item tokens ; privileged + context tokens]).

    ``public`` is the student's FieldEmbeddings object itself (shared, not copied); the
    privileged and context fields get this teacher's own tables (a privileged sequence
    over item ids still reuses the public item-id table).
    """

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, public: FieldEmbeddings):
        super().__init__()
        self.spec = spec
        self.model_conf = model_conf
        self.public = public
        self._public_names = [f.name for f in (*spec.user_features, *spec.item_features)]
        self._public_pos = public.positions(self._public_names)
        extra = spec.by_role(Role.privileged, Role.context)
        self.own = FieldEmbeddings(spec, extra, public.dim, shared=public) if extra else None
        n_fields = len(self._public_names) + (len(extra) if extra else 0)
        self.mlp = MLP(n_fields * public.dim, model_conf.teacher_dims, 1, model_conf.dropout)

    @property
    def input_names(self) -> list[str]:
        return self._public_names + (self.own.names if self.own is not None else [])

    def teacher_only_modules(self) -> list[nn.Module]:
        """Modules not shared with the student (privileged/context tables, the MLP)."""
        return [m for m in (self.own, self.mlp) if m is not None]

    def forward(self, batch: Batch, public_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """logit [B]. ``public_tokens``: ``public.tokens(batch)`` if already computed."""
        if public_tokens is None:
            pub = self.public.tokens(batch, self._public_names)
        else:
            pub = public_tokens[:, self._public_pos]
        parts = [pub.flatten(1)]
        if self.own is not None:
            parts.append(self.own.flat(batch))
        return self.mlp(torch.cat(parts, dim=1)).squeeze(-1)


class TeacherOnly(nn.Module):
    """The PFD teacher trained alone (jobs/train_teacher.py). Its state dict loads into
    ``PFDModel.load_teacher`` (its public FieldEmbeddings has the student's layout)."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf):
        super().__init__()
        self.spec = spec
        public = FieldEmbeddings(spec, (*spec.user_features, *spec.item_features), model_conf.embedding_dim)
        self.teacher = PFDTeacher(spec, model_conf, public)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"teacher": self.teacher(batch)}

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = BCE(t, y)."""
        return self.loss_from_outputs(self(batch), batch, step)

    def loss_from_outputs(self, outputs: dict[str, torch.Tensor], batch: Batch, step: int):
        label, weight = label_and_weight(self.spec, batch)
        loss = bce(outputs["teacher"], label, weight)
        value = loss.item()
        return loss, {"loss": value, "loss_teacher": value}


def build_teacher_only(spec: FeatureSpec, cfg, teachers) -> TeacherOnly:
    return TeacherOnly(spec, cfg.model)

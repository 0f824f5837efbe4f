"""DCN ranker (Wang, Fu, Fu and Wang, "Deep & Cross Network for Ad Click Predictions",
ADKDD 2017), on feature-field tokens. The original (vector) cross layer, not DCN-V2's matrix.

    x_0 = [e_1 ; ... ; e_F]                       the F field tokens concatenated, d = F * D
    cross layer l = 0 .. L-1:
        x_{l+1} = x_0 (x_l^T w_l) + b_l + x_l     w_l, b_l in R^d (x_l^T w_l is a scalar)
    deep network:  h = MLP(x_0)                   widths model.teacher_dims, ReLU
    combination:   logit = w^T [x_L ; h] + b
    L = BCE(logit, y)

Each cross layer raises the degree of the explicit feature crossing by one with only 2d
parameters; the deep MLP learns the implicit interactions in parallel. The fields are the
user and item fields together (plus context and, with ``include_privileged``, privileged
ones): the score is not a function of two separate towers, so there is no ``encode_user``
/ ``encode_item`` and nothing to store -- a ranking teacher (head "teacher"), like the
cross-encoder and the PFD teacher, not a retrieval student.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rec_models.config import ModelConf
from rec_models.layers.embeddings import FieldEmbeddings
from rec_models.losses import bce
from rec_models.batch import label_and_weight
from rec_models.spec import FeatureSpec, Role
from rec_models.layers.towers import MLP
from rec_models.config import parse_params

Batch = Mapping[str, torch.Tensor]


class DCNParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cross_layers: int = Field(3, ge=1)     # L
    include_privileged: bool = True        # also read the privileged fields (offline teacher)


class CrossNetwork(nn.Module):
    """L vector cross layers: x_{l+1} = x_0 (x_l^T w_l) + b_l + x_l, returns x_L [B, d]."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(layers, dim))
        self.bias = nn.Parameter(torch.zeros(layers, dim))
        # Xavier normal of each [d, 1] kernel, as DCN's reference code; zero bias
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / (dim + 1)))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.weight, self.bias):
            x = x0 * (x @ w).unsqueeze(-1) + b + x
        return x


class DCN(nn.Module):
    """Cross network and deep MLP in parallel over all field tokens; head "teacher"."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, params: Optional[Mapping] = None):
        super().__init__()
        self.spec, self.model_conf = spec, model_conf
        self.params = p = parse_params(DCNParams, params, "dcn")
        roles = [Role.user, Role.item, Role.context] + ([Role.privileged] if p.include_privileged else [])
        fields = spec.by_role(*roles)
        if not spec.user_features or not spec.item_features:
            raise ValueError("DCN needs at least one user and one item feature in the FeatureSpec")
        dim = model_conf.embedding_dim
        self.embeddings = FieldEmbeddings(spec, fields, dim)
        width = len(fields) * dim
        self.cross = CrossNetwork(width, p.cross_layers)
        self.deep = MLP(width, model_conf.teacher_dims, None, model_conf.dropout)
        self.head = nn.Linear(width + self.deep.out_dim, 1)

    @property
    def input_names(self) -> list[str]:
        return self.embeddings.names

    def logit(self, batch: Batch) -> torch.Tensor:
        """[B] = w^T [cross(x_0) ; deep(x_0)] + b."""
        x0 = self.embeddings.flat(batch)
        return self.head(torch.cat([self.cross(x0), self.deep(x0)], dim=-1)).squeeze(-1)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"teacher": self.logit(batch)}

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = BCE(logit, y)."""
        label, weight = label_and_weight(self.spec, batch)
        loss = bce(self.logit(batch), label, weight)
        return loss, {"loss": loss.item()}


def build(spec, cfg, teachers) -> DCN:
    return DCN(spec, cfg.model, cfg.distill.params)

"""Cross-encoder teacher: one transformer over the concatenated user and item field tokens.

    X = [CLS ; tokens_u + seg_u ; tokens_v + seg_v (; privileged tokens + seg_p)]
    H, A = Transformer(X)                 A: last layer's attention [B, heads, T, T]
    logit = w^T MLP(H_CLS) + b

Every user token attends to every item token, which a two-tower model cannot do; this is
the "interaction" teacher that TRMD (CLS score), VIRT and Distilled-DualEncoder (its
user -> item attention block) and ERNIE-Search (the first stage of the cascade) distil.
With ``include_privileged`` (the default) it also reads the privileged fields, as the PFD
teacher does: offline-only signals plus full interaction make the strongest teacher;
without them it sees exactly what the student sees, minus the tower split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rec_models.config import ModelConf
from rec_models.layers.embeddings import FieldEmbeddings
from rec_models.losses import bce
from rec_models.batch import label_and_weight
from rec_models.spec import Role
from rec_models.layers.tokens import PublicTokens, TokenEncoder
from rec_models.layers.towers import MLP

Batch = Mapping[str, torch.Tensor]


class CrossEncoderParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    include_privileged: bool = True


@dataclass
class CrossOutputs:
    logit: torch.Tensor          # [B]
    cls: torch.Tensor            # [B, D]
    user_states: torch.Tensor    # [B, Fu, D]
    item_states: torch.Tensor    # [B, Fi, D]
    attention: torch.Tensor      # [B, Fu, Fi]: user -> item attention, heads averaged, rows sum to 1


class CrossEncoder(nn.Module):
    def __init__(self, spec, model_conf: ModelConf, params: Optional[dict] = None):
        super().__init__()
        self.spec, self.model_conf = spec, model_conf
        self.params = CrossEncoderParams(**(params or {}))
        dim = model_conf.embedding_dim
        self.tokens = PublicTokens(spec, dim)
        extra = spec.by_role(Role.privileged) if self.params.include_privileged else ()
        self.privileged = FieldEmbeddings(spec, extra, dim, shared=self.tokens.embeddings) if extra else None
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.segments = nn.Parameter(torch.zeros(3, dim))      # user, item, privileged
        nn.init.normal_(self.segments, std=0.02)
        self.encoder = TokenEncoder(dim, self.params.layers, self.params.heads, model_conf.dropout)
        self.head = MLP(dim, model_conf.teacher_dims[-1:], 1, model_conf.dropout)

    def outputs(self, batch: Batch) -> CrossOutputs:
        u = self.tokens.user(batch) + self.segments[0]
        v = self.tokens.item(batch) + self.segments[1]
        parts = [self.cls.expand(u.shape[0], -1, -1), u, v]
        if self.privileged is not None:
            parts.append(self.privileged.tokens(batch) + self.segments[2])
        h, attn = self.encoder(torch.cat(parts, dim=1), need_weights=True)
        fu, fi = u.shape[1], v.shape[1]
        block = attn.mean(1)[:, 1:1 + fu, 1 + fu:1 + fu + fi]
        block = block / block.sum(-1, keepdim=True).clamp_min(1e-9)
        return CrossOutputs(self.head(h[:, 0]).squeeze(-1), h[:, 0], h[:, 1:1 + fu], h[:, 1 + fu:1 + fu + fi], block)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"teacher": self.outputs(batch).logit}

    def training_loss(self, batch: Batch, step: int):
        label, weight = label_and_weight(self.spec, batch)
        loss = bce(self(batch)["teacher"], label, weight)
        return loss, {"loss": loss.item()}


def build(spec, cfg, teachers) -> CrossEncoder:
    return CrossEncoder(spec, cfg.model, cfg.distill.params)

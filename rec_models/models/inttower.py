"""IntTower (Li et al., "IntTower: the Next Generation of Two-Tower Model for Pre-Ranking
System", CIKM 2022), on field tokens.

    Light-SE (each side):  z_f = mean_d E_f,  a = softmax_f(W z + b),  E'_f = E_f (1 + a_f)
    user tower:  h_1 .. h_L = the layer outputs of MLP_u(flatten E'_u)
                 (widths model.tower_dims, then model.output_dim: L = len(tower_dims) + 1)
    item tower:  h_v = MLP_v(flatten E'_v)
    FE-block:    u_l^m = normalize(P_l h_l)[m],  v^m = normalize(P_v h_v)[m]    (M heads of size d)
                 S(u, v) = sum_l max_{m, m'} <u_l^m, v^m'>
    logit = s * S / L + b
    CIR:         L_cir = InfoNCE(normalize(h_L), normalize(h_v)) over the batch's positive pairs
    L = BCE(logit, y) + cir_weight * L_cir

The item still gets one encoding, computed once per item ([M, d]); the user stores [L, M, d]
(score kind ``inttower``, scored by ``rec_models.serving.scoring`` exactly as here). Light-SE
follows the paper (a scalar per field, a linear excitation, softmax over fields, residual).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rec_models.config import ModelConf
from rec_models.losses import bce, in_batch_candidates, in_batch_softmax
from rec_models.batch import label_and_weight
from rec_models.serving.scoring import score_pairs
from rec_models.layers.tokens import PublicTokens
from rec_models.layers.towers import MLP
from rec_models.batch import item_ids

Batch = Mapping[str, torch.Tensor]


class IntTowerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: int = Field(4, ge=1)               # M sub-spaces per layer
    head_dim: int = Field(16, ge=1)           # d
    light_se: bool = True
    cir_weight: float = Field(0.1, ge=0)
    cir_temperature: float = Field(0.1, gt=0)


class LightSE(nn.Module):
    """Light squeeze-excitation over F field tokens: E'_f = E_f (1 + softmax_f(W z + b)_f),
    z_f = mean over the token's dimensions."""

    def __init__(self, fields: int):
        super().__init__()
        self.excite = nn.Linear(fields, fields)

    def weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, F] field weights (each row sums to 1)."""
        return torch.softmax(self.excite(tokens.mean(-1)), dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * (1.0 + self.weights(tokens).unsqueeze(-1))


def layer_outputs(mlp: MLP, x: torch.Tensor) -> list[torch.Tensor]:
    """Every hidden layer's output (after its ReLU) and the final output of ``mlp``."""
    outs = []
    for module in mlp:
        x = module(x)
        if isinstance(module, nn.ReLU):
            outs.append(x)
    return outs + [x]


class IntTower(nn.Module):
    score_kind = "inttower"

    def __init__(self, spec, model_conf: ModelConf, params: Optional[dict] = None,
                 tokens: Optional[PublicTokens] = None):
        super().__init__()
        self.spec, self.model_conf = spec, model_conf
        self.params = p = IntTowerParams(**(params or {}))
        dim = model_conf.embedding_dim
        self.tokens = tokens or PublicTokens(spec, dim)
        fu, fi = len(self.tokens.user_names), len(self.tokens.item_names)
        self.user_se = LightSE(fu) if p.light_se else nn.Identity()
        self.item_se = LightSE(fi) if p.light_se else nn.Identity()
        dims, out = model_conf.tower_dims, model_conf.output_dim
        self.user_tower = MLP(fu * dim, dims, out, model_conf.dropout, activation=nn.ReLU)
        self.item_tower = MLP(fi * dim, dims, out, model_conf.dropout, activation=nn.ReLU)
        self.user_heads = nn.ModuleList(nn.Linear(w, p.heads * p.head_dim) for w in (*dims, out))
        self.item_heads = nn.Linear(out, p.heads * p.head_dim)
        self.layers = len(self.user_heads)
        self.log_scale = nn.Parameter(torch.tensor(math.log(8.0)))
        self.bias = nn.Parameter(torch.zeros(()))

    @property
    def user_input_names(self) -> list[str]:
        return list(self.tokens.user_names)

    @property
    def item_input_names(self) -> list[str]:
        return list(self.tokens.item_names)

    def _heads(self, proj: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(proj(h).view(h.shape[0], self.params.heads, self.params.head_dim), dim=-1)

    def user_parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(FE-block vectors [B, L, M, d], the user tower's final output h_L [B, output_dim])."""
        hs = layer_outputs(self.user_tower, self.user_se(self.tokens.user(batch)).flatten(1))
        return torch.stack([self._heads(p, h) for p, h in zip(self.user_heads, hs)], dim=1), hs[-1]

    def item_parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(FE-block vectors [B, M, d], the item tower's output h_v [B, output_dim])."""
        h = self.item_tower(self.item_se(self.tokens.item(batch)).flatten(1))
        return self._heads(self.item_heads, h), h

    def encode_user(self, batch: Batch) -> torch.Tensor:
        """[B, L, M, d] unit-norm sub-space vectors of every user layer."""
        return self.user_parts(batch)[0]

    def encode_item(self, batch: Batch) -> torch.Tensor:
        """[B, M, d] unit-norm sub-space vectors of the item tower's output."""
        return self.item_parts(batch)[0]

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Row-wise logit s * FE-score / L + b: [B]."""
        return self.log_scale.exp() * score_pairs("inttower", u, v) / self.layers + self.bias

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.score(self.encode_user(batch), self.encode_item(batch))


class IntTowerModel(nn.Module):
    """IntTower trained with BCE + CIR (heads: "student")."""

    def __init__(self, spec, model_conf: ModelConf, params: Optional[dict] = None):
        super().__init__()
        self.spec = spec
        self.student = IntTower(spec, model_conf, params)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"student": self.student(batch)}

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = BCE(logit, y) + cir_weight * InfoNCE(h_L, h_v) over the positive pairs."""
        s, p = self.student, self.student.params
        label, weight = label_and_weight(self.spec, batch)
        u, u_final = s.user_parts(batch)
        v, v_final = s.item_parts(batch)
        loss_bce = bce(s.score(u, v), label, weight)
        pos = label > 0.5
        first, inverse, _ = in_batch_candidates(item_ids(self.spec, batch)[pos])
        loss_cir = in_batch_softmax(F.normalize(u_final[pos], dim=-1), F.normalize(v_final[pos][first], dim=-1),
                                    inverse, p.cir_temperature, None, None if weight is None else weight[pos])
        loss = loss_bce + p.cir_weight * loss_cir
        return loss, {"loss": loss.item(), "loss_bce": loss_bce.item(), "loss_cir": loss_cir.item()}


def build(spec, cfg, teachers) -> IntTowerModel:
    return IntTowerModel(spec, cfg.model, cfg.distill.params)

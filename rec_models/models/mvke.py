"""MVKE (Xu et al., "Mixture of Virtual-Kernel Experts for Multi-Objective User Profile
Modeling", KDD 2022), on field tokens.

K virtual kernels c_k (learned vectors of the token size) connect the two sides:

    user, per kernel k:  a_kf = softmax_f(<W_q c_k, W_k E_f> / sqrt(D))   over the user fields
                         x_k  = [E_f + a_kf W_v E_f]_f                    (flattened, [Fu * D])
                         e_k  = normalize(Expert_k(x_k))                  K experts, [K, out]
    item:                v    = normalize(MLP_v(item field tokens))
                         t    = W_t [tag field tokens]                     (``tag_fields``)
                         g_k  = <t, c_k>                                   gate logits
    S(u, v) = sum_k softmax(g)_k <e_k, v>,    logit = s * S + b;   trained with BCE.

The kernel's attention re-weights each user field rather than summing the fields into
one token (a sum would leave each expert a single D-sized input): every expert sees every
field, the kernel decides what it stresses. The gate depends on the item alone, so the item
stores [v ; g] ([out + K]) and the user [e_1 .. e_K] (score kind ``mvke``, scored by
``rec_models.serving.scoring`` exactly as here).

Experts and item vector are unit-norm: S is then a gate-weighted mean of cosines in
[-1, 1] that the learned scale s turns into a logit (as in DSSM), and no expert can
outweigh the gate's choice through its norm alone: which experts speak for the user is
the tag's decision, the point of the method.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rec_models.config import ConfigError, ModelConf
from rec_models.models.student_only import StudentOnly
from rec_models.serving.scoring import score_pairs
from rec_models.layers.tokens import PublicTokens
from rec_models.layers.towers import MLP

Batch = Mapping[str, torch.Tensor]


class MVKEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kernels: int = Field(4, ge=1)
    # item fields the tag (query) vector is built from; None: every item field but the item id
    tag_fields: Optional[list[str]] = None


class MVKE(nn.Module):
    score_kind = "mvke"

    def __init__(self, spec, model_conf: ModelConf, params: Optional[dict] = None,
                 tokens: Optional[PublicTokens] = None):
        super().__init__()
        self.spec, self.model_conf = spec, model_conf
        self.params = p = MVKEParams(**(params or {}))
        dim, out = model_conf.embedding_dim, model_conf.output_dim
        self.tokens = tokens or PublicTokens(spec, dim)
        self.tag_names = self._tag_fields(spec, p.tag_fields)
        fu, fi = len(self.tokens.user_names), len(self.tokens.item_names)

        self.kernels = nn.Parameter(torch.randn(p.kernels, dim) / math.sqrt(dim))
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.experts = nn.ModuleList(
            MLP(fu * dim, model_conf.tower_dims, out, model_conf.dropout) for _ in range(p.kernels))
        self.item_tower = MLP(fi * dim, model_conf.tower_dims, out, model_conf.dropout)
        self.tag_proj = nn.Linear(len(self.tag_names) * dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(8.0)))
        self.bias = nn.Parameter(torch.zeros(()))

    def _tag_fields(self, spec, wanted: Optional[list[str]]) -> list[str]:
        items = self.tokens.item_names
        if wanted is None:
            wanted = [n for n in items if n != spec.keys.item]
        bad = [n for n in wanted if n not in items]
        if bad:
            raise ConfigError(f"distill.params.tag_fields: {bad} are not item features; item features: {items}")
        if not wanted:
            raise ConfigError("MVKE needs at least one tag field (distill.params.tag_fields): the item has no "
                             f"feature besides its id '{spec.keys.item}'")
        return list(wanted)

    @property
    def user_input_names(self) -> list[str]:
        return list(self.tokens.user_names)

    @property
    def item_input_names(self) -> list[str]:
        return list(self.tokens.item_names)

    def kernel_attention(self, user_tokens: torch.Tensor) -> torch.Tensor:
        """[B, K, Fu]: each kernel's attention over the user field tokens (rows sum to 1)."""
        keys = self.key(user_tokens)                                     # [B, Fu, D]
        logits = torch.einsum("kd,bfd->bkf", self.query(self.kernels), keys)
        return torch.softmax(logits / math.sqrt(keys.shape[-1]), dim=-1)

    def encode_user(self, batch: Batch) -> torch.Tensor:
        """[B, K, out] unit-norm expert vectors."""
        tokens = self.tokens.user(batch)                                 # [B, Fu, D]
        attn = self.kernel_attention(tokens)
        x = tokens.unsqueeze(1) + attn.unsqueeze(-1) * self.value(tokens).unsqueeze(1)   # [B, K, Fu, D]
        experts = [expert(x[:, k].flatten(1)) for k, expert in enumerate(self.experts)]
        return F.normalize(torch.stack(experts, dim=1), dim=-1)

    def gate_logits(self, batch: Batch) -> torch.Tensor:
        """[B, K]: <t, c_k>, t from the item's tag fields only."""
        tag = self.tag_proj(self.tokens.embeddings.tokens(batch, self.tag_names).flatten(1))
        return tag @ self.kernels.T

    def encode_item(self, batch: Batch) -> torch.Tensor:
        """[B, out + K]: the unit-norm item vector, then the gate logits."""
        v = F.normalize(self.item_tower(self.tokens.item(batch).flatten(1)), dim=-1)
        return torch.cat([v, self.gate_logits(batch)], dim=-1)

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Row-wise logit s * sum_k softmax(g)_k <e_k, v> + b: [B]."""
        return self.log_scale.exp() * score_pairs("mvke", u, v) + self.bias

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.score(self.encode_user(batch), self.encode_item(batch))


def build(spec, cfg, teachers) -> StudentOnly:
    """MVKE trained with BCE (heads: "student")."""
    return StudentOnly(spec, cfg.model, MVKE(spec, cfg.model, cfg.distill.params))

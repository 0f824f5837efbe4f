"""A token-level dual encoder: the student of the attention-distilling methods.

Each side's field tokens go through its own small transformer (no cross-side attention:
the towers stay independent), then are pooled into one vector:

    H_u = Enc_u(tokens_u),  H_v = Enc_v(tokens_v)                [B, F, D]
    u = normalize(W_u pool(H_u)),  v = normalize(W_v pool(H_v))
    pool = mean, or attention pooling a_f = softmax_f(<q, H_f>) (VIRT's attention-weighted
    representation, with a learned query q per side)
    logit = s * <u, v> + b

Under the retrieval objectives (``student.objective`` sampled_softmax or mixed,
``rec_models.objectives``) the towers are trained by the in-batch softmax over <u, v> / tau
(u, v are single unit vectors: score kind ``dot``) and the student is a
``CalibratedTokenDualEncoder``: the same towers and stored vectors, its impression logit
calibrated on running statistics of <u, v> (``rec_models.layers.calibration``):

    logit = s * (<u, v> - mu) / sigma + b + logit(pi)

``user_states`` / ``item_states`` expose H_u, H_v so that VIRT, Distilled-DualEncoder and
ERNIE-Search can build the "virtual" user x item attention softmax(H_u H_v^T / sqrt(D))
that they align with a cross-encoder's attention at training time only; serving stores
u and v (score kind ``dot``).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rec_models.config import ModelConf
from rec_models.layers.calibration import RunningCalibration
from rec_models.layers.tokens import PublicTokens, TokenEncoder

Batch = Mapping[str, torch.Tensor]


class DualEncoderParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: int = Field(1, ge=1)
    heads: int = Field(2, ge=1)
    pooling: str = Field("attention", pattern="^(mean|attention)$")


class TokenDualEncoder(nn.Module):
    score_kind = "dot"

    def __init__(self, spec, model_conf: ModelConf, params: Optional[dict] = None,
                 tokens: Optional[PublicTokens] = None):
        super().__init__()
        self.spec, self.model_conf = spec, model_conf
        self.params = DualEncoderParams(**(params or {}))
        dim = model_conf.embedding_dim
        self.tokens = tokens or PublicTokens(spec, dim)
        p = self.params
        self.user_encoder = TokenEncoder(dim, p.layers, p.heads, model_conf.dropout)
        self.item_encoder = TokenEncoder(dim, p.layers, p.heads, model_conf.dropout)
        self.user_query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.item_query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.user_proj = nn.Linear(dim, model_conf.output_dim)
        self.item_proj = nn.Linear(dim, model_conf.output_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(8.0)))
        self.bias = nn.Parameter(torch.zeros(()))
        if self.params.pooling == "mean":   # unused: DDP requires a gradient for every trainable one
            self.user_query.requires_grad_(False)
            self.item_query.requires_grad_(False)

    @property
    def user_input_names(self) -> list[str]:
        return list(self.tokens.user_names)

    @property
    def item_input_names(self) -> list[str]:
        return list(self.tokens.item_names)

    def user_states(self, batch: Batch) -> torch.Tensor:
        return self.user_encoder(self.tokens.user(batch))[0]

    def item_states(self, batch: Batch) -> torch.Tensor:
        return self.item_encoder(self.tokens.item(batch))[0]

    def _pool(self, states: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        if self.params.pooling == "mean":
            return states.mean(1)
        weights = torch.softmax(states @ query / math.sqrt(states.shape[-1]), dim=1)   # [B, F]
        return (weights.unsqueeze(-1) * states).sum(1)

    def user_vector(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.user_proj(self._pool(states, self.user_query)), dim=-1)

    def item_vector(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.item_proj(self._pool(states, self.item_query)), dim=-1)

    def encode_user(self, batch: Batch) -> torch.Tensor:
        return self.user_vector(self.user_states(batch))

    def encode_item(self, batch: Batch) -> torch.Tensor:
        return self.item_vector(self.item_states(batch))

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * (u * v).sum(-1) + self.bias

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.score(self.encode_user(batch), self.encode_item(batch))

    @staticmethod
    def virtual_attention(user_states: torch.Tensor, item_states: torch.Tensor) -> torch.Tensor:
        """softmax over item tokens of <h_u, h_v> / sqrt(D): [B, Fu, Fi] (VIRT's virtual interaction)."""
        d = user_states.shape[-1]
        return torch.softmax(user_states @ item_states.transpose(1, 2) / math.sqrt(d), dim=-1)


class CalibratedTokenDualEncoder(RunningCalibration, TokenDualEncoder):
    """``TokenDualEncoder`` for the softmax objectives: same towers, same stored vectors
    (score kind ``dot``); ``score`` is the calibrated logit s * (<u, v> - mu) / sigma + b +
    logit(pi), state ``calibration`` (buffer), ``log_scale``, ``bias``."""

    def __init__(self, spec, model_conf: ModelConf, params: Optional[dict] = None,
                 tokens: Optional[PublicTokens] = None):
        super().__init__(spec, model_conf, params, tokens)
        self.init_calibration()

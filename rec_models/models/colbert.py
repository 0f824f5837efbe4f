"""ColBERT late interaction (Khattab and Zaharia, "ColBERT: Efficient and Effective Passage
Search via Contextualized Late Interaction over BERT", SIGIR 2020), on field tokens.

    E_u = normalize(W H_u)   [B, Fu, d]      E_v = normalize(W H_v)   [B, Fi, d]
    S(u, v) = sum_{a in user tokens} max_{b in item tokens} <E_u[a], E_v[b]>
    logit = s * S / Fu + b

Each side is still encoded alone (item vectors are computed once per item), but a user
stores Fu vectors and an item Fi vectors: the embedding tables hold them with score kind
``late_interaction`` and ``rec_models.serving.scoring`` scores them exactly as here. Trained on
labels it is an interaction-enhanced two-tower model; frozen, it is the token-level
teacher of TRMD and the intermediate model of ERNIE-Search.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from rec_models.config import ModelConf
from rec_models.models.dual_encoder import TokenDualEncoder
from rec_models.losses import bce
from rec_models.batch import label_and_weight
from rec_models.serving.scoring import score_pairs
from rec_models.layers.tokens import PublicTokens

Batch = Mapping[str, torch.Tensor]


class ColBERT(TokenDualEncoder):
    score_kind = "late_interaction"

    def __init__(self, spec, model_conf: ModelConf, params: Optional[dict] = None,
                 tokens: Optional[PublicTokens] = None):
        super().__init__(spec, model_conf, params, tokens)
        dim = model_conf.embedding_dim
        # one projection for both sides: token vectors live in one space
        self.token_proj = nn.Linear(dim, model_conf.output_dim)
        self.n_user_tokens = len(self.tokens.user_names)
        # the pooled-vector parts of the parent are unused here; frozen so DDP does not wait on them
        for module in (self.user_proj, self.item_proj):
            module.requires_grad_(False)
        self.user_query.requires_grad_(False)
        self.item_query.requires_grad_(False)

    def user_token_vectors(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.token_proj(states), dim=-1)

    def item_token_vectors(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.token_proj(states), dim=-1)

    def encode_user(self, batch: Batch) -> torch.Tensor:
        """[B, Fu, d] unit-norm token vectors."""
        return self.user_token_vectors(self.user_states(batch))

    def encode_item(self, batch: Batch) -> torch.Tensor:
        """[B, Fi, d] unit-norm token vectors."""
        return self.item_token_vectors(self.item_states(batch))

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * score_pairs("late_interaction", u, v) / self.n_user_tokens + self.bias

    def interaction(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax over item tokens of the token similarities: [B, Fu, Fi] (ERNIE-Search's
        attention target from the late-interaction stage)."""
        sim = torch.einsum("bad,bcd->bac", u, v)
        return torch.softmax(sim * math.sqrt(u.shape[-1]), dim=-1)


class ColBERTModel(nn.Module):
    """ColBERT trained on labels (heads: "student"); also the frozen TRMD teacher."""

    def __init__(self, spec, model_conf: ModelConf, params: Optional[dict] = None):
        super().__init__()
        self.spec = spec
        self.student = ColBERT(spec, model_conf, params)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"student": self.student(batch)}

    def training_loss(self, batch: Batch, step: int):
        label, weight = label_and_weight(self.spec, batch)
        loss = bce(self(batch)["student"], label, weight)
        return loss, {"loss": loss.item()}


def build(spec, cfg, teachers) -> ColBERTModel:
    return ColBERTModel(spec, cfg.model, cfg.distill.params)

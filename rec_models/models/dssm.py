"""DSSM two-tower model (Huang et al., "Learning Deep Structured Semantic Models for Web
Search using Clickthrough Data", CIKM 2013), on feature-field tokens.

    u = normalize(MLP_u([e_f for f in user fields]))          user tower
    v = normalize(MLP_v([e_g for g in item fields]))          item tower
    logit(u, v) = s * <u, v> + b,   s = exp(log_s) > 0

DSSM scores by cosine similarity; the learned positive scale s and bias b turn the cosine
(in [-1, 1]) into a logit that BCE can train. Since s > 0, ranking items for a user by
the dot product of the stored (normalised) embeddings equals ranking by the logit.

The towers see user and item fields only: never context (unknown when embeddings are
precomputed) and never privileged columns (enforced here with ``spec.assert_public``).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from rec_models.config import ModelConf
from rec_models.layers.calibration import CALIBRATION_MOMENTUM, RunningCalibration  # noqa: F401 (re-exported)
from rec_models.layers.embeddings import FieldEmbeddings
from rec_models.spec import FeatureSpec
from rec_models.layers.towers import MLP

INIT_SCALE = 8.0  # cosine * 8: logits in [-8, 8], probabilities reach 0.0003..0.9997


class DSSM(nn.Module):
    """Two towers over the public user and item fields; ``encode_user``/``encode_item`` give
    the L2-normalised vectors that the embedding job stores."""

    score_kind = "dot"

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, embeddings: Optional[FieldEmbeddings] = None):
        super().__init__()
        self.spec = spec
        self.model_conf = model_conf
        user, item = spec.user_features, spec.item_features
        if not user or not item:
            raise ValueError("DSSM needs at least one user and one item feature in the FeatureSpec")
        self._user_names = [f.name for f in user]
        self._item_names = [f.name for f in item]
        # enforced in code: neither the columns read nor the tables looked up may be privileged
        owners = [spec.embedding_table_owner(f).name for f in (*user, *item)]
        spec.assert_public(self._user_names + self._item_names + owners, "the DSSM student towers")

        dim = model_conf.embedding_dim
        if embeddings is None:
            embeddings = FieldEmbeddings(spec, (*user, *item), dim)
        else:
            if embeddings.dim != dim:
                raise ValueError(f"embeddings have dim {embeddings.dim}, model.embedding_dim is {dim}")
            embeddings.positions(self._user_names + self._item_names)  # raises if a field is missing
        # whatever these embeddings hold ends up in the exported student: public only
        spec.assert_public(embeddings.names + embeddings.table_owners, "the DSSM student embeddings")
        self.public_embeddings = embeddings
        self._user_pos = embeddings.positions(self._user_names)
        self._item_pos = embeddings.positions(self._item_names)

        self.user_tower = MLP(len(user) * dim, model_conf.tower_dims, model_conf.output_dim, model_conf.dropout)
        self.item_tower = MLP(len(item) * dim, model_conf.tower_dims, model_conf.output_dim, model_conf.dropout)
        self.log_scale = nn.Parameter(torch.tensor(math.log(INIT_SCALE)))
        self.bias = nn.Parameter(torch.zeros(()))

    # ---- inputs ------------------------------------------------------------------------
    @property
    def user_input_names(self) -> list[str]:
        return list(self._user_names)

    @property
    def item_input_names(self) -> list[str]:
        return list(self._item_names)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    # ---- towers ------------------------------------------------------------------------
    def user_from_tokens(self, user_tokens: torch.Tensor) -> torch.Tensor:
        """[B, F_user, dim] user-field tokens -> [B, output_dim], unit norm."""
        return F.normalize(self.user_tower(user_tokens.flatten(1)), dim=-1)

    def item_from_tokens(self, item_tokens: torch.Tensor) -> torch.Tensor:
        """[B, F_item, dim] item-field tokens -> [B, output_dim], unit norm."""
        return F.normalize(self.item_tower(item_tokens.flatten(1)), dim=-1)

    def encode_user(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, output_dim] L2-normalised; reads only the user columns."""
        return self.user_from_tokens(self.public_embeddings.tokens(batch, self._user_names))

    def encode_item(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, output_dim] L2-normalised; reads only the item columns."""
        return self.item_from_tokens(self.public_embeddings.tokens(batch, self._item_names))

    # ---- scores ------------------------------------------------------------------------
    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Row-wise logit s * <u_i, v_i> + b: [B]."""
        return self.scale * (u * v).sum(-1) + self.bias

    def score_matrix(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """All pairs s * U V^T + b: [B_u, B_v] (same order as U V^T, which retrieval uses)."""
        return self.scale * (u @ v.T) + self.bias

    def logit_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logit [B] from ``public_embeddings.tokens(batch)`` (lets PFD look up the shared
        public embeddings once for teacher and student)."""
        u = self.user_from_tokens(tokens[:, self._user_pos])
        v = self.item_from_tokens(tokens[:, self._item_pos])
        return self.score(u, v)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """logit [B] = s * <encode_user(batch), encode_item(batch)> + b."""
        return self.score(self.encode_user(batch), self.encode_item(batch))


class CalibratedDSSM(RunningCalibration, DSSM):
    """DSSM towers for the softmax objectives (``rec_models.objectives``): the stored vectors
    are the same, the impression logit is calibrated on running statistics of <u, v>
    (``rec_models.layers.calibration.RunningCalibration``, shared with the token students):

        logit = s * (<u, v> - mu) / sigma + b + logit(pi)

    mu, sigma^2 and pi are running statistics of <u, v> and of the label over the training
    impressions (buffer ``calibration``, updated by the objective like batch norm's: a plain
    average over the first steps, then an exponential one). A softmax is blind to any shift
    of <u, v> common to all of a user's candidates, so the dot products drift freely, and a
    bare s * <u, v> + b, whose two parameters Adam moves by about the learning rate per
    step, cannot follow. The logit is affine in <u, v> with slope s / sigma > 0: it ranks
    exactly as the stored vectors do (score kind ``dot``)."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, embeddings: Optional[FieldEmbeddings] = None):
        super().__init__(spec, model_conf, embeddings)
        self.init_calibration()

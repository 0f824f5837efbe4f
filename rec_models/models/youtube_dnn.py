"""YouTubeDNN (Covington, Adams and Sargin, "Deep Neural Networks for YouTube
Recommendations", RecSys 2016), as a two-tower candidate generator on field tokens.

    u = normalize(MLP_u([mean_j E[hist_j] ; other user field tokens]))     user tower
    v = normalize(MLP_v([item field tokens]))                              item tower

The towers are DSSM's (``rec_models.models.dssm``): a history sequence field is already one token,
the masked mean of its items' embeddings in the item-id table (``FieldEmbeddings``), so
"history pooling" is the user tower's input as is. What makes it YouTubeDNN is the
objective: next-item prediction as an extreme multi-class softmax, sampled in-batch:

    P = rows with label 1;  candidates C = the distinct items of all the batch's rows
    z_ij = <u_i, v_j> / tau - log Q_j,   Q_j = count_j / B    (logQ correction, optional)
    L_softmax = mean_{i in P}[ -log softmax_j(z_i)[item_i] ]      (0 if P is empty)

A softmax over positives says nothing about an impression's click probability, so a
calibration head is fitted on every row without touching the towers:

    logit = s * (<u, v> - mu) / sigma + b + logit(pi)
    L_cal = BCE(logit with stopgrad(<u, v>), y),   L = L_softmax + calibration_weight * L_cal

mu, sigma^2 and pi are running statistics of <u, v> and of the label over the training
impressions (buffers, updated in ``training_loss`` like batch norm's: a plain average over
the first steps, then an exponential one). They are needed because the softmax is blind to
any shift of <u, v> that is common to all of a user's candidates: the towers' dot products
drift freely (at initialisation they already sit around +0.4), and a bare s * <u, v> + b,
whose two parameters Adam moves by about the learning rate per step, cannot follow. The
"student" logit is affine in <u, v> with slope s / sigma > 0: a probability whose mean
follows the click rate, ranking exactly as the stored vectors do (score kind ``dot``).

What the softmax learns is which items a user clicks among all items, not which of the
items shown a user clicks: on the synthetic default (exposure already leans towards the
user's taste) it retrieves twice as well as DSSM (Recall@50 0.20 vs 0.09) while its
impression AUC stays near 0.5 (DSSM 0.64). Judge it by the retrieval metrics.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rec_models.config import ModelConf
from rec_models.models.dssm import DSSM
from rec_models.losses import bce, in_batch_candidates, in_batch_softmax
from rec_models.batch import item_ids, label_and_weight
from rec_models.spec import FeatureSpec, Kind

Batch = Mapping[str, torch.Tensor]
CALIBRATION_MOMENTUM = 0.02


class YouTubeDNNParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.05, gt=0)        # tau of the in-batch softmax (unit vectors)
    logq_correction: bool = True
    calibration_weight: float = Field(0.1, ge=0)  # trains only the scale and bias


class YouTubeDNN(DSSM):
    """The YouTubeDNN student: DSSM towers (history mean-pooled into the user tower), a
    logit calibrated on running statistics; ``params`` carries the objective's settings."""

    score_kind = "dot"

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, params: Optional[dict] = None):
        super().__init__(spec, model_conf)
        self.params = YouTubeDNNParams(**(params or {}))
        with torch.no_grad():
            self.log_scale.zero_()    # s multiplies a standardised score: start at 1
        # running mean and variance of <u, v>, positive rate, number of updates
        self.register_buffer("calibration", torch.tensor([0.0, 1.0, 0.5, 0.0]))

    def calibrated(self, dot: torch.Tensor) -> torch.Tensor:
        """logit = s * (dot - mu) / sigma + b + logit(pi), for any shape of ``dot``."""
        mean, var, rate, _ = self.calibration
        rate = rate.clamp(1e-4, 1 - 1e-4)
        return self.scale * (dot - mean) / (var + 1e-6).sqrt() + self.bias + torch.log(rate / (1 - rate))

    @torch.no_grad()
    def update_calibration(self, dot: torch.Tensor, label: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
        """Fold one batch into the running statistics: weight 1/n for the n-th update (a
        plain average) until that falls below CALIBRATION_MOMENTUM, then that constant."""
        w = torch.ones_like(dot) if weight is None else weight.to(dot.dtype)
        w = w / w.sum().clamp_min(1e-12)
        mean = (w * dot).sum()
        batch = torch.stack([mean, (w * (dot - mean) ** 2).sum(), (w * label.to(dot.dtype)).sum()])
        n = self.calibration[3] + 1
        step = torch.clamp(1.0 / n, min=CALIBRATION_MOMENTUM)
        self.calibration[:3] += step * (batch - self.calibration[:3])
        self.calibration[3] = n

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.calibrated((u * v).sum(-1))

    def score_matrix(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.calibrated(u @ v.T)

    @property
    def history_names(self) -> list[str]:
        """The user's history sequence fields (each one mean-pooled token of the user tower)."""
        return [n for n in self.user_input_names if self.spec.get(n).kind == Kind.sequence]


class YouTubeDNNModel(nn.Module):
    """YouTubeDNN trained with the in-batch sampled softmax (heads: "student")."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, params: Optional[dict] = None):
        super().__init__()
        self.spec = spec
        self.student = YouTubeDNN(spec, model_conf, params)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"student": self.student(batch)}

    def training_loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L = L_softmax(positives vs in-batch items, logQ) + calibration_weight * L_cal."""
        s, p = self.student, self.student.params
        label, weight = label_and_weight(self.spec, batch)
        u, v = s.encode_user(batch), s.encode_item(batch)
        dot = (u * v).sum(-1).detach()
        s.update_calibration(dot, label, weight)
        loss_cal = bce(s.calibrated(dot), label, weight)

        first, inverse, counts = in_batch_candidates(item_ids(self.spec, batch))
        log_q = torch.log(counts.to(u.dtype) / u.shape[0]) if p.logq_correction else None
        pos = label > 0.5
        loss_softmax = in_batch_softmax(u[pos], v[first], inverse[pos], p.temperature, log_q,
                                        None if weight is None else weight[pos])
        loss = loss_softmax + p.calibration_weight * loss_cal
        return loss, {"loss": loss.item(), "loss_softmax": loss_softmax.item(), "loss_calibration": loss_cal.item(),
                      "positives": float(pos.sum().item())}


def build(spec, cfg, teachers) -> YouTubeDNNModel:
    return YouTubeDNNModel(spec, cfg.model, cfg.distill.params)

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

A softmax over positives says nothing about an impression's click probability, so the
logit is ``CalibratedDSSM``'s (running statistics of <u, v> and of the label), of which a
BCE on every row trains only the scale and bias:

    L = L_softmax + calibration_weight * BCE(calibrated(stopgrad <u, v>), y)

This is ``student.objective: sampled_softmax`` of ``rec_models.objectives`` with the
history pooled into the user tower; the method keeps its own ``distill.params`` (the
paper's setting) whatever ``student.objective`` says.

What the softmax learns is which items a user clicks among all items, not which of the
items shown a user clicks: judge it by the retrieval metrics. Under the default
``student.objective`` (sampled_softmax, same temperature) ``dssm`` trains the same towers
with the same loss, so the two rows coincide (docs/results.md); YouTubeDNN keeps its own
setting when ``student.objective`` is changed.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rec_models.config import ModelConf, StudentConf
from rec_models.models.dssm import CalibratedDSSM
from rec_models.objectives import student_loss
from rec_models.batch import label_and_weight
from rec_models.spec import FeatureSpec, Kind

Batch = Mapping[str, torch.Tensor]


class YouTubeDNNParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.05, gt=0)        # tau of the in-batch softmax (unit vectors)
    logq_correction: bool = True
    calibration_weight: float = Field(0.1, ge=0)  # trains only the scale and bias


class YouTubeDNN(CalibratedDSSM):
    """The YouTubeDNN student: DSSM towers (history mean-pooled into the user tower), a
    logit calibrated on running statistics; ``params`` carries the objective's settings."""

    def __init__(self, spec: FeatureSpec, model_conf: ModelConf, params: Optional[dict] = None):
        super().__init__(spec, model_conf)
        self.params = YouTubeDNNParams(**(params or {}))

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
        p = self.student.params
        conf = StudentConf(objective="sampled_softmax", temperature=p.temperature, logq_correction=p.logq_correction,
                           calibration_weight=p.calibration_weight)
        loss, logs = student_loss(self.student, self.spec, conf, batch)
        label, _ = label_and_weight(self.spec, batch)
        return loss, {"loss": loss.item(), **logs, "positives": float((label > 0.5).sum().item())}


def build(spec, cfg, teachers) -> YouTubeDNNModel:
    return YouTubeDNNModel(spec, cfg.model, cfg.distill.params)

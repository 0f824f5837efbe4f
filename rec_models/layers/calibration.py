"""Running calibration of a retrieval student's impression logit (``student.objective``
sampled_softmax or mixed, ``rec_models.objectives``).

A softmax over candidates is blind to any shift of the retrieval score common to all of a
user's candidates, so the scores drift freely during training, and a bare s * score + b,
whose two parameters Adam moves by about the learning rate per step, cannot follow. The
calibrated logit standardises the score on running statistics first:

    logit = s * (score - mu) / sigma + b + logit(pi),     s = exp(log_s) > 0

mu, sigma^2 and pi are running statistics of the score and of the label over the training
impressions (the ``calibration`` buffer [mu, sigma^2, pi, n], updated by the objective like
batch norm's: a plain average over the first steps, then an exponential one with weight
CALIBRATION_MOMENTUM). A BCE on the *detached* score trains only s and b. The logit is
affine in the score with slope s / sigma > 0, so it ranks exactly as the stored vectors
do, whatever the score kind.

``RunningCalibration`` is a mixin for a student module that has the parameters
``log_scale`` and ``bias`` and a ``score_kind`` of ``rec_models.serving.scoring``; list it
before the student class (``class CalibratedDSSM(RunningCalibration, DSSM)``) and call
``init_calibration()`` at the end of ``__init__``. ``score`` / ``score_matrix`` then give
the calibrated logit of the stored vectors' score (``score_pairs`` / ``score_all``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from rec_models.serving.scoring import score_all, score_pairs

CALIBRATION_MOMENTUM = 0.02
CALIBRATION_INIT_SCALE = 0.1


class RunningCalibration:
    """Mixin: calibrated impression logit of a retrieval student (module docstring)."""

    def init_calibration(self) -> None:
        """s starts at CALIBRATION_INIT_SCALE: near the constant predictor logit(pi), from
        which the calibration BCE raises s as far as the score ranks clicks (a
        softmax-trained score may rank the shown items barely better than chance); the
        statistics at mu = 0, sigma^2 = 1, pi = 0.5, n = 0 updates."""
        with torch.no_grad():
            self.log_scale.fill_(math.log(CALIBRATION_INIT_SCALE))
        self.register_buffer("calibration", torch.tensor([0.0, 1.0, 0.5, 0.0]))

    def calibrated(self, score: torch.Tensor) -> torch.Tensor:
        """logit = s * (score - mu) / sigma + b + logit(pi), for any shape of ``score``."""
        mean, var, rate, _ = self.calibration
        rate = rate.clamp(1e-4, 1 - 1e-4)
        return self.log_scale.exp() * (score - mean) / (var + 1e-6).sqrt() + self.bias + torch.log(rate / (1 - rate))

    @torch.no_grad()
    def update_calibration(self, score: torch.Tensor, label: torch.Tensor,
                           weight: Optional[torch.Tensor] = None) -> None:
        """Fold one batch into the running statistics: weight 1/n for the n-th update (a
        plain average) until that falls below CALIBRATION_MOMENTUM, then that constant."""
        w = torch.ones_like(score) if weight is None else weight.to(score.dtype)
        w = w / w.sum().clamp_min(1e-12)
        mean = (w * score).sum()
        batch = torch.stack([mean, (w * (score - mean) ** 2).sum(), (w * label.to(score.dtype)).sum()])
        n = self.calibration[3] + 1
        step = torch.clamp(1.0 / n, min=CALIBRATION_MOMENTUM)
        self.calibration[:3] += step * (batch - self.calibration[:3])
        self.calibration[3] = n

    def retrieval_score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Row-wise score of the stored vectors [B] (what the tables rank by)."""
        return score_pairs(self.score_kind, u, v)

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Row-wise calibrated logit [B]."""
        return self.calibrated(self.retrieval_score(u, v))

    def score_matrix(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """All pairs' calibrated logits [B_u, B_v] (same order as the stored score_all)."""
        return self.calibrated(score_all(self.score_kind, u, v))

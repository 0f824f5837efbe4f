"""Losses as pure functions of tensors, each with its equation.

Weighted means everywhere are normalised by the weights: mean_w(l) = sum_i w_i l_i / sum_i w_i
(no weight: the plain mean), so a weight column rescales samples, not the learning rate.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _weighted_mean(loss: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    if weight is None:
        return loss.mean()
    weight = weight.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1e-12)


def bce(logit: torch.Tensor, label: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy on logits.

    L = mean_w[ -y log sigma(z) - (1 - y) log(1 - sigma(z)) ]   (computed stably from z)
    """
    loss = F.binary_cross_entropy_with_logits(logit, label.to(logit.dtype), reduction="none")
    return _weighted_mean(loss, weight)


def soft_label_distillation(
    student_logit: torch.Tensor,
    teacher_logit: torch.Tensor,
    temperature: float = 1.0,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Soft-label distillation (Hinton et al. 2015; PFD, Xu et al. KDD 2020).

    L = T^2 * mean_w[ BCE( sigma(s / T), stopgrad(sigma(t / T)) ) ]
      = T^2 * mean_w[ -p_t log sigma(s/T) - (1 - p_t) log(1 - sigma(s/T)) ],  p_t = sigma(t/T)

    dL/ds = T * (sigma(s/T) - p_t) per sample: zero when s == t, so L is minimal there
    (its minimum is the teacher's entropy, not 0). The teacher target is detached here:
    this loss never trains the teacher. T^2 keeps the gradient scale independent of T.
    """
    t = float(temperature)
    target = torch.sigmoid(teacher_logit.detach() / t)
    loss = F.binary_cross_entropy_with_logits(student_logit / t, target, reduction="none")
    return (t * t) * _weighted_mean(loss, weight)


def linear_warmup(step: int, warmup_steps: int, alpha: float) -> float:
    """alpha(step) = alpha * min(1, step / warmup_steps); alpha itself when warmup_steps == 0.

    PFD starts distilling once the jointly trained teacher has learned something: at step
    0 the teacher is random and its soft labels are noise.
    """
    if warmup_steps <= 0:
        return float(alpha)
    return float(alpha) * min(1.0, max(0, step) / warmup_steps)

"""Losses as pure functions of tensors, each with its equation.

Weighted means everywhere are normalised by the weights: mean_w(l) = sum_i w_i l_i / sum_i w_i
(no weight: the plain mean), so a weight column rescales samples, not the learning rate.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def weighted_mean(loss: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """mean_w(l) = sum_i w_i l_i / sum_i w_i; the plain mean without weights."""
    if weight is None:
        return loss.mean()
    weight = weight.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1e-12)


def bce(logit: torch.Tensor, label: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy on logits.

    L = mean_w[ -y log sigma(z) - (1 - y) log(1 - sigma(z)) ]   (computed stably from z)
    """
    loss = F.binary_cross_entropy_with_logits(logit, label.to(logit.dtype), reduction="none")
    return weighted_mean(loss, weight)


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
    return (t * t) * weighted_mean(loss, weight)


def linear_warmup(step: int, warmup_steps: int, alpha: float) -> float:
    """alpha(step) = alpha * min(1, step / warmup_steps); alpha itself when warmup_steps == 0.

    PFD starts distilling once the jointly trained teacher has learned something: at step
    0 the teacher is random and its soft labels are noise.
    """
    if warmup_steps <= 0:
        return float(alpha)
    return float(alpha) * min(1.0, max(0, step) / warmup_steps)


def in_batch_candidates(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct candidates among a batch's rows, by id: (first, inverse, counts).

    ``first[c]``: the first row holding candidate c; ``inverse[r]``: row r's candidate;
    ``counts[c]``: how many rows hold c. Rows of one id are one candidate, so an item shown
    twice in a batch is never its own negative. Give rows that must stay apart (unknown ids)
    distinct ids, e.g. negative ones.
    """
    uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((uniq.shape[0],), ids.shape[0], dtype=rows.dtype, device=ids.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return first, inverse, counts


def in_batch_softmax(
    query: torch.Tensor,
    candidates: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    log_q: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sampled softmax over in-batch candidates, with the logQ correction (Yi et al.,
    "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations",
    RecSys 2019); without ``log_q`` it is InfoNCE.

    z_ij = <q_i, c_j> / T - log Q_j                 q: [P, D], c: [C, D], Q: [C]
    L = mean_w[ -log softmax_j(z_i)[target_i] ]

    Popular items are negatives of many queries; subtracting log Q_j (their sampling
    probability, e.g. in-batch frequency) removes that bias. With no query (P = 0) the loss
    is 0, still connected to both inputs (zero gradients, so DDP sees every parameter).
    """
    if query.shape[0] == 0:
        return (query.sum() + candidates.sum()) * 0.0
    logits = query @ candidates.T / float(temperature)
    if log_q is not None:
        logits = logits - log_q.to(logits.dtype)
    loss = F.cross_entropy(logits, target, reduction="none")
    return weighted_mean(loss, weight)

"""What a dual-tower student's towers learn from (``student.objective``).

The embedding tables serve top-K retrieval over the whole catalogue, so the towers are
trained to rank all items for a user, not only the items a user was shown:

- ``pointwise``: BCE of the logit s * <u, v> + b on the impressions (DSSM's own loss:
  "which shown item gets clicked").
- ``sampled_softmax``: every row r is a query with weight w_r (its click, or a teacher's
  soft label: see below); its candidates are the distinct items of the batch's rows,
  clicked or not (so an impression's non-clicked items are negatives too), with the logQ
  correction of Yi et al. ("Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
  Recommendations", RecSys 2019):

      z_rj = <u_r, v_j> / tau - log Q_j,     Q_j = count_j (the item's rows in the batch)
      L_softmax = sum_r w_r * -log softmax_j(z_r)[item_r] / sum_r w_r

- ``mixed``: Mixed Negative Sampling (Yang et al., "Mixed Negative Sampling for Learning
  Two-tower Neural Networks in Recommendations", WWW 2020): the candidates also hold M
  items drawn uniformly from the item table (``ItemBank``), which popular-skewed batches
  rarely contain. Q_j is then the expected number of copies of j among the candidates:
  count_j + M / N for a batch item, M / N for a drawn one; a drawn item that is also a
  batch candidate is dropped (it would be its own negative).

Both softmax objectives keep a calibrated impression score for a ranking stage:
``CalibratedDSSM``'s logit, of which a BCE trains only the scale and bias (the towers'
<u, v> is detached there): L = L_softmax + calibration_weight * BCE(calibrated(<u, v>), y).

Distillation enters through ``positive_weight``: a teacher's click probability on each
impression turns the hard positive set into soft positives (see ``soft_positive_weights``).

``student.impression_weight`` beta adds beta to every row's w_r: a logged impression is a
weak positive beside its click, so the softmax target moves from the clicks towards
P(shown) * (P(click | shown) + beta), with far more rows to learn the exposure part from
(on the synthetic default, who is shown what carries most of the test clicks' signal:
docs/results.md 5.2f). Only for logged impressions: an implicit data set's sampled
negatives were never shown (``Config`` refuses the pair).

The token students (``TokenDualEncoder`` of VIRT, Distilled-DualEncoder and ERNIE-Search,
TRMD's ``TRMDStudent``) train under the same objectives through ``tower_loss``, from their
stored vectors: the softmax scores candidates by the student's own score kind (``dot``, or
TRMD's ``dot+late``: ``softmax_loss_of_kind``), the score the embedding tables rank by, and
their calibrated logit is the same ``rec_models.layers.calibration.RunningCalibration``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rec_models.batch import Batch, item_ids, label_and_weight
from rec_models.config import ConfigError, ModelConf, StudentConf
from rec_models.losses import bce, in_batch_candidates, weighted_mean
from rec_models.layers.calibration import RunningCalibration
from rec_models.models.dssm import DSSM, CalibratedDSSM
from rec_models.models.dual_encoder import CalibratedTokenDualEncoder, TokenDualEncoder
from rec_models.serving.scoring import score_all, score_pairs
from rec_models.spec import FeatureSpec

SOFTMAX_OBJECTIVES = ("sampled_softmax", "mixed")


def make_student(spec: FeatureSpec, model_conf: ModelConf, conf: StudentConf, embeddings=None) -> DSSM:
    """The DSSM student the objective trains: ``CalibratedDSSM`` for the softmax objectives."""
    cls = CalibratedDSSM if conf.objective in SOFTMAX_OBJECTIVES else DSSM
    return cls(spec, model_conf, embeddings)


def make_token_student(spec: FeatureSpec, model_conf: ModelConf, params: Optional[dict],
                       conf: StudentConf) -> TokenDualEncoder:
    """The token dual-encoder student (VIRT, Distilled-DualEncoder, ERNIE-Search and their
    undistilled baselines) the objective trains: ``CalibratedTokenDualEncoder`` for the
    softmax objectives; ``params``: ``DualEncoderParams``."""
    cls = CalibratedTokenDualEncoder if conf.objective in SOFTMAX_OBJECTIVES else TokenDualEncoder
    return cls(spec, model_conf, params)


@dataclass
class ItemBank:
    """Every item's tower inputs (the item feature table), for uniform corpus negatives.

    ``features``: column -> [N, ...] tensors; ``ids``: [N] item key index, as ``item_ids``
    gives for batch rows. Held in the training process: N rows of the item tower's columns.
    """
    features: dict[str, torch.Tensor]
    ids: torch.Tensor

    def __post_init__(self):
        if self.ids.numel() == 0:
            raise ValueError("the item bank is empty: the item feature table has no rows")

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    def sample(self, n: int, device, generator: Optional[torch.Generator] = None) -> tuple[dict, torch.Tensor]:
        """n items drawn uniformly with replacement: (tower inputs, ids) on ``device``."""
        idx = torch.randint(0, self.size, (n,), generator=generator)
        return {k: v[idx].to(device) for k, v in self.features.items()}, self.ids[idx].to(device)


def check_soft_share(option: str, share: float, objective: str) -> None:
    """A ConfigError naming ``option`` when ``share``, the teacher's share of the positive
    weights (``soft_positive_weights``' alpha), leaves [0, 1] under a softmax objective."""
    if objective in SOFTMAX_OBJECTIVES and not 0 <= share <= 1:
        raise ConfigError(f"{option}={share}: into a retrieval student (student.objective={objective}) "
                          f"it mixes click and soft label, so it must lie in [0, 1]")


def soft_positive_weights(label: torch.Tensor, teacher_logit: torch.Tensor, alpha: float,
                          temperature: float = 1.0) -> torch.Tensor:
    """w_r = (1 - alpha) * y_r + alpha * sigma(t_r / T): the click, mixed with the teacher's
    probability of it (Lopez-Paz et al., "Unifying Distillation and Privileged Information",
    ICLR 2016: the student learns from the teacher's soft labels instead of the noisy ones).
    E[sigma(t)] follows E[y] where the teacher is calibrated, so the positive mass stays the
    same while rows the teacher finds likely but were not clicked get a part of it. The
    teacher is detached: this never trains it."""
    p = torch.sigmoid(teacher_logit.detach().float() / float(temperature))
    return (1.0 - alpha) * label.float() + alpha * p


def softmax_loss(u: torch.Tensor, v: torch.Tensor, ids: torch.Tensor, positive_weight: torch.Tensor,
                 temperature: float, logq_correction: bool = True,
                 extra_v: Optional[torch.Tensor] = None, extra_ids: Optional[torch.Tensor] = None,
                 extra_expected: float = 0.0) -> torch.Tensor:
    """L_softmax of the module docstring, a pure function of tensors.

    u, v: [B, D] the rows' user and item vectors; ids: [B] item identities; positive_weight:
    [B] w_r >= 0 (rows with w_r = 0 only provide candidates); extra_v / extra_ids: [M, D] /
    [M] corpus candidates, each expected ``extra_expected`` times among the candidates
    (M / N for uniform draws). With no positive weight the loss is 0, still connected to
    both towers (DDP then sees every parameter)."""
    return softmax_loss_of_kind("dot", u, v, ids, positive_weight, temperature, logq_correction,
                                extra_v, extra_ids, extra_expected)


def softmax_loss_of_kind(score_kind: str, u: torch.Tensor, v: torch.Tensor, ids: torch.Tensor,
                         positive_weight: torch.Tensor, temperature: float, logq_correction: bool = True,
                         extra_v: Optional[torch.Tensor] = None, extra_ids: Optional[torch.Tensor] = None,
                         extra_expected: float = 0.0) -> torch.Tensor:
    """``softmax_loss`` for stored vectors of any score kind of ``rec_models.serving.scoring``:

        z_rj = score(u_r, v_j) / tau - log Q_j,     score = score_all(score_kind)

    the score the embedding tables are ranked by (``dot``: <u_r, v_j>; TRMD's ``dot+late``:
    <u_r0, v_j0> + late(u_r1:, v_j1:)). u, v: [B, ...] the rows' stored vectors; the rest as
    ``softmax_loss``."""
    first, inverse, counts = in_batch_candidates(ids)
    cand = v[first]
    expected = counts.to(u.dtype) + extra_expected
    if extra_v is not None and extra_v.shape[0]:
        fresh = ~torch.isin(extra_ids, ids)       # a drawn batch item would be its own negative
        cand = torch.cat([cand, extra_v[fresh]])
        expected = torch.cat([expected, torch.full((int(fresh.sum()),), extra_expected, dtype=u.dtype,
                                                   device=u.device)])
    query = positive_weight > 0
    if not bool(query.any()):
        return (u.sum() + cand.sum()) * 0.0
    logits = score_all(score_kind, u[query], cand) / float(temperature)
    if logq_correction:
        logits = logits - torch.log(expected)
    loss = torch.nn.functional.cross_entropy(logits, inverse[query], reduction="none")
    return weighted_mean(loss, positive_weight[query])


def student_loss(student: DSSM, spec: FeatureSpec, conf: StudentConf, batch: Batch,
                 positive_weight: Optional[torch.Tensor] = None, bank: Optional[ItemBank] = None,
                 tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, logs) of ``student`` on ``batch`` under ``conf.objective``.

    ``positive_weight``: [B] soft positives (distillation); default: the click times the
    row weight. ``tokens``: ``student.public_embeddings.tokens(batch)`` when the caller has
    already looked them up (PFD shares them with its teacher)."""
    label, weight = label_and_weight(spec, batch)
    if tokens is None:
        tokens = student.public_embeddings.tokens(batch)
    u = student.user_from_tokens(tokens[:, student._user_pos])
    v = student.item_from_tokens(tokens[:, student._item_pos])
    if conf.objective != "pointwise" and not isinstance(student, CalibratedDSSM):
        raise TypeError(f"student.objective={conf.objective} needs a CalibratedDSSM student (make_student), "
                        f"got {type(student).__name__}")
    return tower_loss(student, spec, conf, batch, u, v, positive_weight, bank)


def tower_loss(student, spec: FeatureSpec, conf: StudentConf, batch: Batch, u: torch.Tensor, v: torch.Tensor,
               positive_weight: Optional[torch.Tensor] = None,
               bank: Optional[ItemBank] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, logs) under ``conf.objective`` of any student, from its stored vectors u, v of
    the batch's rows (``encode_user`` / ``encode_item``, computed by the caller, which may
    reuse the tower states for its own terms):

        pointwise:  BCE(student.score(u, v), y)
        softmax:    softmax_loss_of_kind(score_kind) + calibration_weight * BCE(calibrated(sg score), y)

    The softmax objectives need a calibrated student (``RunningCalibration``): its running
    statistics take the batch in, and the BCE on the detached score trains only its scale
    and bias. ``positive_weight`` and ``bank`` as ``student_loss``."""
    label, weight = label_and_weight(spec, batch)
    if conf.objective == "pointwise":
        loss = bce(student.score(u, v), label, weight)
        return loss, {"loss_student": loss.item()}
    if not isinstance(student, RunningCalibration):
        raise TypeError(f"student.objective={conf.objective} needs a calibrated student (RunningCalibration: "
                        f"make_student, make_token_student), got {type(student).__name__}")
    kind = student.score_kind
    dot = score_pairs(kind, u, v).detach()
    student.update_calibration(dot, label, weight)
    loss_cal = bce(student.calibrated(dot), label, weight)

    w = label.float() if positive_weight is None else positive_weight.float()
    if conf.impression_weight:   # every row is a logged impression (Config refuses implicit data)
        w = w + conf.impression_weight
    if weight is not None:
        w = w * weight.float()
    extra_v = extra_ids = None
    extra_expected = 0.0
    if conf.objective == "mixed":
        if bank is None:
            raise ValueError("student.objective=mixed needs the item bank (the item feature table) "
                             "for its uniform corpus negatives")
        features, extra_ids = bank.sample(conf.corpus_negatives, u.device)
        extra_v = student.encode_item(features)
        extra_expected = conf.corpus_negatives / bank.size
    loss_softmax = softmax_loss_of_kind(kind, u, v, item_ids(spec, batch), w, conf.temperature,
                                        conf.logq_correction, extra_v, extra_ids, extra_expected)
    loss = loss_softmax + conf.calibration_weight * loss_cal
    return loss, {"loss_student": loss.item(), "loss_softmax": loss_softmax.item(),
                  "loss_calibration": loss_cal.item()}


def uses_item_bank(model) -> bool:
    """Whether ``model`` trains with uniform corpus negatives (the loop then gives it the bank)."""
    conf = getattr(model, "student_conf", None)
    return conf is not None and conf.objective == "mixed"


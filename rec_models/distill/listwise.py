"""Listwise distillation of a frozen cross-encoder into a retrieval student, as dense
retrieval does it (RocketQA, Qu et al., NAACL 2021; ERNIE-Search, Lu et al., 2022): the
teacher scores a query's candidates, and the student's softmax distribution over the same
candidates is matched to the teacher's.

Used by VIRT, Distilled-DualEncoder, ERNIE-Search and TRMD when ``student.objective`` is
sampled_softmax or mixed (``rec_models.objectives``). For a batch of B impression rows:

    queries   Q = the rows with a click (w_q = y_q * row weight > 0), at most
                  ``listwise_queries`` of them, drawn uniformly without replacement
    candidates C(q) = [item_q ; M - 1 distinct items of the batch's other rows, drawn
                  uniformly without replacement among the batch's distinct items != item_q]
                  M = min(listwise_candidates, number of distinct items in the batch)
    teacher   t_qj = CrossEncoder(user fields of row q, item fields of candidate j)   (no grad)
    student   s_qj = score(u_q, v_j): the student's retrieval score of its stored vectors
                  (``scoring.score_pairs`` of its score kind: what the tables rank by)

    P_t(j | q) = softmax_j(t_qj / T),    P_s(j | q) = softmax_j(s_qj / tau)
    L_listwise = mean_w_q KL( P_t(. | q) || P_s(. | q) )

tau is the student's softmax temperature (``student.temperature``, over unit-norm scores),
T the teacher's (``listwise_temperature``, over its logits), so P_s is the distribution the
retrieval softmax trains and the gradient, (P_s - P_t) / tau per candidate, has the scale
of the softmax loss's. Both distributions are over the same M candidates, so no sampling
correction enters (the KL compares two conditionals on one candidate set).

Pair inputs. The cross-encoder reads one (user, item) row. To score user q against
candidate j a pair batch is built: the user fields of row q, the item fields of the row
holding j. The teacher's privileged columns are statistics of the impression's own pair
(the user's recent CTR in the item's category, the impression's watch time, ...): they do
not exist for a pair that was never shown, so every pair of the listwise term, the
positive included, gets them neutral (0: the standardised mean of a numeric column, the
padding index of a categorical one, whose embedding is zero). The listwise target is then
the teacher's ranking from the public fields and their full interaction, the same for
every candidate; the impression's own privileged signal reaches the student through the
method's own-row terms (its attention maps, soft labels).

Cost: Q x M cross-encoder passes per step (Q <= listwise_queries, M = listwise_candidates)
instead of B x (distinct items) for every pair of the batch: with the defaults at most
128 x 16 = 2048 pair rows, under no_grad. The student's side is cheap (its vectors are
already computed; M scores per query).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rec_models.batch import item_ids, label_and_weight
from rec_models.losses import in_batch_candidates, weighted_mean
from rec_models.serving.scoring import score_pairs
from rec_models.spec import FeatureSpec, Role

Batch = Mapping[str, torch.Tensor]


class ListwiseParams(BaseModel):
    """The listwise term's settings, shared by the methods that distil a cross-encoder
    (used with the softmax objectives only; the pointwise student keeps its paper's loss)."""
    model_config = ConfigDict(extra="forbid")
    listwise_weight: float = Field(1.0, ge=0)       # weight of L_listwise
    listwise_temperature: float = Field(1.0, gt=0)  # T: the teacher's logits / T
    listwise_candidates: int = Field(16, ge=2)      # M: candidates per query, its positive included
    listwise_queries: int = Field(128, ge=1)        # at most this many clicked rows per step as queries


# ---- losses: pure functions of tensors -------------------------------------------------------
def listwise_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor, student_temperature: float,
                teacher_temperature: float = 1.0, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean_w_q KL( softmax(t_q / T) || softmax(s_q / tau) ) over [Q, M] candidate scores.

        L = mean_w_q sum_j P_t(j|q) (log P_t(j|q) - log P_s(j|q))

    >= 0, zero iff each student row equals the teacher's row times tau / T up to a constant
    (a softmax ignores a common shift). The teacher is detached: this never trains it."""
    log_p = F.log_softmax(teacher_scores.detach().float() / float(teacher_temperature), dim=-1)
    log_q = F.log_softmax(student_scores / float(student_temperature), dim=-1)
    per_query = (log_p.exp() * (log_p - log_q)).sum(-1)
    return weighted_mean(per_query, weight)


def sample_candidates(ids: torch.Tensor, query_weight: torch.Tensor, max_queries: int, candidates: int,
                      generator: Optional[torch.Generator] = None) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(query rows [Q], candidate rows [Q, M]) of the module docstring, or None when the batch
    has no query or fewer than 2 distinct items. ``cand[:, 0]`` is the query's own row (its
    positive); the other M - 1 are rows holding distinct other items of the batch (the first
    row of each), drawn uniformly without replacement. ``ids``: [B] item identities
    (``rec_models.batch.item_ids``); ``query_weight``: [B], > 0 for a query."""
    device = ids.device
    first, inverse, _ = in_batch_candidates(ids)
    m = min(int(candidates), int(first.shape[0]))
    queries = torch.nonzero(query_weight > 0, as_tuple=False).squeeze(1)
    if m < 2 or queries.numel() == 0:
        return None
    if queries.numel() > max_queries:
        pick = torch.randperm(queries.numel(), generator=generator)[:max_queries].to(device)
        queries = queries[pick.sort().values]
    keys = torch.rand(queries.numel(), first.shape[0], generator=generator).to(device)
    keys[torch.arange(queries.numel(), device=device), inverse[queries]] = -1.0   # never its own item
    others = keys.topk(m - 1, dim=1).indices
    return queries, torch.cat([queries.unsqueeze(1), first[others]], dim=1)


def pair_batch(spec: FeatureSpec, batch: Batch, user_rows: torch.Tensor, item_rows: torch.Tensor) -> dict:
    """The cross-encoder's inputs for the pairs (user of row user_rows[k], item of row
    item_rows[k]): user columns from the first, item columns from the second, privileged
    columns neutral (zeros: see the module docstring)."""
    out = {}
    for f in spec.user_features:
        out[f.name] = batch[f.name][user_rows]
    for f in spec.item_features:
        out[f.name] = batch[f.name][item_rows]
    for f in spec.by_role(Role.privileged):
        if f.name in batch:
            out[f.name] = torch.zeros_like(batch[f.name][item_rows])
    return out


def candidate_scores(score_kind: str, u: torch.Tensor, v: torch.Tensor, queries: torch.Tensor,
                     cand: torch.Tensor) -> torch.Tensor:
    """[Q, M] scores s_qj = score(u[q], v[cand[q, j]]) of stored vectors of ``score_kind``."""
    q, m = cand.shape
    return score_pairs(score_kind, u[queries.repeat_interleave(m)], v[cand.reshape(-1)]).view(q, m)


@torch.no_grad()
def teacher_candidate_scores(teacher: nn.Module, spec: FeatureSpec, batch: Batch, queries: torch.Tensor,
                             cand: torch.Tensor) -> torch.Tensor:
    """[Q, M] cross-encoder logits t_qj of the pairs (user of row q, item of row cand[q, j]),
    without a graph (the teacher is frozen)."""
    q, m = cand.shape
    pairs = pair_batch(spec, batch, queries.repeat_interleave(m), cand.reshape(-1))
    return teacher(pairs)["teacher"].view(q, m)


class ListwiseTargets:
    """One step's listwise candidates and the teacher's scores of them (computed once, used
    by every student head a method distils: ``kl``)."""

    def __init__(self, teacher: nn.Module, spec: FeatureSpec, batch: Batch, ids: torch.Tensor,
                 query_weight: torch.Tensor, params: ListwiseParams):
        self.params = params
        picked = sample_candidates(ids, query_weight, params.listwise_queries, params.listwise_candidates)
        if picked is None:
            self.queries = self.cand = self.teacher_scores = self.weight = None
        else:
            self.queries, self.cand = picked
            self.teacher_scores = teacher_candidate_scores(teacher, spec, batch, self.queries, self.cand)
            self.weight = query_weight[self.queries]

    @classmethod
    def of_batch(cls, teacher: nn.Module, spec: FeatureSpec, batch: Batch, params: ListwiseParams) -> "ListwiseTargets":
        """Queries: the batch's clicked rows, weighted by y * row weight (as the softmax's positives)."""
        label, weight = label_and_weight(spec, batch)
        w = label.float() if weight is None else label.float() * weight.float()
        return cls(teacher, spec, batch, item_ids(spec, batch), w, params)

    @property
    def empty(self) -> bool:
        return self.queries is None

    def kl(self, score_kind: str, u: torch.Tensor, v: torch.Tensor, student_temperature: float) -> torch.Tensor:
        """L_listwise of a student head with stored vectors u, v [B, ...] of the batch's rows
        (0, still connected to u and v, when the batch has no query)."""
        if self.empty:
            return (u.sum() + v.sum()) * 0.0
        scores = candidate_scores(score_kind, u, v, self.queries, self.cand)
        return listwise_kl(scores, self.teacher_scores, student_temperature, self.params.listwise_temperature,
                           self.weight)

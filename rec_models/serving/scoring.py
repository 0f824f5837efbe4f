"""How stored user and item vectors are scored, one function per score kind.

Every student's ``encode_user`` / ``encode_item`` return what the embedding tables store
(flattened, with ``score_kind`` and ``shape``); the functions here score those tensors
exactly as the student's forward pass does, so retrieval from the tables and training agree.

- ``dot``:              u [D], v [D]            s = <u, v>                       (DSSM, YouTubeDNN, ...)
- ``late_interaction``: u [Tu, D], v [Ti, D]    s = sum_a max_b <u_a, v_b>       (ColBERT)
- ``inttower``:         u [L, M, d], v [M, d]   s = sum_l max_{m, m'} <u_lm, v_m'>  (IntTower FE-block)
- ``mvke``:             u [K, D], v [D + K]     s = sum_k softmax(g)_k <e_k, v_:D>, g = v_D:  (MVKE)
- ``dot+late``:         u [1 + Tu, D], v [1 + Ti, D]  s = <u_0, v_0> + late(u_1:, v_1:)  (TRMD)

A model's logit may add a learned scale and bias on top; both are monotone, so rankings
by these scores equal rankings by the logit.
"""
from __future__ import annotations

import torch

SCORE_KINDS = ("dot", "late_interaction", "inttower", "mvke", "dot+late")


def _late(u: torch.Tensor, v: torch.Tensor, all_pairs: bool) -> torch.Tensor:
    if all_pairs:   # [U, Tu, D] x [I, Ti, D] -> [U, I]
        sim = torch.einsum("uad,ibd->uiab", u, v)
        return sim.amax(-1).sum(-1)
    sim = torch.einsum("bad,bcd->bac", u, v)   # [B, Tu, Ti]
    return sim.amax(-1).sum(-1)


def score_pairs(kind: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise scores [B] of u[b] with v[b]."""
    if kind == "dot":
        return (u * v).sum(-1)
    if kind == "late_interaction":
        return _late(u, v, all_pairs=False)
    if kind == "inttower":
        sim = torch.einsum("blmd,bnd->blmn", u, v)
        return sim.flatten(2).amax(-1).sum(-1)
    if kind == "mvke":
        k = u.shape[1]
        item, gate = v[:, :-k], v[:, -k:].softmax(-1)
        return (gate * torch.einsum("bkd,bd->bk", u, item)).sum(-1)
    if kind == "dot+late":
        return (u[:, 0] * v[:, 0]).sum(-1) + _late(u[:, 1:], v[:, 1:], all_pairs=False)
    raise ValueError(f"unknown score kind '{kind}'; known: {', '.join(SCORE_KINDS)}")


def score_all(kind: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scores [U, I] of every user row against every item row."""
    if kind == "dot":
        return u @ v.T
    if kind == "late_interaction":
        return _late(u, v, all_pairs=True)
    if kind == "inttower":
        sim = torch.einsum("ulmd,ind->uilmn", u, v)
        return sim.flatten(3).amax(-1).sum(-1)
    if kind == "mvke":
        k = u.shape[1]
        item, gate = v[:, :-k], v[:, -k:].softmax(-1)          # [I, D], [I, K]
        return torch.einsum("ukd,id,ik->ui", u, item, gate)
    if kind == "dot+late":
        return u[:, 0] @ v[:, 0].T + _late(u[:, 1:], v[:, 1:], all_pairs=True)
    raise ValueError(f"unknown score kind '{kind}'; known: {', '.join(SCORE_KINDS)}")

"""Losses and metrics: properties and agreement with brute-force versions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rec_models.losses import bce, linear_warmup, soft_label_distillation
from rec_models.metrics import auc, logloss, ndcg_at_k, recall_at_k


# ---- losses ----------------------------------------------------------------------------
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_bce_matches_formula_and_weights():
    z = torch.tensor([-2.0, 0.5, 3.0])
    y = torch.tensor([0.0, 1.0, 1.0])
    w = torch.tensor([1.0, 2.0, 0.5])
    per = [-(yi * math.log(_sigmoid(zi)) + (1 - yi) * math.log(1 - _sigmoid(zi))) for zi, yi in zip(z.tolist(), y.tolist())]
    assert bce(z, y).item() == pytest.approx(sum(per) / 3, rel=1e-5)
    assert bce(z, y, w).item() == pytest.approx(sum(p * wi for p, wi in zip(per, w.tolist())) / w.sum().item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_soft_label_matches_brute_force(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, generator=g), torch.randn(6, generator=g)
    w = torch.rand(6, generator=g)
    T = temperature
    per = []
    for si, ti in zip(s.tolist(), t.tolist()):
        p, q = _sigmoid(si / T), _sigmoid(ti / T)
        per.append(-(q * math.log(p) + (1 - q) * math.log(1 - p)))
    assert soft_label_distillation(s, t, T).item() == pytest.approx(T * T * sum(per) / 6, rel=1e-5)
    expected_w = T * T * sum(pi * wi for pi, wi in zip(per, w.tolist())) / w.sum().item()
    assert soft_label_distillation(s, t, T, w).item() == pytest.approx(expected_w, rel=1e-5)


def test_soft_label_minimal_at_teacher():
    t = torch.tensor([-1.5, 0.0, 2.0])
    s = t.clone().requires_grad_(True)
    loss = soft_label_distillation(s, t, temperature=2.0)
    loss.backward()
    assert torch.allclose(s.grad, torch.zeros(3), atol=1e-7)
    for delta in (-0.3, 0.3):
        assert soft_label_distillation(t + delta, t, 2.0) > loss.detach()


def test_soft_label_sends_no_gradient_to_teacher():
    s = torch.tensor([0.2, -1.0], requires_grad=True)
    t = torch.tensor([1.0, 0.5], requires_grad=True)
    soft_label_distillation(s, t * 2.0).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_linear_warmup():
    assert linear_warmup(0, 100, 0.5) == 0.0
    assert linear_warmup(50, 100, 0.5) == pytest.approx(0.25)
    assert linear_warmup(100, 100, 0.5) == 0.5
    assert linear_warmup(1000, 100, 0.5) == 0.5
    assert linear_warmup(0, 0, 0.5) == 0.5


# ---- metrics ---------------------------------------------------------------------------
def test_auc_and_logloss():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert auc(y, s) == pytest.approx(brute)
    assert math.isnan(auc(np.ones(5), np.arange(5)))
    p = np.array([0.0, 0.3, 1.0])
    yy = np.array([0, 1, 1])
    eps = 1e-7
    pc = np.clip(p, eps, 1 - eps)
    assert logloss(yy, p) == pytest.approx(-np.mean(yy * np.log(pc) + (1 - yy) * np.log(1 - pc)))
    assert np.isfinite(logloss([1], [0.0]))


def _brute(topk, rows, items, k):
    recalls, ndcgs = [], []
    for u in range(topk.shape[0]):
        pos = {int(i) for r, i in zip(rows, items) if r == u}
        if not pos:
            continue
        ranked = [int(i) for i in topk[u, :k]]
        hit = [i in pos for i in ranked]
        recalls.append(sum(hit) / len(pos))
        dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hit) if h)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(pos), k)))
        ndcgs.append(dcg / idcg)
    return np.mean(recalls), np.mean(ndcgs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, K = 30, 25, 8
    topk = np.stack([rng.permutation(n_items)[:K] for _ in range(n_users)])
    topk[3, 5:] = -1                                           # fewer candidates than K
    n = 120
    rows, items = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    rows, items = rows[rows != 7], items[rows != 7]            # a user without positives
    rows, items = np.concatenate([rows, rows[:5]]), np.concatenate([items, items[:5]])  # duplicates
    for k in (K, 3):
        r, g = _brute(topk, rows, items, k)
        assert recall_at_k(topk, (rows, items), k=k) == pytest.approx(r)
        assert ndcg_at_k(topk, (rows, items), k=k) == pytest.approx(g)
    assert recall_at_k(topk[:, :3], (rows, items)) == pytest.approx(_brute(topk, rows, items, 3)[0])


def test_retrieval_metrics_edge_cases():
    topk = np.array([[1, 2], [3, 4]])
    assert recall_at_k(topk, (np.array([0, 0]), np.array([2, 9]))) == 0.5
    assert ndcg_at_k(topk, (np.array([1]), np.array([3]))) == 1.0
    assert math.isnan(recall_at_k(topk, (np.array([], int), np.array([], int))))
    with pytest.raises(ValueError):
        recall_at_k(np.array([[1, 1]]), (np.array([0]), np.array([1])))

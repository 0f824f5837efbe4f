"""Shared scaffolding of the tests of methods distilled from a frozen cross-encoder
(VIRT, Distilled-DualEncoder, ERNIE-Search): small configs, interaction data, the teacher.

Test modules import these fixtures by name and set ``METHOD``.
"""
from __future__ import annotations

import copy

import pytest
import torch

from rec_models.config import load_config
from rec_models.distill.base import freeze
from rec_models.models.cross_encoder import CrossEncoder

try:
    from tests.test_models import SIZES, make_batch
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    from test_models import SIZES, make_batch

SMALL = ["model.embedding_dim=8", "model.output_dim=8", "model.tower_dims=[16]", "model.teacher_dims=[16]"]


@pytest.fixture(scope="module")
def cfg(request):
    # the method modules test their papers' losses on a pointwise student; the retrieval
    # objectives (student.objective) are tested in tests/test_objectives.py
    objective = getattr(request.module, "OBJECTIVE", "pointwise")
    return load_config(method=request.module.METHOD, overrides=[*SMALL, f"student.objective={objective}"])


@pytest.fixture(scope="module")
def spec(cfg):
    return cfg.spec.resolve(SIZES)


def interaction_batch(spec, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Random features; clicks from a user-region x item-category affinity (needs both sides)."""
    batch = make_batch(spec, n, seed)
    g = torch.Generator().manual_seed(2024)
    affinity = 3.0 * torch.randn(SIZES["region"]["vocab_size"], SIZES["category"]["vocab_size"], generator=g)
    logit = affinity[batch["region"].long(), batch["category"].long()]
    # the privileged user x category CTR reflects the same affinity (the cross-encoder teacher reads it)
    batch["ucat_ctr_7d"] = logit / 3.0 + 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(seed + 2))
    batch["label"] = torch.bernoulli(torch.sigmoid(logit), generator=torch.Generator().manual_seed(seed + 1))
    return batch


@pytest.fixture(scope="module")
def teacher(spec, cfg):
    """A cross-encoder trained a little on the interaction data, then frozen."""
    torch.manual_seed(0)
    model = CrossEncoder(spec, cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        loss, _ = model.training_loss(interaction_batch(spec, 128, seed=step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return freeze(model)


def short_training(model, spec, steps: int = 150) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Train ``model`` for ``steps`` Adam steps on interaction batches; returns its loss
    logs on a held-out batch before and after, and that batch (the model left in eval
    mode). Fails if the frozen teacher's weights moved."""
    torch.manual_seed(3)
    held_out = interaction_batch(spec, 512, seed=99_999)
    model.eval()
    with torch.no_grad():
        _, before = model.training_loss(held_out, 0)
    teacher_state = copy.deepcopy(model.teacher.state_dict())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        loss, _ = model.training_loss(interaction_batch(spec, 128, seed=step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        _, after = model.training_loss(held_out, steps)
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), f"the frozen teacher's {k} changed"
    return before, after, held_out

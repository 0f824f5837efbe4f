"""Hinton KD: the loss's properties, the model around a frozen cross-encoder, export and a
checkpoint round trip, a short training run (the worked example of adding a method)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from rec_models.config import ConfigError
from rec_models.distill.kd import KDModel, KDParams, bernoulli_kl, build, hinton_kd_loss
from rec_models.losses import bce, soft_label_distillation
from rec_models.methods import get_method
from rec_models.metrics import auc
from rec_models.models.dssm import DSSM
from rec_models.serving.export import export_student, load_student
from rec_models.training.loop import TrainJob, load_trained, save_checkpoint

try:
    from tests.cross_teacher_fixtures import SMALL, cfg, interaction_batch, short_training, spec, teacher  # noqa: F401
    from tests.test_models import make_batch
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    from cross_teacher_fixtures import SMALL, cfg, interaction_batch, short_training, spec, teacher  # noqa: F401
    from test_models import make_batch

METHOD = "kd"
pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread


@pytest.fixture
def model(spec, cfg, teacher) -> KDModel:
    torch.manual_seed(1)
    return build(spec, cfg, {"cross_encoder": copy.deepcopy(teacher)})


def _logits(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 3, torch.randn(n, generator=g) * 3


# ---- the loss ----------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_bernoulli_kl_matches_brute_force(temperature):
    s, t = _logits(7, 0)
    w = torch.rand(7, generator=torch.Generator().manual_seed(1))
    T = temperature
    per = []
    for si, ti in zip(s.tolist(), t.tolist()):
        p, q = 1 / (1 + math.exp(-ti / T)), 1 / (1 + math.exp(-si / T))
        per.append(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    assert bernoulli_kl(s, t, T).item() == pytest.approx(T * T * sum(per) / 7, rel=1e-5)
    want_w = T * T * sum(k * wi for k, wi in zip(per, w.tolist())) / w.sum().item()
    assert bernoulli_kl(s, t, T, w).item() == pytest.approx(want_w, rel=1e-5)


def test_bernoulli_kl_is_zero_iff_student_equals_teacher():
    s, t = _logits(6, 2)
    assert bernoulli_kl(t.clone(), t, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    assert bernoulli_kl(s, t, 2.0).item() > 1e-3
    # stable far in the tails, still non-negative
    big = torch.tensor([60.0, -60.0])
    assert torch.isfinite(bernoulli_kl(-big, big)) and bernoulli_kl(-big, big).item() > 10


def test_kl_has_the_soft_label_gradient_and_spares_the_teacher():
    """Same gradient as the cross-entropy form (they differ by the teacher's entropy), none to the teacher."""
    s, t = _logits(5, 3)
    s1, t1 = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    bernoulli_kl(s1, t1 * 1.0, 2.0).backward()
    s2 = s.clone().requires_grad_(True)
    soft_label_distillation(s2, t, 2.0).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)
    assert t1.grad is None


def test_hinton_loss_mixes_hard_and_soft_terms():
    s, t = _logits(8, 4)
    y = (torch.rand(8, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    for lam in (0.0, 0.3, 1.0):
        loss, hard, soft = hinton_kd_loss(s, t, y, lam, 2.0)
        assert hard.item() == pytest.approx(bce(s, y).item(), rel=1e-6)
        assert loss.item() == pytest.approx((1 - lam) * hard.item() + lam * soft.item(), rel=1e-6)
    assert hinton_kd_loss(s, t, y, 0.0)[0].item() == pytest.approx(bce(s, y).item(), rel=1e-6)


# ---- the model -----------------------------------------------------------------------------
def test_builder_validates_params_and_teacher(spec, cfg, teacher):
    assert cfg.distill.method == METHOD and cfg.distill.params == KDParams().model_dump()
    for params, key in (({"soft_wieght": 0.5}, "soft_wieght"), ({"soft_weight": 1.5}, "soft_weight"),
                        ({"temperature": 0}, "temperature")):
        bad = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"params": params})})
        with pytest.raises(ConfigError, match=rf"distill\.params\.{key}"):
            build(spec, bad, {"cross_encoder": copy.deepcopy(teacher)})
    with pytest.raises(ValueError, match="cross_encoder"):
        get_method(METHOD).build(spec, cfg, {})
    with pytest.raises(TypeError, match="CrossEncoder"):
        build(spec, cfg, {"cross_encoder": DSSM(spec, cfg.model)})


def test_teacher_stays_frozen_and_gets_no_gradient(model, spec):
    model.train()
    assert model.student.training and not model.teacher.training
    loss, logs = model.training_loss(interaction_batch(spec, 32, seed=7), step=0)
    lam = model.params.soft_weight
    assert math.isclose(logs["loss"], (1 - lam) * logs["loss_student"] + lam * logs["loss_soft"], rel_tol=1e-5)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_export_and_checkpoint_round_trips(model, spec, cfg, tmp_path):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.training_loss(interaction_batch(spec, 32, seed=10), 0)[0].backward()
    opt.step()
    batch = make_batch(spec, 12, seed=11)
    model.eval()
    path = export_student(model.student, spec, str(tmp_path / "kd.pt"))
    loaded, _, _ = load_student(path)
    assert type(loaded) is DSSM
    bundle = torch.load(path, weights_only=True)
    assert not any("teacher" in k for k in bundle["state_dict"])
    job = TrainJob(kind=METHOD, config=cfg.model_dump(mode="json"), spec_json=spec.to_json(), files={},
                   out_dir=str(tmp_path))
    save_checkpoint(str(tmp_path / "last.pt"), model, opt, 0, 1, job)
    restored, _, _ = load_trained(str(tmp_path / "last.pt"))
    with torch.no_grad():
        assert torch.equal(loaded.encode_user(batch), model.student.encode_user(batch))
        a, b = model(batch), restored(batch)
    assert torch.equal(a["student"], b["student"]) and torch.equal(a["teacher"], b["teacher"])


def test_short_training_moves_the_student_towards_the_teacher(model, spec):
    before, after, held_out = short_training(model, spec)
    with torch.no_grad():
        student_auc = auc(held_out["label"].numpy(), model(held_out)["student"].numpy())
    assert after["loss_soft"] < 0.5 * before["loss_soft"], (before, after)
    assert after["loss_student"] < before["loss_student"] and student_auc > 0.7, (before, after, student_auc)

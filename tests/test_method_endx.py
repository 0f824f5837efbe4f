"""ENDX: geometry-alignment losses (properties, brute force), the model contract, export,
and a short training run against a frozen cross-encoder."""
from __future__ import annotations

import math

import pytest
import torch

from rec_models.config import ConfigError, ModelConf, load_config
from rec_models.distill.base import freeze
from rec_models.models.cross_encoder import CrossEncoder
from rec_models.models.dssm import DSSM
from rec_models.distill.endx import (GAM_PAIRS, ENDXModel, ENDXParams, distribution_kl,
                                     geometry_alignment_terms, in_batch_log_probs)
from rec_models.serving.export import export_student, load_student
from rec_models.losses import bce
from rec_models.methods import get_method
from rec_models.metrics import auc
from rec_models.serving.scoring import SCORE_KINDS, score_all, score_pairs
from tests.test_models import SIZES, Recording, make_batch


def geometry_alignment_loss(*args) -> torch.Tensor:
    """L_GAM = L_ui + L_ii + L_iu + L_uu, as ENDXModel.training_loss sums the terms."""
    return torch.stack(list(geometry_alignment_terms(*args).values())).sum()

MODEL_OVERRIDES = ["model.embedding_dim=8", "model.tower_dims=[16]", "model.output_dim=8",
                   "model.teacher_dims=[32,16]", "model.dropout=0.0"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread


@pytest.fixture(scope="module")
def spec():
    return load_config().spec.resolve(SIZES)


@pytest.fixture(scope="module")
def conf() -> ModelConf:
    return ModelConf(embedding_dim=8, tower_dims=[16], output_dim=8, teacher_dims=[32, 16], dropout=0.0)


# a user field x item field interaction: no single side predicts the click
INTERACTION = torch.randn(SIZES["age_group"]["vocab_size"], SIZES["category"]["vocab_size"],
                          generator=torch.Generator().manual_seed(1)).sign()


def interaction_batch(spec, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Clicks y ~ Bernoulli(sigmoid(3 M[age_group, category])), M a fixed random sign table."""
    batch = make_batch(spec, n, seed)
    logit = 3.0 * INTERACTION[batch["age_group"].long(), batch["category"].long()]
    batch["label"] = torch.bernoulli(torch.sigmoid(logit), generator=torch.Generator().manual_seed(50_000 + seed))
    return batch


@pytest.fixture(scope="module")
def trained_teacher(spec, conf):
    """A cross-encoder trained briefly on the interaction data, then frozen."""
    torch.manual_seed(0)
    teacher = CrossEncoder(spec, conf, {"layers": 1, "heads": 2})
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    teacher.train()
    for step in range(120):
        loss, _ = teacher.training_loss(interaction_batch(spec, 128, seed=step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return freeze(teacher)


def fresh_teacher(spec, conf, seed: int = 0) -> CrossEncoder:
    torch.manual_seed(seed)
    return CrossEncoder(spec, conf, {"layers": 1, "heads": 2})


def frozen_copy(teacher: CrossEncoder, spec, conf) -> CrossEncoder:
    copy = CrossEncoder(spec, conf, teacher.params.model_dump())
    copy.load_state_dict(teacher.state_dict())
    return freeze(copy)


# ---- losses ------------------------------------------------------------------------------
def _brute_force_terms(tu, tv, su, sv, tau_t, tau_s) -> dict[str, float]:
    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def softmax(xs):
        m = max(xs)
        e = [math.exp(x - m) for x in xs]
        return [x / sum(e) for x in e]

    teacher, student = (tu.tolist(), tv.tolist()), (su.tolist(), sv.tolist())
    n = len(teacher[0])
    out = {}
    for name, (x, y, same) in GAM_PAIRS.items():
        total = 0.0
        for i in range(n):
            js = [j for j in range(n) if not (same and j == i)]
            pt = softmax([dot(teacher[x][i], teacher[y][j]) / tau_t for j in js])
            ps = softmax([dot(student[x][i], student[y][j]) / tau_s for j in js])
            total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
        out[name] = total / n
    return out


def _vectors(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("tau_t, tau_s", [(0.1, 0.1), (0.5, 0.2)])
def test_gam_matches_brute_force(tau_t, tau_s):
    tu, tv = _vectors(5, 6, 0), _vectors(5, 6, 1)   # teacher dim 6, student dim 3
    su, sv = _vectors(5, 3, 2), _vectors(5, 3, 3)
    terms = geometry_alignment_terms(tu, tv, su, sv, tau_t, tau_s)
    expected = _brute_force_terms(tu, tv, su, sv, tau_t, tau_s)
    assert set(terms) == {"ui", "ii", "iu", "uu"}
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert geometry_alignment_loss(tu, tv, su, sv, tau_t, tau_s).item() == pytest.approx(sum(expected.values()), rel=1e-4)


def test_in_batch_log_probs_excludes_self_on_the_same_side():
    a = _vectors(4, 3, 0)
    full = in_batch_log_probs(a, a, 0.5)
    off = in_batch_log_probs(a, a, 0.5, exclude_self=True)
    assert full.shape == (4, 4) and off.shape == (4, 3)
    assert torch.allclose(off.exp().sum(-1), torch.ones(4), atol=1e-6)
    # row 0 without the diagonal = softmax over columns 1, 2, 3 of the similarities
    sim = a @ a.T / 0.5
    assert torch.allclose(off[0], torch.log_softmax(sim[0, 1:], -1), atol=1e-6)
    assert torch.allclose(off[2], torch.log_softmax(sim[2, [0, 1, 3]], -1), atol=1e-6)


def test_gam_is_zero_when_student_matches_teacher():
    u, v = _vectors(6, 4, 0), _vectors(6, 4, 1)
    terms = geometry_alignment_terms(u, v, u.clone(), v.clone(), 0.2, 0.2)
    for name, t in terms.items():
        assert abs(t.item()) < 1e-6, name
    # a rotated student has the same geometry: still zero (logits only, no vector matching)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))
    assert geometry_alignment_loss(u, v, u @ q, v @ q, 0.2, 0.2).item() < 1e-5
    # a different geometry, or a different sharpness, is not
    assert geometry_alignment_loss(u, v, _vectors(6, 4, 7), _vectors(6, 4, 8), 0.2, 0.2).item() > 1e-2
    assert geometry_alignment_loss(u, v, u, v, 0.2, 0.5).item() > 1e-3


def test_distribution_kl_is_nonnegative_and_zero_only_at_equality():
    g = torch.Generator().manual_seed(0)
    lt = torch.log_softmax(torch.randn(5, 7, generator=g), -1)
    ls = torch.log_softmax(torch.randn(5, 7, generator=g), -1)
    assert distribution_kl(lt, ls).item() > 0
    assert distribution_kl(lt, lt).item() == pytest.approx(0.0, abs=1e-7)


def test_gam_gradient_reaches_student_not_teacher():
    tu, tv = _vectors(5, 6, 0).requires_grad_(True), _vectors(5, 6, 1).requires_grad_(True)
    su, sv = _vectors(5, 3, 2).requires_grad_(True), _vectors(5, 3, 3).requires_grad_(True)
    geometry_alignment_loss(tu * 1.0, tv * 1.0, su, sv, 0.1, 0.1).backward()
    assert tu.grad is None and tv.grad is None
    assert su.grad.abs().sum() > 0 and sv.grad.abs().sum() > 0


def test_gam_with_a_batch_of_one_is_zero_and_finite():
    u, v = _vectors(1, 4, 0), _vectors(1, 4, 1)
    s = _vectors(1, 3, 2).requires_grad_(True)
    loss = geometry_alignment_loss(u, v, s, s, 0.1, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all()


# ---- model contract ----------------------------------------------------------------------
def test_heads_shapes_and_teacher_head(spec, conf, trained_teacher):
    model = ENDXModel(spec, conf, {}, frozen_copy(trained_teacher, spec, conf)).eval()
    batch = make_batch(spec, 7)
    with torch.no_grad():
        out = model(batch)
        assert set(out) == {"student", "teacher"}
        assert out["student"].shape == out["teacher"].shape == (7,)
        assert torch.allclose(out["teacher"], trained_teacher(batch)["teacher"], atol=1e-6)
        u, v = model.student.encode_user(batch), model.student.encode_item(batch)
        _, tu, tv = model.teacher_embeddings(batch)
    assert u.shape == v.shape == (7, conf.output_dim)
    assert tu.shape == tv.shape == (7, conf.embedding_dim)
    assert torch.allclose(tu.norm(dim=-1), torch.ones(7), atol=1e-5)
    assert isinstance(model.student, DSSM) and model.student.score_kind in SCORE_KINDS
    assert model.student.score_kind == "dot"


def test_teacher_is_frozen_submodule_in_eval_mode(spec, conf):
    teacher = fresh_teacher(spec, conf)          # arrives trainable (as load_trained builds it)
    model = ENDXModel(spec, conf, {}, teacher)
    model.train()
    assert model.student.training and not model.teacher.training
    assert not any(m.training for m in model.teacher.modules())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert any(k.startswith("teacher.") for k in model.state_dict())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.student.parameters()}
    loss, logs = model.training_loss(make_batch(spec, 16, seed=1), step=0)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.user_tower[0].weight.grad.abs().sum() > 0
    assert model.student.item_tower[0].weight.grad.abs().sum() > 0


def test_training_loss_terms(spec, conf, trained_teacher):
    params = ENDXParams(gam_weight=0.7, temperature_teacher=0.3, temperature_student=0.2)
    model = ENDXModel(spec, conf, params, frozen_copy(trained_teacher, spec, conf))
    batch = make_batch(spec, 16, seed=2)
    loss, logs = model.training_loss(batch, step=5)
    assert set(logs) == {"loss", "loss_student", "loss_gam", "gam_ui", "gam_ii", "gam_iu", "gam_uu"}
    assert logs["loss"] == pytest.approx(logs["loss_student"] + 0.7 * logs["loss_gam"], rel=1e-5)
    assert logs["loss_gam"] == pytest.approx(sum(logs[f"gam_{k}"] for k in GAM_PAIRS), rel=1e-5)
    assert logs["loss_gam"] > 0
    with torch.no_grad():
        assert logs["loss_student"] == pytest.approx(bce(model.student(batch), batch["label"]).item(), rel=1e-5)
        _, tu, tv = model.teacher_embeddings(batch)
        u, v = model.student.encode_user(batch), model.student.encode_item(batch)
        expected = geometry_alignment_loss(tu, tv, u, v, 0.3, 0.2).item()
    assert logs["loss_gam"] == pytest.approx(expected, rel=1e-5)


def test_towers_run_on_side_only_batches(spec, conf, trained_teacher):
    model = ENDXModel(spec, conf, {}, frozen_copy(trained_teacher, spec, conf)).eval()
    student = model.student
    full = make_batch(spec, 6)
    user_names, item_names = {f.name for f in spec.user_features}, {f.name for f in spec.item_features}
    assert set(student.user_input_names) == user_names and set(student.item_input_names) == item_names
    with torch.no_grad():
        u = student.encode_user({k: full[k] for k in user_names})
        v = student.encode_item({k: full[k] for k in item_names})
        assert torch.equal(u, student.encode_user(full)) and torch.equal(v, student.encode_item(full))
        rec = Recording(full)
        student.encode_user(rec)
        assert rec.read == user_names
        rec = Recording(full)
        student.encode_item(rec)
        assert rec.read == item_names
        rec = Recording(full)
        student(rec)
        assert not rec.read & (spec.privileged_names | {"label"})


def _all_pairs(batch, user_names, item_names, n_users, n_items):
    """users 0..n_users-1 x items 0..n_items-1 (user-major), as one batch."""
    out = {}
    for k in user_names:
        out[k] = batch[k][:n_users].repeat_interleave(n_items, dim=0)
    for k in item_names:
        out[k] = batch[k][:n_items].repeat(n_users, *([1] * (batch[k].ndim - 1)))
    return out


def test_stored_embedding_scores_equal_forward(spec, conf, trained_teacher):
    torch.manual_seed(3)
    model = ENDXModel(spec, conf, {}, frozen_copy(trained_teacher, spec, conf))
    model.training_loss(make_batch(spec, 16), 0)[0].backward()   # arbitrary, untrained weights are fine
    student = model.student.eval()
    batch = make_batch(spec, 12, seed=4)
    with torch.no_grad():
        u, v = student.encode_user(batch), student.encode_item(batch)
        logit = student(batch)
        kind = student.score_kind
        assert torch.allclose(student.scale * score_pairs(kind, u, v) + student.bias, logit, atol=1e-5)
        pairs = _all_pairs(batch, student.user_input_names, student.item_input_names, 5, 12)
        by_logit = student(pairs).view(5, 12)
        by_table = score_all(kind, u[:5], v)
        assert torch.allclose(student.scale * by_table + student.bias, by_logit, atol=1e-5)
        assert torch.equal(torch.argsort(by_table, dim=1, descending=True),
                           torch.argsort(by_logit, dim=1, descending=True))


def test_student_export_round_trip(spec, conf, trained_teacher, tmp_path):
    torch.manual_seed(5)
    model = ENDXModel(spec, conf, {}, frozen_copy(trained_teacher, spec, conf))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss, _ = model.training_loss(make_batch(spec, 16, seed=step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    student = model.student.eval()
    path = export_student(student, spec, str(tmp_path / "endx.pt"), meta={"method": "endx"})
    loaded, loaded_spec, meta = load_student(path)
    assert type(loaded) is type(student) and meta == {"method": "endx"}
    assert not loaded_spec.privileged_names
    bundle = torch.load(path, weights_only=True)
    assert bundle["score_kind"] == "dot" and bundle["params"] == {}
    assert not any("teacher" in k for k in bundle["state_dict"])
    batch = make_batch(spec, 9, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded.encode_user(batch), student.encode_user(batch))
        assert torch.equal(loaded.encode_item(batch), student.encode_item(batch))
        assert torch.equal(loaded(batch), student(batch))


def test_checkpoint_reloads_into_a_rebuilt_model(spec, conf, trained_teacher):
    """As train.load_trained: teachers rebuilt untrained, then the whole state dict loaded."""
    torch.manual_seed(6)
    model = ENDXModel(spec, conf, {}, frozen_copy(trained_teacher, spec, conf)).eval()
    rebuilt = ENDXModel(spec, conf, {}, fresh_teacher(spec, conf, seed=99))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    batch = make_batch(spec, 8, seed=7)
    with torch.no_grad():
        a, b = model(batch), rebuilt(batch)
    assert torch.equal(a["teacher"], b["teacher"]) and torch.equal(a["student"], b["student"])


# ---- builder and conf --------------------------------------------------------------------
def test_builder_uses_conf_and_rejects_unknown_params(spec, conf, trained_teacher):
    cfg = load_config(method="endx", overrides=MODEL_OVERRIDES)
    assert cfg.distill.params == ENDXParams().model_dump()   # the YAML lists every param, at its default
    teachers = {"cross_encoder": frozen_copy(trained_teacher, spec, conf)}
    model = get_method("endx").build(spec, cfg, teachers)
    assert isinstance(model, ENDXModel) and model.teacher is teachers["cross_encoder"]
    bad = load_config(method="endx", overrides=MODEL_OVERRIDES + ["distill.params.gam_wieght=2"])
    with pytest.raises(ConfigError, match=r"distill\.params\.gam_wieght"):
        get_method("endx").build(spec, bad, teachers)
    bad = load_config(method="endx", overrides=MODEL_OVERRIDES + ["distill.params.temperature_student=0"])
    with pytest.raises(ConfigError, match=r"distill\.params\.temperature_student"):
        get_method("endx").build(spec, bad, teachers)
    with pytest.raises(ValueError, match="cross_encoder"):
        get_method("endx").build(spec, cfg, {})


# ---- a short training run ----------------------------------------------------------------
def test_training_lowers_the_loss(spec, conf, trained_teacher):
    torch.manual_seed(0)
    model = ENDXModel(spec, conf, ENDXParams(), frozen_copy(trained_teacher, spec, conf))
    held_out = interaction_batch(spec, 1024, seed=77_777)
    with torch.no_grad():
        teacher_auc = auc(held_out["label"].numpy(), model(held_out)["teacher"].numpy())
    assert teacher_auc > 0.75, teacher_auc   # the teacher did learn the interaction

    def evaluate():
        model.eval()
        with torch.no_grad():
            _, logs = model.training_loss(held_out, 0)
            student_auc = auc(held_out["label"].numpy(), model(held_out)["student"].numpy())
        model.train()
        return logs, student_auc

    before, auc_before = evaluate()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    teacher_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.train()
    for step in range(150):
        loss, _ = model.training_loss(interaction_batch(spec, 128, seed=1000 + step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, auc_after = evaluate()
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert after["loss_student"] < before["loss_student"] - 0.02, (before, after)
    assert auc_after > max(0.8, auc_before + 0.1), (auc_before, auc_after)
    for k, v in model.teacher.state_dict().items():   # never optimised
        assert torch.equal(v, teacher_state[k]), k


def test_gam_alone_aligns_the_student_geometry(spec, conf, trained_teacher):
    """Trained on L_GAM only, the student's in-batch distributions approach the teacher's."""
    torch.manual_seed(1)
    model = ENDXModel(spec, conf, {}, frozen_copy(trained_teacher, spec, conf))
    held_out = interaction_batch(spec, 256, seed=88_888)

    def gam():
        with torch.no_grad():
            _, tu, tv = model.teacher_embeddings(held_out)
            return geometry_alignment_loss(tu, tv, model.student.encode_user(held_out),
                                           model.student.encode_item(held_out), 0.1, 0.1).item()

    before = gam()
    opt = torch.optim.Adam(model.student.parameters(), lr=1e-2)
    for step in range(60):
        batch = interaction_batch(spec, 128, seed=2000 + step)
        _, tu, tv = model.teacher_embeddings(batch)
        loss = geometry_alignment_loss(tu, tv, model.student.encode_user(batch), model.student.encode_item(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = gam()
    assert after < 0.9 * before, (before, after)   # a two-tower student cannot reach 0: cross embeddings depend on the pair

"""TRMD: token-alignment and CLS losses (properties, brute force), the two-ranker student
(dot+late score kind), the model contract with two frozen teachers, export, training."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from rec_models.models.colbert import ColBERTModel
from rec_models.config import ConfigError, ModelConf, load_config
from rec_models.distill.base import freeze
from rec_models.models.cross_encoder import CrossEncoder
from rec_models.serving.export import export_student, load_student
from rec_models.losses import bce
from rec_models.methods import get_method
from rec_models.metrics import auc
from rec_models.serving.scoring import SCORE_KINDS, score_all, score_pairs
from rec_models.distill.trmd import TRMDModel, TRMDParams, TRMDStudent, cls_distillation_loss, rep_alignment_loss, token_mse
from tests.test_models import SIZES, Recording, make_batch

MODEL_OVERRIDES = ["model.embedding_dim=8", "model.tower_dims=[16]", "model.output_dim=8",
                   "model.teacher_dims=[32,16]", "model.dropout=0.0"]
COLBERT_PARAMS = {"layers": 1, "heads": 2, "pooling": "mean"}
CROSS_PARAMS = {"layers": 1, "heads": 2}


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


def _train(model, spec, steps: int):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        loss, _ = model.training_loss(interaction_batch(spec, 128, seed=step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return freeze(model)


@pytest.fixture(scope="module")
def trained_teachers(spec, conf):
    """(cross-encoder, ColBERT) trained briefly on the interaction data, then frozen."""
    torch.manual_seed(0)
    cross = _train(CrossEncoder(spec, conf, CROSS_PARAMS), spec, 120)
    torch.manual_seed(1)
    colbert = _train(ColBERTModel(spec, conf, COLBERT_PARAMS), spec, 120)
    return cross, colbert


def teachers_copy(trained_teachers, spec, conf):
    """Frozen copies (a model may only own its teachers once)."""
    cross, colbert = trained_teachers
    c = CrossEncoder(spec, conf, CROSS_PARAMS)
    c.load_state_dict(cross.state_dict())
    b = ColBERTModel(spec, conf, COLBERT_PARAMS)
    b.load_state_dict(colbert.state_dict())
    return freeze(c), freeze(b)


def make_model(spec, conf, trained_teachers, params=None) -> TRMDModel:
    return TRMDModel(spec, conf, params, *teachers_copy(trained_teachers, spec, conf))


def _unit(shape, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---- losses ------------------------------------------------------------------------------
def test_rep_alignment_matches_brute_force():
    su, sv, tu, tv = _unit((3, 5, 4), 0), _unit((3, 2, 4), 1), _unit((3, 5, 4), 2), _unit((3, 2, 4), 3)

    def mse(s, t):
        s, t = s.tolist(), t.tolist()
        vals = [(a - b) ** 2 for sb, tb in zip(s, t) for sa, ta in zip(sb, tb) for a, b in zip(sa, ta)]
        return sum(vals) / len(vals)

    expected = mse(su, tu) + mse(sv, tv)
    assert rep_alignment_loss(su, sv, tu, tv).item() == pytest.approx(expected, rel=1e-5)
    assert token_mse(su, tu).item() == pytest.approx(mse(su, tu), rel=1e-5)


def test_rep_alignment_is_zero_only_at_the_teacher():
    tu, tv = _unit((4, 5, 8), 0), _unit((4, 4, 8), 1)
    assert rep_alignment_loss(tu.clone(), tv.clone(), tu, tv).item() == 0.0
    assert rep_alignment_loss(_unit((4, 5, 8), 5), tv, tu, tv).item() > 1e-2
    assert rep_alignment_loss(tu, _unit((4, 4, 8), 6), tu, tv).item() > 1e-2
    with pytest.raises(ValueError, match="differ"):
        rep_alignment_loss(tu[:, :3], tv, tu, tv)


def test_rep_alignment_gradient_reaches_student_not_teacher():
    su, sv = _unit((2, 5, 4), 0).requires_grad_(True), _unit((2, 3, 4), 1).requires_grad_(True)
    tu, tv = _unit((2, 5, 4), 2).requires_grad_(True), _unit((2, 3, 4), 3).requires_grad_(True)
    rep_alignment_loss(su, sv, tu * 1.0, tv * 1.0).backward()
    assert tu.grad is None and tv.grad is None
    assert su.grad.abs().sum() > 0 and sv.grad.abs().sum() > 0


def test_cls_distillation_minimal_at_teacher_and_teacher_gets_no_gradient():
    t = torch.tensor([-2.0, 0.3, 1.5], requires_grad=True)
    s = t.detach().clone().requires_grad_(True)
    loss = cls_distillation_loss(s, t * 1.0, temperature=2.0)
    loss.backward()
    assert t.grad is None
    assert torch.allclose(s.grad, torch.zeros(3), atol=1e-7)
    for delta in (-0.5, 0.5):
        assert cls_distillation_loss(t.detach() + delta, t.detach(), 2.0) > loss.detach()
    # brute force: T^2 * mean BCE(sigmoid(s/T), sigmoid(t/T))
    z, y, T = [0.4, -1.0], [1.2, 0.1], 2.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    per = [-(sig(b / T) * math.log(sig(a / T)) + (1 - sig(b / T)) * math.log(1 - sig(a / T))) for a, b in zip(z, y)]
    assert cls_distillation_loss(torch.tensor(z), torch.tensor(y), T).item() == pytest.approx(T * T * sum(per) / 2, rel=1e-5)


# ---- student: the two rankers and the dot+late score kind ----------------------------------
def test_student_encodings_and_score_kind(spec, conf):
    torch.manual_seed(0)
    student = TRMDStudent(spec, conf).eval()
    batch = make_batch(spec, 6)
    fu, fi = len(spec.user_features), len(spec.item_features)
    assert student.score_kind == "dot+late" and student.score_kind in SCORE_KINDS
    with torch.no_grad():
        u, v = student.encode_user(batch), student.encode_item(batch)
        (u0, eu), (v0, ev) = student.user_parts(batch), student.item_parts(batch)
    assert u.shape == (6, 1 + fu, conf.output_dim) and v.shape == (6, 1 + fi, conf.output_dim)
    assert torch.equal(u[:, 0], u0) and torch.equal(v[:, 0], v0)
    for x in (u0, v0, eu, ev):
        assert torch.allclose(x.norm(dim=-1), torch.ones(x.shape[:-1]), atol=1e-5)
    assert torch.allclose(u[:, 1:], eu / math.sqrt(fu)) and torch.allclose(v[:, 1:], ev / math.sqrt(fu))
    # brute force: <u_0, v_0> + (1/Fu) sum_a max_b <E_u[a], E_v[b]>
    for b in range(6):
        late = sum(max(float(eu[b, a] @ ev[b, c]) for c in range(fi)) for a in range(fu)) / fu
        expected = float(u0[b] @ v0[b]) + late
        assert score_pairs("dot+late", u, v)[b].item() == pytest.approx(expected, abs=1e-5)


def test_towers_run_on_side_only_batches(spec, conf):
    student = TRMDStudent(spec, conf).eval()
    full = make_batch(spec, 5)
    user_names, item_names = {f.name for f in spec.user_features}, {f.name for f in spec.item_features}
    assert set(student.user_input_names) == user_names and set(student.item_input_names) == item_names
    with torch.no_grad():
        assert torch.equal(student.encode_user({k: full[k] for k in user_names}), student.encode_user(full))
        assert torch.equal(student.encode_item({k: full[k] for k in item_names}), student.encode_item(full))
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


def test_stored_embedding_scores_equal_forward(spec, conf, trained_teachers):
    torch.manual_seed(3)
    model = make_model(spec, conf, trained_teachers)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):   # move away from the initialisation
        loss, _ = model.training_loss(make_batch(spec, 16, seed=step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    student = model.student.eval()
    batch = make_batch(spec, 12, seed=4)
    with torch.no_grad():
        u, v = student.encode_user(batch), student.encode_item(batch)
        logit = student(batch)
        scale, bias = student.log_scale.exp(), student.bias
        assert torch.allclose(scale * score_pairs(student.score_kind, u, v) + bias, logit, atol=1e-5)
        pairs = _all_pairs(batch, student.user_input_names, student.item_input_names, 5, 12)
        by_logit = student(pairs).view(5, 12)
        by_table = score_all(student.score_kind, u[:5], v)
        assert torch.allclose(scale * by_table + bias, by_logit, atol=1e-5)
        assert torch.equal(torch.argsort(by_table, dim=1, descending=True),
                           torch.argsort(by_logit, dim=1, descending=True))


# ---- model contract ----------------------------------------------------------------------
def test_heads_and_teacher_head(spec, conf, trained_teachers):
    model = make_model(spec, conf, trained_teachers).eval()
    batch = make_batch(spec, 7)
    with torch.no_grad():
        out = model(batch)
        assert set(out) == {"student", "teacher"}
        assert out["student"].shape == out["teacher"].shape == (7,)
        assert torch.allclose(out["teacher"], trained_teachers[0](batch)["teacher"], atol=1e-6)
        assert torch.equal(out["student"], model.student(batch))


def test_teachers_are_frozen_submodules_in_eval_mode(spec, conf):
    torch.manual_seed(0)
    # teachers arrive trainable here (as train.load_trained rebuilds them): the model freezes them
    model = TRMDModel(spec, conf, {}, CrossEncoder(spec, conf, CROSS_PARAMS), ColBERTModel(spec, conf, COLBERT_PARAMS))
    model.train()
    assert model.student.training
    for teacher in (model.cross_teacher, model.colbert_teacher):
        assert not any(m.training for m in teacher.modules())
        assert all(not p.requires_grad for p in teacher.parameters())
    keys = model.state_dict().keys()
    assert any(k.startswith("cross_teacher.") for k in keys) and any(k.startswith("colbert_teacher.") for k in keys)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.student.parameters()} | {id(model.cls_log_scale), id(model.cls_bias)}
    loss, _ = model.training_loss(make_batch(spec, 16, seed=1), step=0)
    loss.backward()
    for teacher in (model.cross_teacher, model.colbert_teacher):
        assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_every_trainable_parameter_gets_a_gradient(spec, conf, trained_teachers, pooling):
    """DDP (find_unused_parameters=False) needs a gradient for every trainable parameter."""
    model = make_model(spec, conf, trained_teachers, {"pooling": pooling})
    model.training_loss(make_batch(spec, 16, seed=2), step=0)[0].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_training_loss_terms(spec, conf, trained_teachers):
    params = TRMDParams(cls_weight=0.3, rep_weight=2.0, temperature=1.5)
    model = make_model(spec, conf, trained_teachers, params)
    batch = make_batch(spec, 16, seed=3)
    loss, logs = model.training_loss(batch, step=0)
    assert set(logs) == {"loss", "loss_student", "loss_cls", "loss_rep"}
    assert logs["loss"] == pytest.approx(logs["loss_student"] + 0.3 * logs["loss_cls"] + 2.0 * logs["loss_rep"], rel=1e-5)
    assert loss.item() == pytest.approx(logs["loss"])
    st = model.student
    with torch.no_grad():
        assert logs["loss_student"] == pytest.approx(bce(st(batch), batch["label"]).item(), rel=1e-5)
        (u0, eu), (v0, ev) = st.user_parts(batch), st.item_parts(batch)
        colbert = model.colbert_teacher.student
        rep = rep_alignment_loss(eu, ev, colbert.encode_user(batch), colbert.encode_item(batch)).item()
        teacher_logit = model.cross_teacher(batch)["teacher"]
        cls = cls_distillation_loss(model.cls_logit(u0, v0), teacher_logit, 1.5).item()
    assert logs["loss_rep"] == pytest.approx(rep, rel=1e-5) and rep > 0
    assert logs["loss_cls"] == pytest.approx(cls, rel=1e-5)


def test_colbert_teacher_must_match_the_student_tokens(spec, conf, trained_teachers):
    cross = teachers_copy(trained_teachers, spec, conf)[0]
    other = ModelConf(**{**conf.model_dump(), "output_dim": 4})
    with pytest.raises(ValueError, match="output_dim"):
        TRMDModel(spec, conf, {}, cross, ColBERTModel(spec, other, COLBERT_PARAMS))
    with pytest.raises(TypeError, match="ColBERT"):
        TRMDModel(spec, conf, {}, cross, torch.nn.Linear(2, 2))


def test_student_export_round_trip(spec, conf, trained_teachers, tmp_path):
    torch.manual_seed(5)
    model = make_model(spec, conf, trained_teachers, {"pooling": "mean", "layers": 2})
    model.training_loss(make_batch(spec, 16), 0)[0].backward()
    student = model.student.eval()
    path = export_student(student, spec, str(tmp_path / "trmd.pt"), meta={"method": "trmd"})
    loaded, loaded_spec, meta = load_student(path)
    assert type(loaded) is TRMDStudent and meta == {"method": "trmd"}
    assert loaded.params == student.params and loaded.params.pooling == "mean" and loaded.params.layers == 2
    assert not loaded_spec.privileged_names
    bundle = torch.load(path, weights_only=True)
    assert bundle["score_kind"] == "dot+late"
    assert not any("teacher" in k or k.startswith("cls_") for k in bundle["state_dict"])
    batch = make_batch(spec, 9, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded.encode_user(batch), student.encode_user(batch))
        assert torch.equal(loaded.encode_item(batch), student.encode_item(batch))
        assert torch.equal(loaded(batch), student(batch))


def test_checkpoint_reloads_into_a_rebuilt_model(spec, conf, trained_teachers):
    """As train.load_trained: teachers rebuilt untrained, then the whole state dict loaded."""
    model = make_model(spec, conf, trained_teachers).eval()
    torch.manual_seed(99)
    rebuilt = TRMDModel(spec, conf, {}, CrossEncoder(spec, conf, CROSS_PARAMS), ColBERTModel(spec, conf, COLBERT_PARAMS))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    batch = make_batch(spec, 8, seed=7)
    with torch.no_grad():
        a, b = model(batch), rebuilt(batch)
        assert torch.equal(a["teacher"], b["teacher"]) and torch.equal(a["student"], b["student"])
        assert torch.equal(model.teacher_tokens(batch)[0], rebuilt.teacher_tokens(batch)[0])


# ---- builder and conf --------------------------------------------------------------------
def test_builder_uses_conf_and_rejects_unknown_params(spec, conf, trained_teachers):
    cfg = load_config(method="trmd", overrides=MODEL_OVERRIDES)
    assert cfg.distill.params == TRMDParams().model_dump()   # the YAML lists every param, at its default
    cross, colbert = teachers_copy(trained_teachers, spec, conf)
    teachers = {"cross_encoder": cross, "colbert": colbert}
    model = get_method("trmd").build(spec, cfg, teachers)
    assert isinstance(model, TRMDModel)
    assert model.cross_teacher is cross and model.colbert_teacher is colbert
    bad = load_config(method="trmd", overrides=MODEL_OVERRIDES + ["distill.params.rep_wieght=2"])
    with pytest.raises(ConfigError, match=r"distill\.params\.rep_wieght"):
        get_method("trmd").build(spec, bad, teachers)
    bad = load_config(method="trmd", overrides=MODEL_OVERRIDES + ["distill.params.pooling=max"])
    with pytest.raises(ConfigError, match=r"distill\.params\.pooling"):
        get_method("trmd").build(spec, bad, teachers)
    with pytest.raises(ValueError, match="colbert"):
        get_method("trmd").build(spec, cfg, {"cross_encoder": cross})
    with pytest.raises(ValidationError, match="bogus"):
        TRMDStudent(spec, conf, {"bogus": 1})


# ---- a short training run ----------------------------------------------------------------
def test_training_lowers_the_loss(spec, conf, trained_teachers):
    torch.manual_seed(0)
    model = make_model(spec, conf, trained_teachers)
    held_out = interaction_batch(spec, 1024, seed=77_777)
    with torch.no_grad():
        teacher_auc = auc(held_out["label"].numpy(), model(held_out)["teacher"].numpy())
    assert teacher_auc > 0.75, teacher_auc   # the cross-encoder did learn the interaction

    def evaluate():
        model.eval()
        with torch.no_grad():
            _, logs = model.training_loss(held_out, 0)
            student_auc = auc(held_out["label"].numpy(), model(held_out)["student"].numpy())
        model.train()
        return logs, student_auc

    before, auc_before = evaluate()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "teacher." in k}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(150):
        loss, _ = model.training_loss(interaction_batch(spec, 128, seed=1000 + step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, auc_after = evaluate()
    for key in ("loss", "loss_student", "loss_cls", "loss_rep"):
        assert after[key] < before[key] - 0.01, (key, before, after)
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert auc_after > max(0.8, auc_before + 0.1), (auc_before, auc_after)
    state = model.state_dict()
    for k, v in frozen.items():   # the teachers were never optimised
        assert torch.equal(state[k], v), k

"""Distilled-DualEncoder: attention KL loss, soft labels, the model around a frozen cross-encoder,
export, a short training run."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from rec_models.config import ConfigError
from rec_models.models.cross_encoder import CrossEncoder
from rec_models.distill.distilled_dual_encoder import DistilledDualEncoderModel, DistilledDualEncoderParams, attention_kl, build
from rec_models.models.dual_encoder import TokenDualEncoder
from rec_models.serving.export import export_student, load_student
from rec_models.losses import soft_label_distillation
from rec_models.methods import get_method
from rec_models.metrics import auc
from rec_models.serving.scoring import score_all, score_pairs
from rec_models.training.loop import TrainJob, load_trained, save_checkpoint

try:
    from tests.test_models import SIZES, Recording, make_batch
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    from test_models import SIZES, Recording, make_batch

METHOD = "distilled_dual_encoder"

try:
    from tests.cross_teacher_fixtures import SMALL, cfg, interaction_batch, short_training, spec, teacher  # noqa: F401
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    from cross_teacher_fixtures import SMALL, cfg, interaction_batch, short_training, spec, teacher  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread


@pytest.fixture
def model(spec, cfg, teacher) -> DistilledDualEncoderModel:
    torch.manual_seed(1)
    return build(spec, cfg, {"cross_encoder": copy.deepcopy(teacher)})


def _attention(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * 2, dim=-1)


# ---- the loss ----------------------------------------------------------------------------
def test_attention_kl_zero_iff_equal_and_positive_otherwise():
    a, b = _attention((4, 5, 4), 0), _attention((4, 5, 4), 1)
    assert abs(attention_kl(a, a.clone()).item()) < 1e-6
    assert attention_kl(a, b).item() > 1e-3 and attention_kl(b, a).item() > 1e-3
    c = a.clone()
    c[2, 3] = b[2, 3]  # one differing row is enough
    assert attention_kl(c, a).item() > 0


def test_attention_kl_matches_brute_force():
    s, t = _attention((3, 5, 4), 2), _attention((3, 5, 4), 3)
    t[0, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # a one-hot teacher row: 0 log 0 = 0
    w = torch.tensor([1.0, 2.0, 0.5])
    per = []
    for b in range(3):
        rows = []
        for a in range(5):
            kl = 0.0
            for c in range(4):
                p, q = t[b, a, c].item(), s[b, a, c].item()
                if p > 0:
                    kl += p * (math.log(p) - math.log(q))
            rows.append(kl)
        per.append(sum(rows) / 5)
    assert attention_kl(s, t).item() == pytest.approx(sum(per) / 3, rel=1e-5)
    expected_w = sum(p * wi for p, wi in zip(per, w.tolist())) / w.sum().item()
    assert attention_kl(s, t, w).item() == pytest.approx(expected_w, rel=1e-5)


def test_attention_kl_gradient_reaches_student_not_teacher():
    logits = torch.randn(3, 5, 4, requires_grad=True)
    teacher = _attention((3, 5, 4), 4).requires_grad_(True)
    attention_kl(torch.softmax(logits, -1), teacher).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert teacher.grad is None
    # at the minimum the gradient vanishes
    at_min = torch.log(teacher.detach().clone()).requires_grad_(True)
    attention_kl(torch.softmax(at_min, -1), teacher).backward()
    assert at_min.grad.abs().max() < 1e-6


# ---- the model ---------------------------------------------------------------------------
def test_heads_shapes_and_student_kind(model, spec, cfg, teacher):
    batch = make_batch(spec, 6)
    with torch.no_grad():
        out = model(batch)
        assert set(out) == {"student", "teacher"}
        assert out["student"].shape == out["teacher"].shape == (6,)
        assert torch.allclose(out["teacher"], teacher.outputs(batch).logit)
        u, v = model.student.encode_user(batch), model.student.encode_item(batch)
    assert type(model.student) is TokenDualEncoder and model.student.score_kind == "dot"
    assert model.student.params.pooling == DistilledDualEncoderParams().pooling
    assert u.shape == v.shape == (6, cfg.model.output_dim)
    assert torch.allclose(u.norm(dim=-1), torch.ones(6), atol=1e-5)
    hu, hv = model.student.user_states(batch), model.student.item_states(batch)
    attn = TokenDualEncoder.virtual_attention(hu, hv)
    assert attn.shape == teacher.outputs(batch).attention.shape == (6, len(spec.user_features), len(spec.item_features))


def test_towers_run_on_side_only_batches(model, spec):
    full = make_batch(spec, 5)
    user_names, item_names = {f.name for f in spec.user_features}, {f.name for f in spec.item_features}
    with torch.no_grad():
        u = model.student.encode_user({k: full[k] for k in user_names})
        v = model.student.encode_item({k: full[k] for k in item_names})
        assert torch.equal(u, model.student.encode_user(full)) and torch.equal(v, model.student.encode_item(full))
        rec = Recording(full)
        model.student.encode_user(rec)
        assert rec.read == user_names
        rec = Recording(full)
        model.student(rec)
        assert rec.read == user_names | item_names  # never privileged, never the label
    assert set(model.student.user_input_names) == user_names
    assert set(model.student.item_input_names) == item_names
    spec.assert_public(model.student.user_input_names + model.student.item_input_names, "test")


def test_stored_embeddings_score_like_forward(model, spec):
    model.eval()
    batch = make_batch(spec, 16, seed=3)
    st = model.student
    with torch.no_grad():
        u, v = st.encode_user(batch), st.encode_item(batch)
        logit = model(batch)["student"]
        stored = score_pairs(st.score_kind, u, v)
        assert torch.allclose(st.log_scale.exp() * stored + st.bias, logit, atol=1e-5)
        assert torch.equal(torch.argsort(stored, descending=True), torch.argsort(logit, descending=True))
        # every item for user 0: stored-table scoring ranks as the forward pass does
        pairs = {k: (t[:1].expand(16, *t.shape[1:]) if k in st.user_input_names else t) for k, t in batch.items()}
        by_logit = model(pairs)["student"]
        by_table = score_all(st.score_kind, u, v)[0]
        assert torch.equal(torch.argsort(by_table, descending=True), torch.argsort(by_logit, descending=True))
        assert torch.allclose(torch.diagonal(score_all(st.score_kind, u, v)), stored, atol=1e-6)


def test_builder_validates_params_and_teacher(spec, cfg, teacher):
    bad = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"params": {"attn_wieght": 1.0}})})
    with pytest.raises(ConfigError, match="attn_wieght"):
        build(spec, bad, {"cross_encoder": copy.deepcopy(teacher)})
    neg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"params": {"attn_weight": -1.0}})})
    with pytest.raises(ConfigError, match="attn_weight"):
        build(spec, neg, {"cross_encoder": copy.deepcopy(teacher)})
    with pytest.raises(ValueError, match="cross_encoder"):
        get_method(METHOD).build(spec, cfg, {})
    with pytest.raises(TypeError, match="CrossEncoder"):
        build(spec, cfg, {"cross_encoder": TokenDualEncoder(spec, cfg.model)})


def test_method_conf_lists_every_param_with_its_default(cfg):
    assert cfg.distill.method == METHOD and cfg.run.name == METHOD
    assert cfg.distill.params == DistilledDualEncoderParams().model_dump()


def test_teacher_stays_frozen_and_loss_terms(model, spec):
    model.train()
    assert model.student.training and not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    batch = interaction_batch(spec, 32, seed=7)
    loss, logs = model.training_loss(batch, step=0)
    assert logs["loss_attn"] > 0
    p = model.params
    assert math.isclose(logs["loss"], logs["loss_student"] + p.attn_weight * logs["loss_attn"]
                        + p.soft_weight * logs["loss_soft"], rel_tol=1e-5)
    with torch.no_grad():
        out = model(batch)
    assert logs["loss_soft"] == pytest.approx(
        soft_label_distillation(out["student"], out["teacher"], p.temperature).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    # every trainable parameter gets a gradient (DistributedDataParallel requires it)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert model.student.user_encoder.layers[0].attn.in_proj_weight.grad.abs().sum() > 0


def test_attention_term_trains_the_towers(model, spec):
    """The attention loss alone reaches the tower encoders (it is what carries the teacher's interaction)."""
    batch = make_batch(spec, 16, seed=8)
    hu, hv = model.student.user_states(batch), model.student.item_states(batch)
    attention_kl(TokenDualEncoder.virtual_attention(hu, hv), model.teacher_outputs(batch).attention).backward()
    assert model.student.user_encoder.layers[0].ff[0].weight.grad.abs().sum() > 0
    assert model.student.item_encoder.layers[0].ff[0].weight.grad.abs().sum() > 0
    assert model.student.user_proj.weight.grad is None  # the pooled vectors play no part


def test_soft_label_term_pulls_the_student_logit_to_the_teacher(spec, cfg, teacher):
    """Only the soft-label term on: the student's logits move towards the teacher's."""
    torch.manual_seed(2)
    params = {"attn_weight": 0.0, "soft_weight": 1.0, "temperature": 2.0}
    model = DistilledDualEncoderModel(spec, cfg.model, copy.deepcopy(teacher), params)
    batch = make_batch(spec, 64, seed=12)
    with torch.no_grad():
        gap0 = (model(batch)["student"] - model(batch)["teacher"]).abs().mean()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(40):
        out = model(batch)
        loss = soft_label_distillation(out["student"], out["teacher"], 2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        gap1 = (model(batch)["student"] - model(batch)["teacher"]).abs().mean()
    assert gap1 < 0.5 * gap0, (gap0, gap1)


def test_export_and_reload_give_identical_encodings(model, spec, tmp_path):
    model.training_loss(interaction_batch(spec, 16, seed=9), 0)[0].backward()
    student = model.student.eval()
    path = export_student(student, spec, str(tmp_path / "dde.pt"), meta={"method": METHOD})
    loaded, loaded_spec, meta = load_student(path)
    assert type(loaded) is TokenDualEncoder and loaded.params == student.params and meta["method"] == METHOD
    bundle = torch.load(path, weights_only=True)
    assert not any("teacher" in k for k in bundle["state_dict"]) and bundle["score_kind"] == "dot"
    batch = make_batch(spec, 10, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded.encode_user(batch), student.encode_user(batch))
        assert torch.equal(loaded.encode_item(batch), student.encode_item(batch))
        assert torch.equal(loaded(batch), student(batch))


def test_checkpoint_reloads_with_its_teacher(model, spec, cfg, tmp_path):
    """train.load_trained rebuilds the teacher as a submodule and refills it from the checkpoint."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = model.training_loss(interaction_batch(spec, 32, seed=10), 0)
    loss.backward()
    opt.step()
    job = TrainJob(kind=METHOD, config=cfg.model_dump(mode="json"), spec_json=spec.to_json(), files={},
                   out_dir=str(tmp_path))
    path = str(tmp_path / "last.pt")
    save_checkpoint(path, model, opt, 0, 1, job)
    loaded, _, _ = load_trained(path)
    assert isinstance(loaded, DistilledDualEncoderModel)
    assert all(not p.requires_grad for p in loaded.teacher.parameters())
    batch = make_batch(spec, 12, seed=11)
    model.eval()
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert torch.equal(a["student"], b["student"]) and torch.equal(a["teacher"], b["teacher"])


def test_short_training_lowers_the_loss(model, spec):
    before, after, held_out = short_training(model, spec)
    with torch.no_grad():
        student_auc = auc(held_out["label"].numpy(), model(held_out)["student"].numpy())
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    # below chance level (ln 2): the towers learnt the user x item interaction, not just a scale
    assert after["loss_student"] < 0.62 and student_auc > 0.75, (before, after, student_auc)
    assert after["loss_attn"] < before["loss_attn"], (before, after)
    assert after["loss_soft"] < before["loss_soft"], (before, after)

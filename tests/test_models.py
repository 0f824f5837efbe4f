"""Torch model side: field embeddings, DSSM, PFD teacher/student, export (no Spark)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rec_models.config import DistillConf, ModelConf, load_config
from rec_models.models.dssm import DSSM
from rec_models.layers.embeddings import FieldEmbeddings
from rec_models.serving.export import export_student, load_student
from rec_models.losses import soft_label_distillation
from rec_models.metrics import auc
from rec_models.distill.pfd import PFDModel
from rec_models.models.pfd_teacher import PFDTeacher, TeacherOnly
from rec_models.models.student_only import StudentOnly
from rec_models.spec import FeatureSpec, PrivilegedLeakError, Role

SIZES = {
    "user_id": {"vocab_size": 50},
    "age_group": {"vocab_size": 7},
    "region": {"vocab_size": 9},
    "activity": {"mean": 0.0, "std": 1.0},
    "item_id": {"vocab_size": 40},
    "category": {"vocab_size": 8},
    "tags": {"vocab_size": 13},
    "price": {"boundaries": (1.0, 5.0, 10.0, 50.0)},
}


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_config().spec.resolve(SIZES)


@pytest.fixture
def conf() -> ModelConf:
    return ModelConf(embedding_dim=8, tower_dims=[16], output_dim=8, teacher_dims=[32, 16], dropout=0.0)


def make_batch(spec: FeatureSpec, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for f in spec.features:
        if f.role in (Role.label, Role.weight):
            batch[f.name] = torch.randint(0, 2, (n,), generator=g).float()
        elif f.is_categorical:
            rows = spec.embedding_table_owner(f).table_size
            if f.is_list:
                x = torch.randint(1, rows, (n, f.max_len), generator=g, dtype=torch.int32)
                lengths = torch.randint(0, f.max_len + 1, (n, 1), generator=g)
                x[torch.arange(f.max_len).expand(n, -1) >= lengths] = 0  # padded at the end
                batch[f.name] = x
            else:
                batch[f.name] = torch.randint(0, rows, (n,), generator=g, dtype=torch.int32)
        else:
            batch[f.name] = torch.randn(n, generator=g)
    return batch


class Recording(dict):
    """A batch that records which columns were read."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


# ---- FieldEmbeddings -------------------------------------------------------------------
def test_field_embeddings_shapes_and_kinds(spec, conf):
    feats = (*spec.user_features, *spec.item_features)
    emb = FieldEmbeddings(spec, feats, conf.embedding_dim)
    batch = make_batch(spec, 6)
    assert emb.names == [f.name for f in feats]
    assert emb.tokens(batch).shape == (6, len(feats), 8)
    assert emb.flat(batch).shape == (6, len(feats) * 8)
    # one table per owner: the history sequence looks up the item-id table
    assert set(emb.tables) == {"user_id", "age_group", "region", "item_id", "category", "tags", "price"}
    assert emb.tables["price"].num_embeddings == len(SIZES["price"]["boundaries"]) + 2
    assert set(emb.numeric) == {"activity"}


def test_field_embeddings_list_pooling_is_masked_mean(spec, conf):
    emb = FieldEmbeddings(spec, [spec.get("tags"), spec.get("hist_item_ids")], conf.embedding_dim)
    tags = torch.tensor([[2, 3, 0, 0], [0, 0, 0, 0]], dtype=torch.int32)
    hist = torch.zeros(2, 20, dtype=torch.int32)
    hist[0, :3] = torch.tensor([5, 6, 7])
    tok = emb.tokens({"tags": tags, "hist_item_ids": hist})
    table = emb.tables["tags"].weight
    assert torch.allclose(tok[0, 0], (table[2] + table[3]) / 2)
    assert torch.equal(tok[1, 0], torch.zeros(8))          # all padding -> zero vector
    item_table = emb.tables["item_id"].weight               # created although item_id is not a field here
    assert torch.allclose(tok[0, 1], item_table[[5, 6, 7]].mean(0))
    assert torch.equal(tok[1, 1], torch.zeros(8))


def test_field_embeddings_numeric_is_affine(spec, conf):
    emb = FieldEmbeddings(spec, [spec.get("activity")], conf.embedding_dim)
    x = torch.tensor([0.0, 2.0])
    tok = emb.tokens({"activity": x})[:, 0]
    num = emb.numeric["activity"]
    assert torch.allclose(tok[1], 2.0 * num.weight + num.bias)
    assert torch.allclose(tok[0], num.bias)


def test_field_embeddings_need_a_resolved_spec(conf):
    raw = load_config().spec
    with pytest.raises(ValueError, match="resolved"):
        FieldEmbeddings(raw, raw.user_features, conf.embedding_dim)


def test_field_embeddings_shared_tables(spec, conf):
    a = FieldEmbeddings(spec, [spec.get("item_id"), spec.get("category")], 8)
    b = FieldEmbeddings(spec, [spec.get("hist_item_ids"), spec.get("region")], 8, shared=a)
    assert b.tables["item_id"] is a.tables["item_id"]
    assert "region" not in a.tables and b.tables["region"] is not None


# ---- DSSM ------------------------------------------------------------------------------
def test_dssm_shapes_and_normalisation(spec, conf):
    model = DSSM(spec, conf)
    batch = make_batch(spec, 5)
    u, v = model.encode_user(batch), model.encode_item(batch)
    assert u.shape == v.shape == (5, conf.output_dim)
    assert torch.allclose(u.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(v.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert model(batch).shape == (5,)
    assert 5.0 <= model.scale.item() <= 10.0


def test_encoders_read_only_their_own_columns(spec, conf):
    model = DSSM(spec, conf)
    full = make_batch(spec, 4)
    user_names = {f.name for f in spec.user_features}
    item_names = {f.name for f in spec.item_features}
    # a batch with only user columns is enough for encode_user, and vice versa
    model.encode_user({k: full[k] for k in user_names})
    model.encode_item({k: full[k] for k in item_names})
    rec = Recording(full)
    model.encode_user(rec)
    assert rec.read == user_names
    rec = Recording(full)
    model.encode_item(rec)
    assert rec.read == item_names
    assert set(model.user_input_names) == user_names and set(model.item_input_names) == item_names
    rec = Recording(full)
    model(rec)
    assert not rec.read & (spec.privileged_names | {"label"})


def test_stored_embedding_score_equals_logit(spec, conf):
    torch.manual_seed(0)
    model = DSSM(spec, conf).eval()
    batch = make_batch(spec, 16, seed=3)
    with torch.no_grad():
        u, v = model.encode_user(batch), model.encode_item(batch)
        logit = model(batch)
        assert torch.allclose(model.score(u, v), logit, atol=1e-5)
        assert torch.allclose(model.scale * (u * v).sum(-1) + model.bias, logit, atol=1e-5)
        # ranking all items for user 0 by stored dot product == ranking by forward logits
        pairs = {k: (t[:1].expand(16, *t.shape[1:]) if k in model.user_input_names else t)
                 for k, t in batch.items()}
        by_logit = model(pairs)
        by_dot = v @ u[0]
        assert torch.equal(torch.argsort(by_logit, descending=True), torch.argsort(by_dot, descending=True))
        assert torch.allclose(model.score_matrix(u, v)[0], by_logit, atol=1e-5)


def test_privileged_feature_cannot_reach_student(spec, conf):
    class Leaky(FeatureSpec):
        @property
        def user_features(self):
            return super().user_features + (self.get("ucat_ctr_7d"),)

    leaky = Leaky.model_validate(spec.model_dump())
    with pytest.raises(PrivilegedLeakError, match="ucat_ctr_7d"):
        DSSM(leaky, conf)
    # embeddings holding a privileged field are refused as student embeddings
    feats = (*spec.user_features, *spec.item_features, spec.get("uitem_impressions"))
    with pytest.raises(PrivilegedLeakError, match="uitem_impressions"):
        DSSM(spec, conf, embeddings=FieldEmbeddings(spec, feats, conf.embedding_dim))


def test_public_sequence_over_privileged_vocabulary_is_refused(conf):
    raw = load_config().spec.model_dump()
    raw["features"] = list(raw["features"])
    raw["features"].append({"name": "priv_cat", "role": "privileged", "kind": "categorical", "vocab_size": 5})
    raw["features"].append({"name": "hist_priv", "role": "user", "kind": "sequence", "vocab_of": "priv_cat",
                            "max_len": 3})
    spec = FeatureSpec.model_validate(raw).resolve(SIZES)
    with pytest.raises(PrivilegedLeakError, match="priv_cat"):
        DSSM(spec, conf)


def test_feature_names_that_are_module_attributes(conf, tmp_path):
    raw = load_config().spec.model_dump()
    raw["features"] = list(raw["features"]) + [
        {"name": "type", "role": "item", "kind": "categorical", "source": "items", "vocab_size": 4},
        {"name": "values", "role": "user", "kind": "numeric", "source": "users"}]
    spec = FeatureSpec.model_validate(raw).resolve(SIZES)
    model = DSSM(spec, conf)
    assert model.public_embeddings.table("type").num_embeddings == 4
    assert "type" in model.public_embeddings.table_owners
    path = export_student(model, spec, str(tmp_path / "s.pt"), meta={})
    loaded, _, _ = load_student(path)
    batch = make_batch(spec, 4)
    with torch.no_grad():
        assert torch.equal(loaded(batch), model.eval()(batch))


def test_pfd_without_privileged_features(conf):
    raw = load_config().spec.model_dump()
    raw["features"] = [f for f in raw["features"] if f["role"] != Role.privileged]
    spec = FeatureSpec.model_validate(raw).resolve(SIZES)
    model = PFDModel(spec, conf, DistillConf())
    assert model.teacher.own is None
    loss, logs = model.training_loss(make_batch(spec, 8), step=0)
    loss.backward()


# ---- PFD -------------------------------------------------------------------------------
def test_pfd_shares_public_embeddings(spec, conf):
    model = PFDModel(spec, conf, DistillConf())
    pub = model.student.public_embeddings
    assert model.teacher.public is pub
    for name in pub.tables:
        assert model.teacher.public.tables[name] is model.student.public_embeddings.tables[name]
    assert model.teacher.own is not None and set(model.teacher.own.names) == spec.privileged_names
    out = model(make_batch(spec, 7))
    assert out["teacher"].shape == out["student"].shape == (7,)
    loss, logs = model.loss_from_outputs(out, make_batch(spec, 7), step=10)
    assert loss.item() == pytest.approx(logs["loss"])
    # joint model parameters: shared ones counted once
    n_unique = len({id(p) for p in model.parameters()})
    assert n_unique == len(list(model.parameters()))
    assert set(map(id, model.teacher_only_parameters())).isdisjoint(map(id, model.student.parameters()))


def test_pfd_teacher_sequence_reuses_public_item_table(conf):
    raw = load_config().spec.model_dump()
    raw["features"] = list(raw["features"])
    raw["features"].append({"name": "priv_clicked_items", "role": "privileged", "kind": "sequence",
                            "vocab_of": "item_id", "max_len": 5})
    spec = FeatureSpec.model_validate(raw).resolve(SIZES)
    model = PFDModel(spec, conf, DistillConf())
    assert model.teacher.own.tables["item_id"] is model.student.public_embeddings.tables["item_id"]


def test_distillation_gradient_reaches_student_only(spec, conf):
    model = PFDModel(spec, conf, DistillConf(alpha=1.0, warmup_steps=0))
    out = model(make_batch(spec, 32, seed=1))
    soft_label_distillation(out["student"], out["teacher"], temperature=2.0).backward()
    for p in model.teacher_only_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    student_grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert student_grads and any(torch.count_nonzero(g) > 0 for g in student_grads)
    assert model.student.user_tower[0].weight.grad.abs().sum() > 0


def test_training_loss_terms_and_warmup(spec, conf):
    model = PFDModel(spec, conf, DistillConf(alpha=0.5, warmup_steps=10))
    batch = make_batch(spec, 16)
    loss0, logs0 = model.training_loss(batch, step=0)
    assert logs0["alpha"] == 0.0
    assert math.isclose(logs0["loss"], logs0["loss_student"] + logs0["loss_teacher"], rel_tol=1e-5)
    loss5, logs5 = model.training_loss(batch, step=5)
    assert logs5["alpha"] == 0.25
    assert math.isclose(logs5["loss"], logs5["loss_student"] + logs5["loss_teacher"]
                        + 0.25 * logs5["loss_distill"], rel_tol=1e-5)
    loss5.backward()
    assert all(p.grad is not None for p in model.teacher_only_parameters())


def test_frozen_teacher_from_teacher_only_checkpoint(spec, conf, tmp_path):
    torch.manual_seed(0)
    trained = TeacherOnly(spec, conf)
    path = tmp_path / "teacher.pt"
    torch.save(trained.state_dict(), path)
    model = PFDModel(spec, conf, DistillConf(warmup_steps=0))
    model.load_teacher(str(path))
    assert model.teacher_frozen
    batch = make_batch(spec, 8)
    with torch.no_grad():
        assert torch.allclose(model(batch)["teacher"], trained(batch)["teacher"], atol=1e-6)
    assert all(not p.requires_grad for p in model.teacher_only_parameters())
    assert all(p.requires_grad for p in model.student.parameters())  # shared public ones included
    model.train()
    assert not model.teacher.mlp.training and model.student.training
    loss, logs = model.training_loss(batch, step=3)
    assert math.isclose(logs["loss"], logs["loss_student"] + 0.5 * logs["loss_distill"], rel_tol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in model.teacher_only_parameters())
    # constructor flag does the same freezing
    frozen = PFDModel(spec, conf, DistillConf(), teacher_frozen=True)
    assert all(not p.requires_grad for p in frozen.teacher_only_parameters())


def test_teacher_trained_with_dropout_loads_into_a_model_without_it(spec, conf, tmp_path):
    """Dropout is a training setting, not architecture: the layer layout (and so the state
    dict) is the same at any rate, and the frozen teacher predicts as it did (eval mode)."""
    torch.manual_seed(0)
    trained = TeacherOnly(spec, conf.model_copy(update={"dropout": 0.3})).eval()
    path = tmp_path / "teacher.pt"
    torch.save(trained.state_dict(), path)
    model = PFDModel(spec, conf, DistillConf(warmup_steps=0))   # dropout 0
    model.load_teacher(str(path))
    batch = make_batch(spec, 8)
    with torch.no_grad():
        assert torch.allclose(model.eval()(batch)["teacher"], trained(batch)["teacher"], atol=1e-6)


def test_student_only_and_teacher_only_interfaces(spec, conf):
    batch = make_batch(spec, 8)
    s, t = StudentOnly(spec, conf), TeacherOnly(spec, conf)
    assert set(s(batch)) == {"student"} and set(t(batch)) == {"teacher"}
    for m in (s, t):
        loss, logs = m.training_loss(batch, step=0)
        assert loss.ndim == 0 and "loss" in logs
        loss.backward()
    assert isinstance(t.teacher, PFDTeacher)


# ---- export ----------------------------------------------------------------------------
def test_export_round_trip_without_privileged_names(spec, conf, tmp_path):
    torch.manual_seed(1)
    model = PFDModel(spec, conf, DistillConf())
    model.training_loss(make_batch(spec, 8), step=0)[0].backward()  # some non-init state
    student = model.student.eval()
    path = tmp_path / "sub" / "student.pt"
    export_student(student, spec, str(path), meta={"run": "r1", "auc": np.float32(0.7)})
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    loaded, loaded_spec, meta = load_student(str(path))
    assert not loaded.training and meta == {"run": "r1", "auc": pytest.approx(0.7)}
    batch = make_batch(spec, 10, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded.encode_user(batch), student.encode_user(batch))
        assert torch.equal(loaded.encode_item(batch), student.encode_item(batch))
        assert torch.equal(loaded(batch), student(batch))
    bundle = torch.load(path, weights_only=True)
    text = bundle["spec"] + " ".join(bundle["state_dict"]) + str(bundle["meta"])
    for name in spec.privileged_names:
        assert name not in text
    assert not loaded_spec.privileged_names
    assert not any("teacher" in k for k in bundle["state_dict"])


def test_export_refuses_a_leaky_student(spec, conf, tmp_path):
    student = DSSM(spec, conf)
    student._user_names = student._user_names + ["ucat_ctr_7d"]
    with pytest.raises(PrivilegedLeakError):
        export_student(student, spec, str(tmp_path / "s.pt"), meta={})
    with pytest.raises(TypeError):
        export_student(PFDModel(spec, conf, DistillConf()), spec, str(tmp_path / "s.pt"), meta={})
    assert not list(tmp_path.iterdir())


# ---- a tiny training run ---------------------------------------------------------------
def _privileged_batch(spec: FeatureSpec, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Clicks driven by a privileged statistic the student cannot see."""
    batch = make_batch(spec, n, seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    logit = 3.0 * batch["ucat_ctr_7d"]
    batch["label"] = torch.bernoulli(torch.sigmoid(logit), generator=g)
    return batch


def test_teacher_beats_student_when_label_needs_privileged_feature(spec, conf):
    torch.manual_seed(0)
    model = PFDModel(spec, conf, DistillConf(alpha=0.5, warmup_steps=50))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(200):
        loss, _ = model.training_loss(_privileged_batch(spec, 128, seed=step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = _privileged_batch(spec, 2000, seed=99_999)
    with torch.no_grad():
        out = model(test)
    y = test["label"].numpy()
    teacher_auc, student_auc = auc(y, out["teacher"].numpy()), auc(y, out["student"].numpy())
    assert teacher_auc > 0.75, teacher_auc
    assert teacher_auc > student_auc + 0.1, (teacher_auc, student_auc)

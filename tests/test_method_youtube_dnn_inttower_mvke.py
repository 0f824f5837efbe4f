"""YouTubeDNN, IntTower and MVKE: shapes, stored vectors score as the forward pass, each
side reads only its own columns, export round trip, and the losses' defining properties."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rec_models.config import ModelConf, load_config
from rec_models.serving.export import export_student, load_student
from rec_models.models.inttower import IntTower, IntTowerModel, LightSE
from rec_models.losses import in_batch_candidates, in_batch_softmax
from rec_models.methods import get_method
from rec_models.metrics import auc
from rec_models.models.mvke import MVKE
from rec_models.serving.scoring import score_all
from rec_models.layers.calibration import CALIBRATION_INIT_SCALE, CALIBRATION_MOMENTUM
from rec_models.models.youtube_dnn import YouTubeDNN, YouTubeDNNModel
from rec_models.batch import item_ids
from tests.test_models import Recording, make_batch, spec  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread

METHODS = {"youtube_dnn": YouTubeDNN, "inttower": IntTower, "mvke": MVKE}


@pytest.fixture
def conf() -> ModelConf:
    return ModelConf(embedding_dim=8, tower_dims=[16, 12], output_dim=8, dropout=0.0)


def _build(method, spec, conf, params=None):
    cfg = load_config(method=method)
    cfg.model = conf
    if params is not None:
        cfg.distill.params = params
    return get_method(method).build(spec, cfg, {})


# ---- in-batch softmax -------------------------------------------------------------------
def test_in_batch_candidates_dedupes_by_id():
    ids = torch.tensor([7, 3, 7, -1, 3, 9, -2])
    first, inverse, counts = in_batch_candidates(ids)
    assert torch.equal(ids[first][inverse], ids)              # every row maps to its own id
    assert torch.equal(counts[inverse], torch.tensor([2, 2, 2, 1, 2, 1, 1]))
    assert sorted(first.tolist()) == [0, 1, 3, 5, 6]           # first occurrence of each


def test_in_batch_softmax_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(4, 5, generator=g), torch.randn(6, 5, generator=g)
    target, log_q, w = torch.tensor([0, 3, 5, 3]), torch.rand(6, generator=g).log(), torch.rand(4, generator=g)
    T = 0.7
    per = []
    for i in range(4):
        z = [float(q[i] @ c[j]) / T - float(log_q[j]) for j in range(6)]
        per.append(-(z[target[i]] - math.log(sum(math.exp(x) for x in z))))
    assert in_batch_softmax(q, c, target, T, log_q).item() == pytest.approx(sum(per) / 4, rel=1e-5)
    expected = sum(p * wi for p, wi in zip(per, w.tolist())) / w.sum().item()
    assert in_batch_softmax(q, c, target, T, log_q, w).item() == pytest.approx(expected, rel=1e-5)


def test_log_q_correction_favours_rare_candidates():
    """Equal similarities: without logQ the softmax is uniform; with it, a candidate seen
    k times in the batch counts k times less as a negative."""
    q = torch.ones(1, 2)
    c = torch.ones(3, 2)
    counts = torch.tensor([1.0, 2.0, 4.0])
    plain = in_batch_softmax(q, c, torch.tensor([0]))
    corrected = in_batch_softmax(q, c, torch.tensor([0]), log_q=torch.log(counts / 7))
    assert plain.item() == pytest.approx(math.log(3), rel=1e-6)
    assert corrected.item() == pytest.approx(-math.log(1 / (1 + 1 / 2 + 1 / 4)), rel=1e-6)


def test_in_batch_softmax_without_queries_is_zero_with_zero_gradients():
    c = torch.randn(3, 4, requires_grad=True)
    q = torch.randn(5, 4, requires_grad=True)
    loss = in_batch_softmax(q[:0], c, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(c.grad, torch.zeros_like(c))


# ---- every method -----------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_build_shapes_and_training_step(method, spec, conf):
    torch.manual_seed(0)
    model = _build(method, spec, conf)
    assert type(model.student) is METHODS[method]
    batch = make_batch(spec, 32)
    loss, logs = model.training_loss(batch, step=0)
    assert torch.isfinite(loss) and logs["loss"] == pytest.approx(loss.item())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "every parameter takes part in the loss (DDP)"
    assert model(batch)["student"].shape == (32,)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_stored_vectors_score_as_the_forward_pass(method, spec, conf):
    torch.manual_seed(0)
    student = _build(method, spec, conf).student.eval()
    batch = make_batch(spec, 16, seed=3)
    with torch.no_grad():
        u, v = student.encode_user(batch), student.encode_item(batch)
        logit = student(batch)
        assert torch.allclose(student.score(u, v), logit, atol=1e-5)
        # user 0 against every item: ranking from the stored vectors == ranking by logits
        pairs = {k: (t[:1].expand(16, *t.shape[1:]) if k in student.user_input_names else t)
                 for k, t in batch.items()}
        by_logit = student(pairs)
        by_table = score_all(student.score_kind, u[:1], v)[0]
        assert torch.equal(torch.argsort(by_logit, descending=True), torch.argsort(by_table, descending=True))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_side_reads_only_its_own_columns(method, spec, conf):
    student = _build(method, spec, conf).student
    batch = make_batch(spec, 8)
    user_names = {f.name for f in spec.user_features}
    item_names = {f.name for f in spec.item_features}
    rec = Recording(batch)
    student.encode_user(rec)
    assert rec.read == user_names
    rec = Recording(batch)
    student.encode_item(rec)
    assert rec.read == item_names
    rec = Recording(batch)
    student(rec)
    assert not rec.read & (spec.privileged_names | {"label"})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_export_round_trip(method, spec, conf, tmp_path):
    torch.manual_seed(1)
    model = _build(method, spec, conf)
    model.training_loss(make_batch(spec, 16), step=0)[0].backward()
    student = model.student.eval()
    path = export_student(student, spec, str(tmp_path / "student.pt"), meta={"m": method})
    loaded, loaded_spec, meta = load_student(path)
    assert type(loaded) is METHODS[method] and meta == {"m": method}
    assert loaded.params == student.params
    assert torch.load(path, weights_only=True)["score_kind"] == student.score_kind
    batch = make_batch(spec, 10, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded.encode_user(batch), student.encode_user(batch))
        assert torch.equal(loaded.encode_item(batch), student.encode_item(batch))
        assert torch.equal(loaded(batch), student(batch))
    assert not loaded_spec.privileged_names


def _preference_batch(spec, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Clicks when the user's region and the item's category have the same parity; an
    item's features are functions of its id (in-batch candidates are told apart by id)."""
    batch = make_batch(spec, n, seed)
    item = batch["item_id"]
    batch["category"] = 2 + item % 6
    batch["tags"] = torch.zeros_like(batch["tags"])
    batch["tags"][:, 0] = 2 + item % 11
    batch["price"] = 1 + item % 5
    match = (batch["region"] % 2) == (batch["category"] % 2)
    g = torch.Generator().manual_seed(20_000 + seed)
    batch["label"] = torch.bernoulli(torch.where(match, 0.8, 0.1), generator=g)
    return batch


@pytest.mark.parametrize("method", sorted(METHODS))
def test_learns_a_user_item_preference(method, spec):
    torch.manual_seed(0)
    model = _build(method, spec, ModelConf(embedding_dim=16, tower_dims=[64, 32], output_dim=16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        loss, _ = model.training_loss(_preference_batch(spec, 128, seed=step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = _preference_batch(spec, 2000, seed=99_999)
    with torch.no_grad():
        p = torch.sigmoid(model(test)["student"])
    y, region = test["label"], test["region"]
    per_user_kind = [auc(y[region == r].numpy(), p[region == r].numpy()) for r in range(9)]
    assert min(per_user_kind) > 0.75, per_user_kind               # ranks items right within a user group
    assert abs(p.mean().item() - y.mean().item()) < 0.1, "the logit is calibrated on impressions"
    if method != "youtube_dnn":
        # BCE-trained: also comparable across users. YouTubeDNN's softmax is blind to a
        # per-user offset of <u, v>, so its impression AUC across users is not asserted.
        assert auc(y.numpy(), p.numpy()) > 0.75


# ---- YouTubeDNN ---------------------------------------------------------------------------
def test_youtube_dnn_history_is_one_pooled_token(spec, conf):
    student = YouTubeDNN(spec, conf)
    assert student.history_names == ["hist_item_ids"]
    # the history looks up the item-id table: its pooled token is the masked mean of item embeddings
    batch = make_batch(spec, 4, seed=2)
    table = student.public_embeddings.table("item_id").weight
    hist = batch["hist_item_ids"].long()
    mask = (hist != 0).unsqueeze(-1).float()
    expected = (table[hist] * mask).sum(1) / mask.sum(1).clamp_min(1)
    tokens = student.public_embeddings.tokens(batch, ["hist_item_ids"])[:, 0]
    assert torch.allclose(tokens, expected, atol=1e-6)


def test_youtube_dnn_loss_matches_its_definition(spec, conf):
    torch.manual_seed(0)
    model = YouTubeDNNModel(spec, conf, {"temperature": 0.2, "calibration_weight": 0.5})
    s = model.student
    batch = make_batch(spec, 24, seed=4)
    batch["item_id"][:6] = batch["item_id"][6:12]             # repeated items in the batch
    batch["item_id"][12] = 1                                  # an out-of-vocabulary row
    loss, logs = model.training_loss(batch, 0)
    with torch.no_grad():
        u, v, y = s.encode_user(batch), s.encode_item(batch), batch["label"]
        ids = batch["item_id"].tolist()
        ids = [i if i >= 2 else -1 - r for r, i in enumerate(ids)]
        cand = sorted(set(ids))
        firsts = [ids.index(c) for c in cand]
        per = []
        for i in range(24):
            if y[i] < 0.5:
                continue
            z = [float(u[i] @ v[j]) / 0.2 - math.log(ids.count(c) / 24) for c, j in zip(cand, firsts)]
            per.append(-(z[cand.index(ids[i])] - math.log(sum(math.exp(x) for x in z))))
        softmax = sum(per) / len(per)
        # after its first update the running statistics are this batch's own
        dot = (u * v).sum(-1)
        z = (dot - dot.mean()) / (dot.var(unbiased=False) + 1e-6).sqrt()
        rate = y.mean()
        # the calibration's initial scale multiplies the standardised score
        calib = F.binary_cross_entropy_with_logits(CALIBRATION_INIT_SCALE * z + torch.log(rate / (1 - rate)), y).item()
    assert logs["loss_softmax"] == pytest.approx(softmax, rel=1e-5)
    assert logs["loss_calibration"] == pytest.approx(calib, rel=1e-4)
    assert loss.item() == pytest.approx(softmax + 0.5 * calib, rel=1e-4)


def test_youtube_dnn_calibration_trains_only_scale_and_bias(spec, conf):
    torch.manual_seed(0)
    model = YouTubeDNNModel(spec, conf)
    batch = make_batch(spec, 16)
    batch["label"] = torch.zeros(16)                          # no positive: softmax term is 0
    loss, logs = model.training_loss(batch, 0)
    assert logs["loss_softmax"] == 0.0
    loss.backward()
    s = model.student
    assert s.log_scale.grad.abs() > 0 and s.bias.grad.abs() > 0
    for name, p in s.named_parameters():
        if name not in ("log_scale", "bias"):
            assert torch.count_nonzero(p.grad) == 0, name


def test_youtube_dnn_calibration_statistics_average_then_track(spec, conf):
    student = YouTubeDNN(spec, conf)
    expected = 0.0
    for i in range(80):
        student.update_calibration(torch.full((4,), float(i)), torch.ones(4) * (i % 2))
        expected += max(1 / (i + 1), CALIBRATION_MOMENTUM) * (i - expected)
        if i + 1 == 10:
            mean, var, rate, n = student.calibration.tolist()
            assert (mean, var, rate, n) == (pytest.approx(4.5), 0.0, pytest.approx(0.5), 10)  # plain averages
    mean, _, _, n = student.calibration.tolist()
    assert n == 80 and mean == pytest.approx(expected, rel=1e-5) and mean > sum(range(80)) / 80  # then tracks
    assert "calibration" in student.state_dict()                              # exported with the towers


def test_item_ids_keep_unknown_items_apart(spec):
    batch = {"item_id": torch.tensor([5, 0, 1, 5, 1], dtype=torch.int32)}
    assert item_ids(spec, batch).tolist() == [5, -2, -3, 5, -5]


# ---- IntTower -----------------------------------------------------------------------------
def test_inttower_fe_score_is_sum_over_layers_of_max_over_head_pairs(spec, conf):
    torch.manual_seed(0)
    student = IntTower(spec, conf, {"heads": 3, "head_dim": 5})
    batch = make_batch(spec, 6)
    with torch.no_grad():
        u, v = student.encode_user(batch), student.encode_item(batch)
        assert u.shape == (6, 3, 3, 5) and v.shape == (6, 3, 5)          # L = 2 hidden + output
        assert torch.allclose(u.norm(dim=-1), torch.ones(6, 3, 3), atol=1e-5)
        assert torch.allclose(v.norm(dim=-1), torch.ones(6, 3), atol=1e-5)
        for b in range(6):
            fe = sum(max(float(u[b, l, m] @ v[b, n]) for m in range(3) for n in range(3)) for l in range(3))
            expected = student.log_scale.exp() * fe / 3 + student.bias
            assert student.score(u[b:b + 1], v[b:b + 1]).item() == pytest.approx(expected.item(), rel=1e-5)


def test_light_se_reweights_fields():
    torch.manual_seed(0)
    se = LightSE(4)
    tokens = torch.randn(3, 4, 6)
    a = se.weights(tokens)
    assert torch.allclose(a.sum(-1), torch.ones(3))
    assert torch.allclose(se(tokens), tokens * (1 + a.unsqueeze(-1)))


def test_inttower_cir_is_infonce_over_positive_pairs(spec, conf):
    torch.manual_seed(0)
    model = IntTowerModel(spec, conf, {"cir_weight": 2.0, "cir_temperature": 0.5})
    s = model.student
    batch = make_batch(spec, 20, seed=6)
    batch["item_id"] = torch.arange(2, 22, dtype=torch.int32)              # distinct items
    loss, logs = model.training_loss(batch, 0)
    with torch.no_grad():
        pos = batch["label"] > 0.5
        _, hu = s.user_parts(batch)
        _, hv = s.item_parts(batch)
        q, c = F.normalize(hu[pos], dim=-1), F.normalize(hv[pos], dim=-1)
        cir = F.cross_entropy(q @ c.T / 0.5, torch.arange(int(pos.sum()))).item()
    assert logs["loss_cir"] == pytest.approx(cir, rel=1e-5)
    assert loss.item() == pytest.approx(logs["loss_bce"] + 2.0 * cir, rel=1e-5)


# ---- MVKE ---------------------------------------------------------------------------------
def test_mvke_gate_comes_from_the_tag_fields_only(spec, conf):
    torch.manual_seed(0)
    student = MVKE(spec, conf, {"kernels": 3})
    assert student.tag_names == ["category", "tags", "price"]               # every item field but the id
    batch = make_batch(spec, 8)
    rec = Recording(batch)
    student.gate_logits(rec)
    assert rec.read == {"category", "tags", "price"}
    with torch.no_grad():
        u, v = student.encode_user(batch), student.encode_item(batch)
        assert u.shape == (8, 3, 8) and v.shape == (8, 8 + 3)
        assert torch.allclose(u.norm(dim=-1), torch.ones(8, 3), atol=1e-5)
        assert torch.allclose(v[:, :8].norm(dim=-1), torch.ones(8), atol=1e-5)
        gate = v[:, 8:].softmax(-1)
        expected = student.log_scale.exp() * (gate * torch.einsum("bkd,bd->bk", u, v[:, :8])).sum(-1) + student.bias
        assert torch.allclose(student(batch), expected, atol=1e-5)
        attn = student.kernel_attention(student.tokens.user(batch))
        assert attn.shape == (8, 3, len(student.user_input_names))
        assert torch.allclose(attn.sum(-1), torch.ones(8, 3), atol=1e-5)


def test_mvke_tag_fields_are_checked(spec, conf):
    assert MVKE(spec, conf, {"tag_fields": ["category"]}).tag_names == ["category"]
    with pytest.raises(ValueError, match="tag_fields.*region"):
        MVKE(spec, conf, {"tag_fields": ["region"]})
    with pytest.raises(ValueError, match="tag_fields.*ucat_ctr_7d"):
        MVKE(spec, conf, {"tag_fields": ["ucat_ctr_7d"]})
    with pytest.raises(ValueError, match="at least one tag field"):
        MVKE(spec, conf, {"tag_fields": []})
    with pytest.raises(ValueError, match="kernels"):
        MVKE(spec, conf, {"kernels": 0})

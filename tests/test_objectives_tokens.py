"""The retrieval objectives of the token students (VIRT, Distilled-DualEncoder, ERNIE-Search,
TRMD and their undistilled baselines): the softmax against the pure functions, the shared
running calibration, the listwise distillation from the frozen cross-encoder against a
brute-force computation, the export of calibrated token students and the baselines."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rec_models.batch import item_ids
from rec_models.config import ConfigError, load_config
from rec_models.distill.base import freeze
from rec_models.distill.listwise import (ListwiseParams, ListwiseTargets, listwise_kl, pair_batch,
                                         sample_candidates)
from rec_models.distill.trmd import CalibratedTRMDStudent, TRMDStudent
from rec_models.layers.calibration import RunningCalibration
from rec_models.methods import METHODS, get_method
from rec_models.models.colbert import ColBERTModel
from rec_models.models.cross_encoder import CrossEncoder
from rec_models.models.dssm import DSSM, CalibratedDSSM
from rec_models.models.dual_encoder import CalibratedTokenDualEncoder, TokenDualEncoder
from rec_models.objectives import ItemBank, softmax_loss, softmax_loss_of_kind
from rec_models.serving.export import export_student, load_student
from rec_models.serving.scoring import score_pairs
from rec_models.spec import Role

try:
    from tests.test_models import SIZES, make_batch
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    from test_models import SIZES, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread

SMALL = ["model.embedding_dim=8", "model.output_dim=8", "model.tower_dims=[16]", "model.teacher_dims=[16]",
         "model.dropout=0.0"]
DISTILLED = ("virt", "distilled_dual_encoder", "ernie_search", "trmd")
BASELINES = {"virt": "token_dual_encoder_attn", "distilled_dual_encoder": "token_dual_encoder",
             "ernie_search": "token_dual_encoder", "trmd": "trmd_student"}


def config(method: str, objective: str = "sampled_softmax", *extra: str):
    return load_config(method=method, overrides=[*SMALL, f"student.objective={objective}", *extra])


@pytest.fixture(scope="module")
def spec():
    return config("virt").spec.resolve(SIZES)


@pytest.fixture(scope="module")
def teachers(spec):
    """An untrained cross-encoder (privileged fields included) and ColBERT, frozen: the
    tests check what the losses compute from a teacher, not what it learnt."""
    torch.manual_seed(0)
    cfg = config("virt")
    return {"cross_encoder": freeze(CrossEncoder(spec, cfg.model)),
            "colbert": freeze(ColBERTModel(spec, cfg.model, {"layers": 1, "heads": 2, "pooling": "mean"}))}


def build(method: str, spec, teachers, objective: str = "sampled_softmax", params: dict | None = None, *extra):
    cfg = config(method, objective, *extra)
    if params:
        cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(
            update={"params": {**cfg.distill.params, **params}})})
    torch.manual_seed(1)
    return get_method(method).build(spec, cfg, {k: copy.deepcopy(t) for k, t in teachers.items()})


def clicks(spec, n: int, seed: int, rate: float = 0.3) -> dict[str, torch.Tensor]:
    batch = make_batch(spec, n, seed)
    batch[spec.label.name] = torch.bernoulli(torch.full((n,), rate), generator=torch.Generator().manual_seed(seed))
    return batch


# ---- the softmax of any score kind ---------------------------------------------------------
def test_softmax_of_kind_dot_is_softmax_loss_and_dot_late_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([4, 7, 4, 9, 2, 7])
    w = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.0])
    u, v = F.normalize(torch.randn(6, 5, generator=g), dim=-1), F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    assert softmax_loss_of_kind("dot", u, v, ids, w, 0.1).item() == pytest.approx(
        softmax_loss(u, v, ids, w, 0.1).item(), rel=1e-6)

    # dot+late: stored [B, 1 + T, d]; z_rj = score_pairs(u_r, v_j) / tau - log count_j
    su, sv = torch.randn(6, 4, 3, generator=g), torch.randn(6, 5, 3, generator=g)
    cands = sorted(set(ids.tolist()))
    total = norm = 0.0
    for r in range(6):
        if w[r] <= 0:
            continue
        z = torch.stack([score_pairs("dot+late", su[r:r + 1], sv[ids.tolist().index(c)][None])[0] / 0.2
                         - torch.log((ids == c).sum().float()) for c in cands])
        total += float(w[r]) * float(-torch.log_softmax(z, 0)[cands.index(int(ids[r]))])
        norm += float(w[r])
    got = softmax_loss_of_kind("dot+late", su, sv, ids, w, 0.2)
    assert got.item() == pytest.approx(total / norm, rel=1e-5)


@pytest.mark.parametrize("method", ["token_dual_encoder", "token_dual_encoder_attn", "trmd_student", "virt",
                                    "distilled_dual_encoder", "trmd"])
def test_token_students_softmax_equals_the_pure_function(method, spec, teachers):
    """With the calibration and every teacher term at weight 0, the training loss is the
    pure softmax of the student's stored vectors, scored by its own score kind."""
    zero = {"virt": {"attn_weight": 0.0, "listwise_weight": 0.0},
            "distilled_dual_encoder": {"attn_weight": 0.0, "listwise_weight": 0.0, "soft_weight": 0.0},
            "trmd": {"rep_weight": 0.0, "listwise_weight": 0.0}}.get(method)
    model = build(method, spec, teachers, "sampled_softmax", zero, "student.calibration_weight=0.0",
                  "student.temperature=0.07")
    model.eval()
    batch = clicks(spec, 48, seed=3)
    loss, logs = model.training_loss(batch, 0)
    st = model.student
    assert isinstance(st, RunningCalibration)
    with torch.no_grad():
        u, v = st.encode_user(batch), st.encode_item(batch)
    expected = softmax_loss_of_kind(st.score_kind, u, v, item_ids(spec, batch), batch[spec.label.name], 0.07)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["loss_softmax"] == pytest.approx(expected.item(), rel=1e-5)
    if st.score_kind == "dot":
        assert expected.item() == pytest.approx(
            softmax_loss(u, v, item_ids(spec, batch), batch[spec.label.name], 0.07).item(), rel=1e-6)


@pytest.mark.parametrize("soft_weight", [0.4, 1.0])
def test_distilled_dual_encoder_soft_positives_are_the_teachers_pair_probability(soft_weight, spec, teachers):
    """Distilled-DualEncoder's soft label of the pair, under a softmax objective: each row's
    positive weight is (1 - soft_weight) y + soft_weight sigma(t / T), t the teacher's logit
    of the impression's own row (privileged columns included), and nothing else changes."""
    params = {"attn_weight": 0.0, "listwise_weight": 0.0, "soft_weight": soft_weight, "temperature": 2.0}
    model = build("distilled_dual_encoder", spec, teachers, "sampled_softmax", params,
                  "student.calibration_weight=0.0", "student.temperature=0.07")
    model.eval()
    batch = clicks(spec, 48, seed=5)
    loss, _ = model.training_loss(batch, 0)
    st = model.student
    with torch.no_grad():
        u, v = st.encode_user(batch), st.encode_item(batch)
        t = model.teacher(batch)["teacher"]
    y = batch[spec.label.name]
    w = (1 - soft_weight) * y + soft_weight * torch.sigmoid(t / 2.0)
    assert loss.item() == pytest.approx(softmax_loss(u, v, item_ids(spec, batch), w, 0.07).item(), rel=1e-5)
    hard = softmax_loss(u, v, item_ids(spec, batch), y, 0.07)
    assert abs(loss.item() - hard.item()) > 1e-4       # the teacher's probabilities did change the loss


def test_distilled_dual_encoder_soft_weight_above_one_is_refused_for_retrieval(spec, teachers):
    with pytest.raises(ConfigError, match="soft_weight=1.5"):
        build("distilled_dual_encoder", spec, teachers, "mixed", {"soft_weight": 1.5})
    build("distilled_dual_encoder", spec, teachers, "pointwise", {"soft_weight": 1.5})   # a loss weight there


# ---- the shared calibration --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["token_dual_encoder", "trmd_student"])
def test_calibration_trains_scale_and_bias_only(method, spec, teachers):
    model = build(method, spec, teachers, "sampled_softmax", None, "student.calibration_weight=1.0")
    batch = clicks(spec, 64, seed=4)
    batch[spec.label.name] = torch.zeros(64)          # no positive: the softmax term is zero
    loss, logs = model.training_loss(batch, 0)
    loss.backward()
    st = model.student
    assert logs["loss_softmax"] == 0.0 and logs["loss_calibration"] > 0
    assert st.log_scale.grad is not None and st.log_scale.grad.abs() > 0 and st.bias.grad is not None
    towers = [n for n, p in st.named_parameters() if n not in ("log_scale", "bias")
              and p.grad is not None and p.grad.any()]
    assert not towers, towers
    assert st.calibration[3].item() == 1.0
    with torch.no_grad():   # the statistics are the batch's stored scores and labels
        score = score_pairs(st.score_kind, st.encode_user(batch), st.encode_item(batch))
    assert st.calibration[0].item() == pytest.approx(score.mean().item(), abs=1e-5)
    assert st.calibration[1].item() == pytest.approx(score.var(unbiased=False).item(), rel=1e-4)
    assert st.calibration[2].item() == 0.0


def test_calibrated_logit_is_increasing_affine_in_the_stored_score(spec, teachers):
    for method in ("token_dual_encoder", "trmd_student"):
        model = build(method, spec, teachers)
        st = model.student
        for seed in range(3):
            model.training_loss(clicks(spec, 32, seed=seed), seed)
        st.eval()
        batch = make_batch(spec, 20, seed=9)
        with torch.no_grad():
            stored = score_pairs(st.score_kind, st.encode_user(batch), st.encode_item(batch))
            logit = st(batch)
        mean, var, rate, _ = st.calibration
        slope = st.log_scale.exp() / (var + 1e-6).sqrt()
        assert slope.item() > 0
        expected = slope * (stored - mean) + st.bias + torch.log(rate / (1 - rate))
        assert torch.allclose(logit, expected, atol=1e-5)


def test_calibrated_dssm_keeps_its_state_and_shares_the_calibration(spec):
    cfg = config("dssm")
    torch.manual_seed(0)
    plain, calibrated = DSSM(spec, cfg.model), CalibratedDSSM(spec, cfg.model)
    assert isinstance(calibrated, RunningCalibration)
    assert set(calibrated.state_dict()) == set(plain.state_dict()) | {"calibration"}
    assert {"log_scale", "bias", "calibration"} <= set(calibrated.state_dict())
    assert calibrated.calibration.tolist() == [0.0, 1.0, 0.5, 0.0]
    # one initialisation for every calibrated student
    token = CalibratedTokenDualEncoder(spec, cfg.model)
    assert calibrated.log_scale.item() == token.log_scale.item() and torch.equal(calibrated.calibration,
                                                                                token.calibration)
    # the calibrated logit of <u, v>, and the same for all pairs
    batch = make_batch(spec, 7, seed=1)
    with torch.no_grad():
        u, v = calibrated.encode_user(batch), calibrated.encode_item(batch)
        assert torch.allclose(calibrated.score(u, v), calibrated.calibrated((u * v).sum(-1)))
        assert torch.allclose(calibrated.score_matrix(u, v).diagonal(), calibrated.score(u, v), atol=1e-6)


# ---- listwise distillation -----------------------------------------------------------------------
def test_listwise_kl_matches_brute_force_and_vanishes_at_the_teacher():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 6, generator=g), 3 * torch.randn(4, 6, generator=g)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0])
    per = []
    for q in range(4):
        p = torch.softmax(t[q] / 2.0, 0)
        lq = torch.log_softmax(s[q] / 0.1, 0)
        per.append(sum(float(p[j]) * (float(torch.log(p[j])) - float(lq[j])) for j in range(6)))
    assert listwise_kl(s, t, 0.1, 2.0).item() == pytest.approx(sum(per) / 4, rel=1e-5)
    assert listwise_kl(s, t, 0.1, 2.0, w).item() == pytest.approx(
        sum(p * float(x) for p, x in zip(per, w)) / float(w.sum()), rel=1e-5)
    # zero where the student's row is the teacher's times tau / T, up to a shift
    assert listwise_kl(t * 0.1 / 2.0 + 7.0, t, 0.1, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    student = s.clone().requires_grad_()
    teacher = t.clone().requires_grad_()
    listwise_kl(student, teacher, 0.1).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_candidates_are_the_positive_then_distinct_other_items():
    ids = torch.tensor([3, 5, 3, 8, 9, 11, 5, 12, 13, 14])
    w = torch.tensor([1.0, 0, 0, 1, 0, 0, 1, 0, 0, 1])
    torch.manual_seed(0)
    queries, cand = sample_candidates(ids, w, max_queries=10, candidates=4)
    assert queries.tolist() == [0, 3, 6, 9] and cand.shape == (4, 4)
    assert torch.equal(cand[:, 0], queries)
    for q, row in zip(queries.tolist(), cand.tolist()):
        items = ids[row].tolist()
        assert len(set(items)) == 4 and items.count(int(ids[q])) == 1   # never its own item twice
    # at most max_queries, drawn among the clicked rows; M bounded by the distinct items
    q2, c2 = sample_candidates(ids, w, max_queries=2, candidates=50)
    assert len(q2) == 2 and set(q2.tolist()) <= {0, 3, 6, 9} and c2.shape == (2, 8)
    assert sample_candidates(ids, torch.zeros(10), 4, 4) is None
    assert sample_candidates(torch.tensor([2, 2]), torch.ones(2), 4, 4) is None


def test_pair_inputs_take_user_from_the_query_item_from_the_candidate_privileged_neutral(spec):
    batch = make_batch(spec, 6, seed=2)
    pairs = pair_batch(spec, batch, torch.tensor([0, 0, 4]), torch.tensor([0, 2, 5]))
    for f in spec.user_features:
        assert torch.equal(pairs[f.name], batch[f.name][[0, 0, 4]])
    for f in spec.item_features:
        assert torch.equal(pairs[f.name], batch[f.name][[0, 2, 5]])
    privileged = [f.name for f in spec.by_role(Role.privileged)]
    assert privileged and all(not pairs[n].any() for n in privileged)
    assert spec.label.name not in pairs


def test_listwise_term_against_brute_force(spec, teachers):
    """Teacher: one cross-encoder pass per (query, candidate) pair built by hand; student:
    <u_q, v_j> / tau; KL summed in loops. The model's logged term is the same number."""
    model = build("virt", spec, teachers, "sampled_softmax", {"listwise_candidates": 5, "listwise_queries": 6},
                  "student.temperature=0.1")
    model.eval()   # no dropout: the candidate draw is the only use of the random generator
    batch = clicks(spec, 40, seed=6)
    teacher = model.teacher
    torch.manual_seed(11)
    _, logs = model.training_loss(batch, 0)
    torch.manual_seed(11)
    targets = ListwiseTargets.of_batch(teacher, spec, batch, model.params)
    assert targets.cand.shape == (6, 5)
    assert set(targets.queries.tolist()) <= set(torch.nonzero(batch[spec.label.name] > 0).squeeze(1).tolist())
    with torch.no_grad():
        u, v = model.student.encode_user(batch), model.student.encode_item(batch)
    user_names = {f.name for f in spec.user_features}
    item_names = {f.name for f in spec.item_features}
    total = 0.0
    for k, q in enumerate(targets.queries.tolist()):
        t_row, s_row = [], []
        for j in targets.cand[k].tolist():
            row = {n: batch[n][q:q + 1] for n in user_names}
            row.update({n: batch[n][j:j + 1] for n in item_names})
            row.update({f.name: torch.zeros_like(batch[f.name][j:j + 1]) for f in spec.by_role(Role.privileged)})
            with torch.no_grad():
                t_row.append(float(teacher(row)["teacher"][0]))
            s_row.append(float(u[q] @ v[j]))
        p = torch.softmax(torch.tensor(t_row) / 1.0, 0)
        lq = torch.log_softmax(torch.tensor(s_row) / 0.1, 0)
        total += float((p * (p.log() - lq)).sum())
        assert torch.allclose(targets.teacher_scores[k], torch.tensor(t_row), atol=1e-5)
    expected = total / len(targets.queries)
    assert targets.kl("dot", u, v, 0.1).item() == pytest.approx(expected, rel=1e-4)
    assert logs["loss_listwise"] == pytest.approx(expected, rel=1e-4)
    assert logs["loss"] == pytest.approx(logs["loss_student"] + logs["loss_attn"] + logs["loss_listwise"], rel=1e-5)


@pytest.mark.parametrize("method", DISTILLED)
def test_teacher_gets_no_gradient_and_every_student_parameter_does(method, spec, teachers):
    model = build(method, spec, teachers, "sampled_softmax", {"listwise_weight": 1.0})
    model.train()
    frozen = [p for m in model.frozen_modules() for p in m.parameters()]
    assert frozen and all(not p.requires_grad for p in frozen)
    assert all(not m.training for m in model.frozen_modules())
    before = [copy.deepcopy(m.state_dict()) for m in model.frozen_modules()]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, logs = model.training_loss(clicks(spec, 48, seed=7), 0)
    assert logs["loss_listwise"] > 0
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in frozen)
    # DistributedDataParallel needs a gradient for every trainable parameter
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    opt.step()
    for m, state in zip(model.frozen_modules(), before):
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_ernie_search_retrieval_terms(spec, teachers):
    """Under the softmax objective: the ColBERT learns the cross-encoder's candidates too, the
    dual encoder's dist term is its retrieval distribution against the ColBERT's logits over
    the batch's distinct items, and the pointwise logit term is gone."""
    model = build("ernie_search", spec, teachers, "sampled_softmax", None, "student.temperature=0.1")
    model.eval()
    batch = clicks(spec, 32, seed=8)
    batch[spec.keys.item][1] = batch[spec.keys.item][0]   # one item on two rows: one candidate
    out = model.losses(batch, 0)
    assert "logit" not in out and {"colbert_listwise", "listwise", "dist"} <= set(out)
    p = model.params
    assert out["colbert"].item() == pytest.approx((out["colbert_hard"] + p.colbert_soft_weight * out["colbert_soft"]
                                                   + p.colbert_attn_weight * out["colbert_attn"]
                                                   + p.listwise_weight * out["colbert_listwise"]).item(), rel=1e-5)
    with torch.no_grad():
        st, col = model.student, model.colbert
        u, v = st.encode_user(batch), st.encode_item(batch)
        eu, ev = col.encode_user(batch), col.encode_item(batch)
        ids = item_ids(spec, batch).tolist()
        keep = [ids.index(i) for i in sorted(set(ids))]
        total = 0.0
        for i in range(32):
            t = torch.stack([col.score(eu[i:i + 1], ev[j:j + 1])[0] for j in keep]) / p.temperature
            s = torch.stack([u[i] @ v[j] for j in keep]) / 0.1
            pt = torch.softmax(t, 0)
            total += float((pt * (pt.log() - torch.log_softmax(s, 0))).sum())
    assert out["dist"].item() == pytest.approx(total / 32, rel=1e-4)


# ---- export of calibrated token students --------------------------------------------------------
@pytest.mark.parametrize("method,cls", [("token_dual_encoder_attn", CalibratedTokenDualEncoder),
                                        ("trmd_student", CalibratedTRMDStudent)])
def test_calibrated_token_student_export_round_trip(method, cls, spec, teachers, tmp_path):
    model = build(method, spec, teachers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(3):
        loss, _ = model.training_loss(clicks(spec, 32, seed=step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    student = model.student.eval()
    assert type(student) is cls and student.calibration[3].item() == 3.0
    path = export_student(student, spec, str(tmp_path / "s.pt"), meta={"method": method})
    loaded, _, meta = load_student(path)
    assert type(loaded) is cls and loaded.params == student.params and meta["method"] == method
    assert torch.equal(loaded.calibration, student.calibration)
    assert {"calibration", "log_scale", "bias"} <= set(torch.load(path, weights_only=True)["state_dict"])
    batch = make_batch(spec, 9, seed=8)
    with torch.no_grad():
        assert torch.equal(loaded.encode_user(batch), student.encode_user(batch))
        assert torch.equal(loaded.encode_item(batch), student.encode_item(batch))
        assert torch.equal(loaded(batch), student(batch))


# ---- the undistilled baselines ---------------------------------------------------------------------
@pytest.mark.parametrize("method", DISTILLED)
def test_each_method_names_a_baseline_with_the_same_student(method, spec, teachers):
    assert METHODS[method].undistilled == BASELINES[method]
    base = METHODS[BASELINES[method]]
    assert base.role == "baseline" and not base.teachers
    for objective in ("pointwise", "sampled_softmax"):
        distilled = build(method, spec, teachers, objective).student
        plain = build(BASELINES[method], spec, teachers, objective).student
        assert type(plain) is type(distilled) and plain.params == distilled.params
        assert plain.score_kind == distilled.score_kind
        assert {k: v.shape for k, v in plain.state_dict().items()} == \
            {k: v.shape for k, v in distilled.state_dict().items()}
        assert [n for n, p in plain.named_parameters() if p.requires_grad] == \
            [n for n, p in distilled.named_parameters() if p.requires_grad]
    assert type(build(BASELINES[method], spec, teachers, "pointwise").student) in (TokenDualEncoder, TRMDStudent)


@pytest.mark.parametrize("method", ["token_dual_encoder", "token_dual_encoder_attn", "trmd_student"])
def test_baselines_train_and_validate_their_params(method, spec, teachers):
    model = build(method, spec, teachers)
    batch = clicks(spec, 64, seed=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for step in range(25):
        loss, logs = model.training_loss(batch, step)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first, (first, loss.item())
    assert set(logs) >= {"loss", "loss_softmax", "loss_calibration"}
    cfg = config(method)
    pooling = "mean" if method == "token_dual_encoder" else "attention"
    assert cfg.distill.params == {"layers": 1, "heads": 2, "pooling": pooling}
    assert model.student.params.pooling == pooling
    bad = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"params": {"layer": 2}})})
    with pytest.raises(ConfigError, match="layer"):
        get_method(method).build(spec, bad, {})


@pytest.mark.parametrize("method", ["token_dual_encoder", "trmd"])
def test_mixed_objective_uses_the_item_bank(method, spec, teachers):
    model = build(method, spec, teachers, "mixed", None, "student.corpus_negatives=16")
    batch = clicks(spec, 32, seed=12)
    with pytest.raises(ValueError, match="item bank"):
        model.training_loss(batch, 0)
    items = make_batch(spec, 50, seed=13)
    model.item_bank = ItemBank({n: items[n] for n in model.student.item_input_names}, items[spec.keys.item].long())
    loss, logs = model.training_loss(batch, 0)
    assert torch.isfinite(loss) and logs["loss_softmax"] > 0
    loss.backward()
    assert model.student.item_encoder.layers[0].ff[0].weight.grad.abs().sum() > 0


def test_method_confs_list_the_listwise_params(spec):
    for method in DISTILLED:
        cfg = config(method)
        defaults = get_method(method).params_model()().model_dump()
        assert cfg.distill.params == defaults, method
        assert {"listwise_weight", "listwise_temperature", "listwise_candidates", "listwise_queries"} <= set(defaults)
    assert ListwiseParams().listwise_candidates >= 2

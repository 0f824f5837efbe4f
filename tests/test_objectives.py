"""The retrieval objectives of the dual-tower students (rec_models/objectives.py), the
distillation methods that feed them soft positives, and the validation retrieval that
selects a student's epochs (rec_models/training/validation.py)."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from rec_models.batch import item_ids
from rec_models.config import DistillConf, ModelConf, StudentConf, load_config
from rec_models.distill.pfd import PFDModel
from rec_models.models.dssm import DSSM, CalibratedDSSM
from rec_models.models.student_only import StudentOnly
from rec_models.objectives import ItemBank, make_student, soft_positive_weights, softmax_loss, student_loss
from rec_models.serving.export import export_student, load_student
from rec_models.serving.retrieval import retrieval_from_arrays
from rec_models.training.validation import RetrievalValidation, load_item_bank

try:
    from tests.test_models import SIZES, make_batch
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    from test_models import SIZES, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread


@pytest.fixture(scope="module")
def spec():
    return load_config().spec.resolve(SIZES)


@pytest.fixture(scope="module")
def conf() -> ModelConf:
    return ModelConf(embedding_dim=8, tower_dims=[16], output_dim=8, teacher_dims=[16])


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---- the loss, against a brute-force reading of its equation --------------------------------
def brute_softmax(u, v, ids, w, tau, logq, extra_v=None, extra_ids=None, extra_expected=0.0):
    cand_ids = sorted(set(ids.tolist()))
    cands = [v[ids.tolist().index(c)] for c in cand_ids]
    expected = [float((ids == c).sum()) + extra_expected for c in cand_ids]
    if extra_v is not None:
        for j in range(extra_v.shape[0]):
            if int(extra_ids[j]) not in cand_ids:
                cands.append(extra_v[j])
                expected.append(extra_expected)
    c = torch.stack(cands)
    total, norm = 0.0, 0.0
    for r in range(u.shape[0]):
        if w[r] <= 0:
            continue
        z = u[r] @ c.T / tau - (torch.log(torch.tensor(expected)) if logq else 0.0)
        target = cand_ids.index(int(ids[r]))
        total += float(w[r]) * float(-(torch.log_softmax(z, 0)[target]))
        norm += float(w[r])
    return total / norm


@pytest.mark.parametrize("logq", [True, False])
def test_softmax_loss_matches_the_equation(logq):
    u, v = _unit(7, 4, 0), _unit(7, 4, 1)
    ids = torch.tensor([3, 5, 3, 9, 2, 5, 11])          # items 3 and 5 shown twice: one candidate each
    w = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.2, 1.0])
    got = softmax_loss(u, v, ids, w, 0.1, logq)
    assert got.item() == pytest.approx(brute_softmax(u, v, ids, w, 0.1, logq), rel=1e-5)


def test_mixed_candidates_drop_batch_items_and_use_expected_counts():
    u, v = _unit(5, 4, 2), _unit(5, 4, 3)
    ids = torch.tensor([1, 2, 3, 4, 5])
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.3])
    extra_v, extra_ids = _unit(4, 4, 4), torch.tensor([2, 40, 41, 5])   # 2 and 5 are batch items: dropped
    got = softmax_loss(u, v, ids, w, 0.2, True, extra_v, extra_ids, 4 / 100)
    assert got.item() == pytest.approx(brute_softmax(u, v, ids, w, 0.2, True, extra_v, extra_ids, 4 / 100), rel=1e-5)
    # a uniform draw that collided with the positive would otherwise be its own negative
    alone = softmax_loss(u, v, ids, w, 0.2, True, extra_v[[1, 2]], extra_ids[[1, 2]], 4 / 100)
    assert got.item() == pytest.approx(alone.item(), rel=1e-6)


def test_no_positive_gives_zero_loss_connected_to_both_towers():
    u, v = _unit(4, 3, 5).requires_grad_(), _unit(4, 3, 6).requires_grad_()
    loss = softmax_loss(u, v, torch.arange(4), torch.zeros(4), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and u.grad is not None and v.grad is not None
    assert not u.grad.any() and not v.grad.any()


def test_soft_positive_weights_mix_click_and_teacher_without_training_it():
    label = torch.tensor([1.0, 0.0, 1.0, 0.0])
    teacher = torch.tensor([2.0, 1.0, -3.0, -1.0], requires_grad=True)
    w = soft_positive_weights(label, teacher, 0.25, temperature=2.0)
    expected = 0.75 * label + 0.25 * torch.sigmoid(teacher.detach() / 2.0)
    assert torch.allclose(w, expected)
    assert not w.requires_grad
    assert torch.equal(soft_positive_weights(label, teacher, 0.0), label)


# ---- the student and its calibrated score -------------------------------------------------
def test_make_student_calibrates_only_for_the_softmax_objectives(spec, conf):
    assert type(make_student(spec, conf, StudentConf(objective="pointwise"))) is DSSM
    for objective in ("sampled_softmax", "mixed"):
        assert type(make_student(spec, conf, StudentConf(objective=objective))) is CalibratedDSSM


def test_pointwise_objective_is_dssm_bce(spec, conf):
    torch.manual_seed(0)
    student = make_student(spec, conf, StudentConf(objective="pointwise"))
    batch = make_batch(spec, 32, seed=1)
    loss, _ = student_loss(student, spec, StudentConf(objective="pointwise"), batch)
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(
        student(batch), batch[spec.label.name]).item(), rel=1e-6)


def test_calibration_term_trains_scale_and_bias_only(spec, conf):
    torch.manual_seed(1)
    sc = StudentConf(objective="sampled_softmax", calibration_weight=1.0)
    student = make_student(spec, conf, sc)
    batch = make_batch(spec, 64, seed=2)
    batch[spec.label.name] = torch.zeros(64)          # no positive: the softmax term is zero
    loss, logs = student_loss(student, spec, sc, batch)
    loss.backward()
    assert logs["loss_softmax"] == 0.0 and logs["loss_calibration"] > 0
    assert student.log_scale.grad is not None and student.bias.grad is not None
    towers = [p for n, p in student.named_parameters() if n not in ("log_scale", "bias")]
    assert all(p.grad is None or not p.grad.any() for p in towers)
    assert student.calibration[3].item() == 1.0   # the running statistics took the batch in


def test_softmax_student_equals_the_pure_loss(spec, conf):
    torch.manual_seed(2)
    sc = StudentConf(objective="sampled_softmax", calibration_weight=0.0, temperature=0.07)
    student = make_student(spec, conf, sc)
    batch = make_batch(spec, 48, seed=3)
    loss, _ = student_loss(student, spec, sc, batch)
    u, v = student.encode_user(batch), student.encode_item(batch)
    expected = softmax_loss(u, v, item_ids(spec, batch), batch[spec.label.name], 0.07, True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_impression_weight_makes_every_impression_a_weak_positive(spec, conf):
    torch.manual_seed(5)
    sc = StudentConf(objective="sampled_softmax", calibration_weight=0.0, impression_weight=0.3)
    student = make_student(spec, conf, sc)
    batch = make_batch(spec, 48, seed=7)
    batch[spec.label.name] = (torch.arange(48) % 4 == 0).float()   # clicked rows only a quarter
    loss, _ = student_loss(student, spec, sc, batch)
    u, v, ids = student.encode_user(batch), student.encode_item(batch), item_ids(spec, batch)
    expected = softmax_loss(u, v, ids, batch[spec.label.name] + 0.3, sc.temperature, True)
    clicks_only = softmax_loss(u, v, ids, batch[spec.label.name], sc.temperature, True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - clicks_only.item()) > 1e-3   # the non-clicked rows now count


def test_mixed_needs_the_item_bank_and_uses_it(spec, conf):
    sc = StudentConf(objective="mixed", corpus_negatives=16)
    model = StudentOnly(spec, conf, student_conf=sc)
    batch = make_batch(spec, 32, seed=4)
    with pytest.raises(ValueError, match="item bank"):
        model.training_loss(batch, 0)
    items = make_batch(spec, 50, seed=5)
    model.item_bank = ItemBank({n: items[n] for n in model.student.item_input_names}, items[spec.keys.item].long())
    torch.manual_seed(0)
    with_bank, _ = model.training_loss(batch, 0)
    plain, _ = student_loss(model.student, spec, StudentConf(objective="sampled_softmax"), batch)
    assert torch.isfinite(with_bank) and with_bank.item() > plain.item() - 1e-6   # more negatives, larger loss
    with pytest.raises(ValueError, match="empty"):
        ItemBank({}, torch.zeros(0, dtype=torch.long))


def test_calibrated_student_exports_with_its_statistics(spec, conf, tmp_path):
    torch.manual_seed(3)
    sc = StudentConf(objective="sampled_softmax")
    student = make_student(spec, conf, sc)
    for seed in range(3):
        student_loss(student, spec, sc, make_batch(spec, 32, seed=seed))[0].backward()
    path = export_student(student.eval(), spec, str(tmp_path / "s.pt"))
    loaded, _, _ = load_student(path)
    batch = make_batch(spec, 9, seed=8)
    assert type(loaded) is CalibratedDSSM and torch.equal(loaded.calibration, student.calibration)
    with torch.no_grad():
        assert torch.equal(loaded(batch), student(batch))
        assert torch.equal(loaded.encode_user(batch), student.encode_user(batch))


# ---- distillation into the retrieval student ----------------------------------------------
def test_pfd_distils_soft_positives_into_the_softmax(spec, conf):
    torch.manual_seed(4)
    sc = StudentConf(objective="sampled_softmax", calibration_weight=0.0)
    model = PFDModel(spec, conf, DistillConf(alpha=1.0, warmup_steps=0, temperature=1.0), teacher_frozen=True,
                     student_conf=sc)
    batch = make_batch(spec, 40, seed=6)
    loss, logs = model.training_loss(batch, step=10)
    with torch.no_grad():
        teacher = model(batch)["teacher"]
    u, v = model.student.encode_user(batch), model.student.encode_item(batch)
    expected = softmax_loss(u, v, item_ids(spec, batch), torch.sigmoid(teacher), sc.temperature, True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()   # the frozen teacher's own parameters get nothing
    assert all(p.grad is None for p in model.teacher_only_parameters())


def test_pfd_alpha_above_one_is_refused_for_a_retrieval_student(spec, conf):
    from rec_models.config import ConfigError

    with pytest.raises(ConfigError, match=r"distill\.alpha"):
        PFDModel(spec, conf, DistillConf(alpha=1.5), student_conf=StudentConf(objective="mixed"))


def test_every_dssm_distillation_method_follows_student_objective():
    from rec_models.methods import METHODS

    cfg = load_config(overrides=["student.objective=sampled_softmax"])
    follows = [n for n, m in METHODS.items() if m.undistilled == "dssm"]
    assert set(follows) >= {"pfd", "kd", "endx"}
    assert cfg.student.objective == "sampled_softmax"


# ---- validation retrieval -----------------------------------------------------------------
class _Towers(torch.nn.Module):
    """Fixed vectors by id: user u -> U[u], item i -> V[i] (to check the metric plumbing)."""
    score_kind = "dot"
    user_input_names = ["user_id"]
    item_input_names = ["item_id"]

    def __init__(self, users, items):
        super().__init__()
        self.U, self.V = users, items

    def encode_user(self, batch):
        return self.U[batch["user_id"].long()]

    def encode_item(self, batch):
        return self.V[batch["item_id"].long()]


def _write(path, table):
    pq.write_table(pa.table(table), path)
    return [str(path)]


def test_validation_retrieval_matches_a_direct_computation(spec, tmp_path):
    rng = np.random.default_rng(0)
    n_users, n_items = 12, 30
    U, V = torch.randn(n_users + 1, 4), torch.randn(n_items + 1, 4)
    items = _write(tmp_path / "items.parquet", {"item_key": [f"i{i}" for i in range(1, n_items + 1)],
                                                 "item_id": np.arange(1, n_items + 1, dtype=np.int32)})

    def rows(n, t0):
        u = rng.integers(1, n_users + 1, n)
        return {"user_key": [f"u{x}" for x in u], "item_key": [f"i{x}" for x in rng.integers(1, n_items + 1, n)],
                "user_id": u.astype(np.int32), "label": rng.integers(0, 2, n).astype(np.float32),
                "timestamp": (t0 + np.arange(n)).astype(np.int64)}
    train, valid = rows(300, 0), rows(60, 1000)
    files = {"items": items, "train": _write(tmp_path / "train.parquet", train),
             "valid": _write(tmp_path / "valid.parquet", valid)}
    cfg = load_config(overrides=["eval.k=[5,10]", "eval.select_k=10"])
    towers = _Towers(U, V)
    got = RetrievalValidation(files, spec, towers, cfg)(towers, torch.device("cpu"))

    # direct: users with a valid click, all items, their training clicks excluded
    vdf, tdf = pd.DataFrame(valid), pd.DataFrame(train)
    users = np.array(sorted(vdf.loc[vdf.label > 0.5, "user_key"].unique()))
    item_keys = pd.Index([f"i{i}" for i in range(1, n_items + 1)])
    code = {k: j for j, k in enumerate(users)}

    def keys(df):
        df = df[(df.label > 0.5) & df.user_key.isin(users)]
        return np.unique(df.user_key.map(code).to_numpy() * n_items + item_keys.get_indexer(df.item_key))
    user_vecs = U[[int(k[1:]) for k in users]].numpy()
    expected = retrieval_from_arrays(user_vecs, V[1:].numpy(), "dot", keys(vdf), keys(tdf), [5, 10])
    assert got["student_recall@10"] == pytest.approx(expected["recall@10"])
    assert got["student_ndcg@5"] == pytest.approx(expected["ndcg@5"])
    assert 0 < got["student_recall@10"] < 1


def test_validation_caps_users_and_item_bank_reads_the_item_table(spec, tmp_path):
    n_items = 20
    items = _write(tmp_path / "items.parquet", {"item_key": [f"i{i}" for i in range(1, n_items + 1)],
                                                 "item_id": np.arange(1, n_items + 1, dtype=np.int32)})
    valid = {"user_key": [f"u{i}" for i in range(1, 41)], "item_key": [f"i{1 + i % n_items}" for i in range(40)],
             "user_id": np.arange(1, 41, dtype=np.int32), "label": np.ones(40, np.float32),
             "timestamp": np.arange(40, dtype=np.int64)}
    files = {"items": items, "valid": _write(tmp_path / "v.parquet", valid), "train": _write(tmp_path / "t.parquet", valid)}
    cfg = load_config(overrides=["eval.valid_users=7"])
    towers = _Towers(torch.randn(41, 3), torch.randn(n_items + 1, 3))
    rv = RetrievalValidation(files, spec, towers, cfg)
    assert len(rv.user_keys) == 7
    again = RetrievalValidation(files, spec, towers, cfg)
    assert list(again.user_keys) == list(rv.user_keys)   # the same users every time
    bank = load_item_bank(items, spec, ["item_id"])
    assert bank.size == n_items and sorted(bank.ids.tolist()) == list(range(1, n_items + 1))


def test_mixed_without_an_item_table_is_a_named_config_error(tmp_path):
    """student.objective=mixed draws its corpus negatives from the item feature table: a
    training given none (files without 'items') stops before its first step, saying so."""
    from benchmarks.bench_training import resolved_spec, write_split
    from rec_models.config import ConfigError
    from rec_models.training.loop import TrainJob, train_worker

    spec = resolved_spec()
    cfg = load_config(overrides=["train.epochs=1", "train.batch_size=64", f"run.output_dir={tmp_path}"])
    assert cfg.student.objective == "mixed"
    rng = np.random.default_rng(0)
    synth = cfg.data.source.synthetic
    files = {split: write_split(spec, synth, tmp_path / "data", split, 256, 1, 256, rng) for split in ("train", "valid", "test")}
    job = TrainJob(kind="dssm", config=cfg.model_dump(mode="json"), spec_json=spec.to_json(), files=files,
                   out_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"student.objective=mixed .*item feature table"):
        train_worker(job)

"""The IntTower paper's protocol: the DCN ranker, the Spark data preparation on a small
synthetic RecBole folder (3s dropped, labels, seeded random split, leaky vs leak-free
means), and one slow end-to-end run on the real MovieLens 100K."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from etl import delta_io
from etl.inttower_protocol import (ITEM_MEAN, USER_MEAN, add_mean_features, assign_splits, check_spec,
                                   load_inputs, prepare)
from etl.sources import InputError
from rec_models.config import ConfigError, ModelConf, load_config
from rec_models.models.dcn import DCN, CrossNetwork, DCNParams
from rec_models.methods import get_method
from tests.test_models import Recording, make_batch, spec  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread

T0 = 880_000_000


# ---- DCN ----------------------------------------------------------------------------------
@pytest.fixture
def conf() -> ModelConf:
    return ModelConf(embedding_dim=8, tower_dims=[16], output_dim=8, teacher_dims=[32, 16], dropout=0.0)


def _dcn(spec, conf, **params) -> DCN:
    torch.manual_seed(0)
    return DCN(spec, conf, params)


def test_cross_network_matches_hand_computation():
    net = CrossNetwork(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.5, -1.0], [1.0, 1.0]]))
        net.bias.copy_(torch.tensor([[0.1, 0.2], [0.0, 0.0]]))
    # x1 = x0 (x0.w0) + b0 + x0 = [1, 2] * -1.5 + [0.1, 0.2] + [1, 2] = [-0.4, -0.8]
    # x2 = x0 (x1.w1) + b1 + x1 = [1, 2] * -1.2 + [-0.4, -0.8]       = [-1.6, -3.2]
    # x0 = 0: every cross term vanishes, the biases remain: x2 = b0 + b1
    out = net(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[-1.6, -3.2], [0.1, 0.2]]))


def test_dcn_shapes_loss_and_registry(spec, conf):
    model = _dcn(spec, conf, cross_layers=2)
    batch = make_batch(spec, 16)
    out = model(batch)
    assert set(out) == {"teacher"} and out["teacher"].shape == (16,)
    fields = len(spec.user_features) + len(spec.item_features) + len(spec.by_role("context", "privileged"))
    assert model.cross.weight.shape == (2, fields * conf.embedding_dim)
    assert model.head.in_features == fields * conf.embedding_dim + conf.teacher_dims[-1]
    loss, logs = model.training_loss(batch, 0)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and set(logs) == {"loss"}
    method = get_method("dcn")
    assert method.role == "teacher" and not method.teachers
    cfg = load_config(method="dcn")
    assert cfg.distill.params == DCNParams().model_dump()   # the YAML lists every param at its default
    assert isinstance(method.build(spec, cfg, {}), DCN)


def test_dcn_gradients_reach_every_parameter(spec, conf):
    model = _dcn(spec, conf)
    loss, _ = model.training_loss(make_batch(spec, 32), 0)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dcn_is_not_separable(spec, conf):
    model = _dcn(spec, conf).eval()
    assert not hasattr(model, "encode_user") and not hasattr(model, "encode_item")
    assert not hasattr(model, "student")
    # a two-tower (or any additively separable) score gives s(u1,i1) + s(u2,i2) == s(u1,i2) + s(u2,i1)
    b = make_batch(spec, 2, seed=3)
    user_cols = {f.name for f in spec.user_features}
    swapped = {k: (v.flip(0) if k not in user_cols else v) for k, v in b.items()}
    with torch.no_grad():
        s, t = model(b)["teacher"], model(swapped)["teacher"]
    assert abs((s.sum() - t.sum()).item()) > 1e-4


def test_dcn_reads_privileged_fields_only_when_asked(spec, conf):
    with_priv, without = _dcn(spec, conf), _dcn(spec, conf, include_privileged=False)
    for model, expect in ((with_priv, True), (without, False)):
        batch = Recording(make_batch(spec, 4))
        model(batch)
        assert bool(batch.read & spec.privileged_names) is expect


@pytest.mark.parametrize("params, key", [({"cross_layers": 0}, "cross_layers"), ({"crosses": 2}, "crosses")])
def test_dcn_params_are_validated(spec, conf, params, key):
    with pytest.raises(ConfigError, match=f"distill.params.{key}"):
        DCN(spec, conf, params)


# ---- the protocol's data preparation --------------------------------------------------------
def _write_recbole(folder, ratings: pd.DataFrame, n_users: int, n_items: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    users = pd.DataFrame({"user_id:token": range(1, n_users + 1),
                          "age:token": [20 + u % 5 for u in range(n_users)],
                          "gender:token": ["M" if u % 2 else "F" for u in range(n_users)],
                          "occupation:token": [f"job{u % 3}" for u in range(n_users)]})
    genres = ["Action Comedy", "Drama", "Comedy Romance Drama", "Horror"]
    items = pd.DataFrame({"item_id:token": range(1, n_items + 1),
                          "class:token_seq": [genres[i % 4] for i in range(n_items)]})
    inter = ratings.rename(columns={"user_id": "user_id:token", "item_id": "item_id:token",
                                    "rating": "rating:float", "timestamp": "timestamp:float"})
    for name, df in (("syn.user", users), ("syn.item", items), ("syn.inter", inter)):
        df.to_csv(folder / name, sep="\t", index=False)


def _ratings(n_users=40, n_items=30, n=900, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pairs = rng.choice(n_users * n_items, n, replace=False)          # one rating per (user, item)
    return pd.DataFrame({"user_id": pairs // n_items + 1, "item_id": pairs % n_items + 1,
                         "rating": rng.integers(1, 6, n), "timestamp": T0 + rng.integers(0, 10_000_000, n)})


def _cfg(folder, wh):
    path = str(folder)
    return load_config(dataset="ml100k_inttower", overrides=[
        f"data.source.events.path={path}", f"data.source.users.path={path}", f"data.source.items.path={path}",
        f"warehouse.root={wh}"])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    ratings = _ratings()
    folder = tmp_path_factory.mktemp("recbole") / "syn"
    _write_recbole(folder, ratings, 40, 30)
    return folder, ratings


@pytest.fixture(scope="module")
def inputs(spark, synthetic, tmp_path_factory):
    folder, _ = synthetic
    out = load_inputs(spark, _cfg(folder, tmp_path_factory.mktemp("wh")))
    yield out
    out.unpersist()


def _pdf(df) -> pd.DataFrame:
    return df.toPandas().astype({"user_key": int, "item_key": int}).sort_values(["user_key", "item_key"],
                                                                                 ignore_index=True)


def test_threes_dropped_and_label_is_rating_above_3(inputs, synthetic):
    _, ratings = synthetic
    rows = _pdf(inputs.rows)
    kept = ratings[ratings.rating != 3].sort_values(["user_id", "item_id"], ignore_index=True)
    assert inputs.num_rows == len(kept) == len(rows) and (ratings.rating == 3).sum() > 100
    assert (rows.user_key.to_numpy() == kept.user_id.to_numpy()).all()
    assert (rows.label.to_numpy() == (kept.rating > 3).astype(int).to_numpy()).all()


def test_split_is_random_seeded_reproducible_and_about_80_20(inputs):
    def split(seed, rows=inputs.rows):
        return _pdf(assign_splits(rows, seed, 0.16, 0.2)).split.to_numpy()

    a = split(1)
    assert (a == split(1)).all()                                      # reproducible
    assert (a == split(1, inputs.rows.repartition(7))).all()          # whatever the partitioning
    assert (a != split(2)).mean() > 0.2                               # the seed matters
    frac = pd.Series(a).value_counts(normalize=True)
    assert frac["test"] == pytest.approx(0.2, abs=0.04) and frac["valid"] == pytest.approx(0.16, abs=0.04)
    rows = _pdf(inputs.rows).assign(split=a)
    # random, not by time: the test split spans the whole period
    ts = rows.timestamp
    assert rows[rows.split == "test"].timestamp.min() < ts.quantile(0.1)
    assert rows[rows.split == "test"].timestamp.max() > ts.quantile(0.9)


def _expected_means(rows: pd.DataFrame, key: str, fit_mask, group=None) -> pd.Series:
    fit = rows[fit_mask]
    if group is None:
        means = fit.groupby(key).label.mean()
        return rows[key].map(means).fillna(fit.label.mean())
    means = fit.groupby([key, group]).label.mean()
    return pd.Series([means[(k, g)] for k, g in zip(rows[key], rows[group])], index=rows.index)


def test_leak_free_means_are_train_split_means(inputs):
    rows = _pdf(add_mean_features(assign_splits(inputs.rows, 1, 0.16, 0.2), "leak_free").rows)
    train = rows.split == "train"
    for key, name in (("user_key", USER_MEAN), ("item_key", ITEM_MEAN)):
        np.testing.assert_allclose(rows[name], _expected_means(rows, key, train), rtol=1e-12)
    unseen = ~rows.item_key.isin(rows[train].item_key)
    if unseen.any():                                                  # unseen -> global train mean
        np.testing.assert_allclose(rows[unseen][ITEM_MEAN], rows[train].label.mean())


def test_leaky_means_average_each_paper_split_with_its_own_labels(inputs):
    rows = _pdf(add_mean_features(assign_splits(inputs.rows, 1, 0.16, 0.2), "leaky").rows)
    rows["part"] = np.where(rows.split == "test", "test", "train")
    for key, name in (("user_key", USER_MEAN), ("item_key", ITEM_MEAN)):
        np.testing.assert_allclose(rows[name], _expected_means(rows, key, rows.index >= 0, "part"), rtol=1e-12)


def _flip_test_ratings(ratings: pd.DataFrame, test_pairs: set) -> pd.DataFrame:
    out = ratings.copy()
    is_test = [(u, i) in test_pairs for u, i in zip(out.user_id, out.item_id)]
    out.loc[is_test, "rating"] = out.loc[is_test, "rating"].map({1: 5, 2: 4, 3: 3, 4: 2, 5: 1})
    return out


@pytest.fixture(scope="module")
def perturbed(spark, inputs, synthetic, tmp_path_factory):
    """The synthetic folder with every test row's rating flipped (5 <-> 1, 4 <-> 2), seed 1."""
    _, ratings = synthetic
    rows = _pdf(assign_splits(inputs.rows, 1, 0.16, 0.2))
    test = rows[rows.split == "test"]
    folder = tmp_path_factory.mktemp("perturbed") / "syn"
    _write_recbole(folder, _flip_test_ratings(ratings, set(zip(test.user_key, test.item_key))), 40, 30)
    out = load_inputs(spark, _cfg(folder, tmp_path_factory.mktemp("wh")))
    yield folder, out
    out.unpersist()


@pytest.mark.parametrize("variant", ["leaky", "leak_free"])
def test_perturbing_test_ratings_changes_leaky_features_only(inputs, perturbed, variant):
    a, b = (_pdf(add_mean_features(assign_splits(x.rows, 1, 0.16, 0.2), variant).rows)
            for x in (inputs, perturbed[1]))
    assert (a.split == b.split).all()                                 # the split ignores the ratings
    test = (a.split == "test").to_numpy()
    assert (a.label[test] != b.label[test]).all() and (a.label[~test] == b.label[~test]).all()
    cols = [USER_MEAN, ITEM_MEAN]
    assert (a[cols][~test].to_numpy() == b[cols][~test].to_numpy()).all()   # non-test rows: same
    changed = (a[cols][test].to_numpy() != b[cols][test].to_numpy()).any(axis=1)
    if variant == "leak_free":
        assert not changed.any()                                      # test ratings never reach them
    else:
        assert changed.mean() > 0.9                                   # the leak: they average test labels


def test_prepared_leak_free_tables_ignore_test_ratings(spark, synthetic, inputs, perturbed, tmp_path):
    """The written samples (encoded, standardised with train statistics) and serving tables."""
    samples = []
    for folder, inp in ((synthetic[0], inputs), perturbed):
        prepared = prepare(_cfg(folder, tmp_path / str(len(samples))), inp, 1, "leak_free")
        df = delta_io.read_arrow(prepared.tables["samples"]).to_pandas()
        samples.append(df.astype({"user_key": int, "item_key": int}).sort_values(["user_key", "item_key"],
                                                                                ignore_index=True))
        _check_prepared(prepared, samples[-1])
    a, b = samples
    test = (a.split == "test").to_numpy()
    assert test.any() and (a.label[test] != b.label[test]).all()
    pd.testing.assert_frame_equal(a.drop(columns="label"), b.drop(columns="label"))


def _check_prepared(prepared, samples: pd.DataFrame) -> None:
    """Tables and spec as training reads them; leak-free test means decode to the train means."""
    spec = prepared.spec
    assert spec.resolved and set(spec.table_versions) == {"user_features", "item_features", "samples"}
    assert set(samples.columns) >= {f.name for f in spec.features} | {"user_key", "item_key", "split"}
    users = delta_io.read_arrow(prepared.tables["user_features"]).to_pandas()
    assert list(users.columns) == ["user_key", *[f.name for f in spec.user_features]]
    assert sum(prepared.counts.values()) == len(samples)
    f = spec.get(USER_MEAN)
    raw = samples[USER_MEAN] * f.std + f.mean
    train = samples[samples.split == "train"]
    expected = samples.user_key.map(train.groupby("user_key").label.mean()).fillna(train.label.mean())
    np.testing.assert_allclose(raw, expected, atol=1e-5)
    # the serving table holds the same train means
    served = users.astype({"user_key": int}).set_index("user_key")[USER_MEAN] * f.std + f.mean
    np.testing.assert_allclose(served.loc[samples.user_key].to_numpy(), expected.to_numpy(), atol=1e-5)


def test_protocol_refuses_a_spec_without_its_features_and_bad_variants(inputs):
    cfg = load_config(dataset="ml100k")
    with pytest.raises(InputError, match="user_mean_rating"):
        check_spec(cfg.spec)
    with pytest.raises(ValueError, match="unknown variant"):
        add_mean_features(assign_splits(inputs.rows, 1, 0.16, 0.2), "half_leaky")
    no_label = load_config(dataset="ml100k_inttower", overrides=["data.source.label_from=null"])
    with pytest.raises(InputError, match="label_from"):
        load_inputs(None, no_label)


# ---- end to end on the real data --------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_on_ml100k(spark, ml100k_dir, tmp_path):
    from orchestration import pipeline

    path = str(ml100k_dir)
    cfg = load_config(dataset="ml100k_inttower", method="dssm", overrides=[
        f"data.source.events.path={path}", f"data.source.users.path={path}", f"data.source.items.path={path}",
        f"warehouse.root={tmp_path / 'wh'}", f"run.output_dir={tmp_path / 'runs'}", "run.seed=1",
        "train.epochs=2", "train.num_threads=1"])
    inp = load_inputs(spark, cfg)
    try:
        prepared = prepare(cfg, inp, 1, "leak_free")
    finally:
        inp.unpersist()
    assert 70_000 < inp.num_rows < 76_000            # 100,000 ratings less the 3s
    result = pipeline.train(cfg, prepared.spec, "dssm", str(tmp_path / "runs" / "dssm"), "test")
    assert result["test"]["rows"] == prepared.counts["test"]
    assert result["test"]["student_auc"] > 0.7

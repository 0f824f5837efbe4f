"""Retrieval baselines (rec_models/baselines, orchestration/baselines.py): most popular
against a brute-force reference, ALS and BPR on planted low-rank clicks, tuning that sees
train and valid only, and the orchestration function on a tiny warehouse built by the ETL."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from orchestration.evaluation import retrieval_from_arrays
from rec_models.baselines import (GRIDS, MFSetting, fit_factors, interaction_matrix, item_click_counts,
                                  popularity_vectors, tune_and_refit)

KS = [5, 10, 20]


def _pack(users, items, n_items):
    return np.asarray(users, np.int64) * n_items + np.asarray(items, np.int64)


def _brute_force_popularity(counts, n_users, n_items, test, seen, ks):
    """Per user, in plain Python: rank unseen items by count, compare with unseen test clicks."""
    seen_of = {u: set() for u in range(n_users)}
    for key in seen:
        seen_of[key // n_items].add(key % n_items)
    pos_of = {}
    for key in test:
        u, i = divmod(int(key), n_items)
        if i not in seen_of[u]:
            pos_of.setdefault(u, set()).add(i)
    order = sorted(range(n_items), key=lambda i: -counts[i])
    out, covered = {}, {k: set() for k in ks}
    for k in ks:
        recalls, ndcgs = [], []
        for u, pos in pos_of.items():
            top = [i for i in order if i not in seen_of[u]][:k]
            covered[k].update(top)
            hits = [r for r, i in enumerate(top) if i in pos]
            recalls.append(len(hits) / len(pos))
            idcg = sum(1 / np.log2(r + 2) for r in range(min(len(pos), k)))
            ndcgs.append(sum(1 / np.log2(r + 2) for r in hits) / idcg)
        out[f"recall@{k}"], out[f"ndcg@{k}"] = np.mean(recalls), np.mean(ndcgs)
        out[f"coverage@{k}"] = len(covered[k]) / n_items
    out["users"] = len(pos_of)
    return out


def test_most_popular_matches_a_brute_force_reference():
    rng = np.random.default_rng(3)
    n_users, n_items = 60, 40
    # distinct click counts per item (no ties, so the reference's order is the only one)
    per_item = rng.permutation(n_items) + 1
    train_items = np.repeat(np.arange(n_items), per_item)
    train = _pack(rng.integers(0, n_users, train_items.size), train_items, n_items)
    valid = _pack(rng.integers(0, n_users, 80), rng.integers(0, n_items, 80), n_items)
    test = np.unique(_pack(rng.integers(0, n_users, 150), rng.integers(0, n_items, 150), n_items))
    counts = item_click_counts(train, n_items)
    np.testing.assert_array_equal(counts, per_item)   # every row counts, repeats included
    users, items = popularity_vectors(counts, n_users)
    assert users.shape == (n_users, 1) and items.shape == (n_items, 1)
    seen = np.unique(np.concatenate([train, valid]))
    got = retrieval_from_arrays(users, items, "dot", test, seen, KS)
    want = _brute_force_popularity(counts, n_users, n_items, test, seen, KS)
    assert got["users"] == want["users"] > 10
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def _planted(seed=0, n_users=300, n_items=150, rank=4, per_user=30):
    """Each user's clicks drawn without replacement from softmax(P Q^T): low-rank taste, weak
    popularity; a user's clicks split 2/3 train, 1/6 valid, 1/6 test."""
    rng = np.random.default_rng(seed)
    p, q = rng.normal(size=(n_users, rank)), rng.normal(size=(n_items, rank))
    logits = 2.0 * p @ q.T / np.sqrt(rank) + 0.3 * rng.normal(size=n_items)
    gumbel = logits + rng.gumbel(size=logits.shape)
    chosen = np.argsort(-gumbel, axis=1)[:, :per_user]
    splits = {"train": [], "valid": [], "test": []}
    for u in range(n_users):
        items = rng.permutation(chosen[u])
        cut = [per_user * 2 // 3, per_user * 5 // 6]
        for name, part in zip(splits, np.split(items, cut)):
            splits[name].append(_pack(np.full(part.size, u), part, n_items))
    return {k: np.concatenate(v) for k, v in splits.items()}, n_users, n_items


SMALL_GRIDS = {"als": (MFSetting(factors=8, regularization=0.1), MFSetting(factors=1, regularization=0.1)),
               "bpr": (MFSetting(factors=8, learning_rate=0.05, iterations=100),
                       MFSetting(factors=8, learning_rate=0.001, iterations=5))}


def _recall(users, items, positives, seen, k=10):
    return retrieval_from_arrays(users, items, "dot", positives, seen, [k])[f"recall@{k}"]


@pytest.mark.parametrize("kind", ["als", "bpr"])
def test_als_and_bpr_beat_most_popular_on_planted_low_rank_clicks(kind):
    splits, n_users, n_items = _planted()
    calls = []

    def evaluate(users, items, positives, seen):
        calls.append((positives, seen))
        return _recall(users, items, positives, seen, 50)

    fit = tune_and_refit(kind, splits["train"], splits["valid"], n_users, n_items, evaluate, seed=7,
                         grid=SMALL_GRIDS[kind])
    # tuning saw the valid clicks, train clicks excluded, and nothing of test
    assert len(calls) == len(SMALL_GRIDS[kind]) == len(fit.grid)
    for positives, seen in calls:
        np.testing.assert_array_equal(positives, np.unique(splits["valid"]))
        np.testing.assert_array_equal(seen, np.unique(splits["train"]))
    scores = [g["valid_recall@50"] for g in fit.grid]
    assert fit.chosen == fit.grid[int(np.argmax(scores))]
    assert fit.chosen["factors"] == 8   # the deliberately bad second setting loses on valid
    seen = np.unique(np.concatenate([splits["train"], splits["valid"]]))
    test = np.unique(splits["test"])
    popular = _recall(*popularity_vectors(item_click_counts(splits["train"], n_items), n_users), test, seen)
    mf = _recall(fit.users, fit.items, test, seen)
    assert fit.users.shape[0] == n_users and fit.items.shape[0] == n_items
    assert mf > 1.5 * popular, (kind, mf, popular)


def test_the_refit_uses_train_and_valid_and_is_reproducible():
    splits, n_users, n_items = _planted(seed=1, n_users=80, n_items=60)
    setting = MFSetting(factors=8, regularization=0.1)
    m = interaction_matrix(np.concatenate([splits["train"], splits["train"][:5]]), n_users, n_items)
    assert m.shape == (n_users, n_items) and m.max() == 2.0 and m.sum() == splits["train"].size + 5
    fit = tune_and_refit("als", splits["train"], splits["valid"], n_users, n_items,
                         lambda *a: 0.5, seed=3, grid=[setting])
    both = interaction_matrix(np.concatenate([splits["train"], splits["valid"]]), n_users, n_items)
    users, items = fit_factors("als", both, setting, seed=3)
    np.testing.assert_array_equal(fit.users, users)   # same seed, same data: the same model
    np.testing.assert_array_equal(fit.items, items)
    # the chosen setting's train-only fit is kept: the students' training clicks, nothing of valid
    train_users, train_items = fit_factors("als", interaction_matrix(splits["train"], n_users, n_items), setting, seed=3)
    np.testing.assert_array_equal(fit.train_users, train_users)
    np.testing.assert_array_equal(fit.train_items, train_items)
    assert not np.array_equal(fit.train_items, fit.items)
    again = fit_factors("bpr", both, MFSetting(factors=8, iterations=10), seed=3, num_threads=1)
    np.testing.assert_array_equal(again[1], fit_factors("bpr", both, MFSetting(factors=8, iterations=10),
                                                        seed=3, num_threads=1)[1])


def test_an_unusable_valid_split_is_a_named_user_error():
    from rec_models.errors import BadInputError, ConfigError

    splits, n_users, n_items = _planted(seed=2, n_users=50, n_items=40)
    with pytest.raises(BadInputError, match="valid"):
        tune_and_refit("als", splits["train"], splits["train"], n_users, n_items,
                       lambda *a: float("nan"), seed=0, grid=[MFSetting(factors=4)])
    with pytest.raises(ConfigError, match="unknown"):
        fit_factors("svd", interaction_matrix(splits["train"], n_users, n_items), MFSetting(), seed=0)
    assert set(GRIDS) == {"als", "bpr"} and all(GRIDS.values())
    from orchestration.baselines import retrieval_baselines
    from rec_models.config import load_config

    with pytest.raises(ConfigError, match="svd"):   # before any read
        retrieval_baselines(load_config(), ("most_popular", "svd"))


# ---------------------------------------------------------------- on a warehouse built by the ETL

TINY = ["data.source.synthetic.n_users=120", "data.source.synthetic.n_items=80",
        "data.source.synthetic.n_events=6000", "data.source.synthetic.partitions=2"]


@pytest.fixture(scope="module")
def tiny_warehouse(spark, tmp_path_factory):
    from etl.build import build_features
    from rec_models.config import load_config

    tmp = tmp_path_factory.mktemp("baselines")
    overrides = [f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}", *TINY,
                 "train.num_threads=1", "eval.k=[5,10,50]"]
    cfg = load_config(overrides=overrides)
    build_features(spark, cfg)
    return cfg, overrides


def test_retrieval_baselines_on_the_warehouse_score_like_the_students(tiny_warehouse, monkeypatch):
    import orchestration.baselines as ob
    from etl import delta_io
    from orchestration.artifacts import load_spec, pinned_version
    from orchestration.evaluation import Embeddings, positive_pairs, retrieval_from_tables, split_files

    cfg, _ = tiny_warehouse
    calls = []

    def spy(users, items, score_kind, positives, seen, ks, *args):
        calls.append((np.asarray(positives).copy(), list(ks)))
        return retrieval_from_arrays(users, items, score_kind, positives, seen, ks, *args)

    monkeypatch.setattr(ob, "retrieval_from_arrays", spy)
    out = ob.retrieval_baselines(cfg)
    assert list(out) == ["most_popular", "als", "als_train", "bpr", "bpr_train"]

    # the students' keys: retrieval_from_tables over (random) vectors of the same entities
    spec = load_spec(cfg)
    version = pinned_version(spec, "samples")
    ids = {side: pd.Index(delta_io.read_arrow(cfg.warehouse.uri(f"{side}_features"), [f"{side}_key"])
                          .column(0).cast(pa.string()).to_numpy(zero_copy_only=False)) for side in ("user", "item")}
    rng = np.random.default_rng(0)
    emb = Embeddings(ids["user"], rng.normal(size=(len(ids["user"]), 4)).astype(np.float32),
                     ids["item"], rng.normal(size=(len(ids["item"]), 4)).astype(np.float32), "dot", "r")
    student = retrieval_from_tables(cfg, emb, version, cfg.eval.k)
    for name, metrics in out.items():
        assert set(student) <= set(metrics), name
        for key in ("users", "items", "positives", "test_clicks"):   # the same test set as the students'
            assert metrics[key] == student[key], (name, key)
        assert all(0.0 <= metrics[f"recall@{k}"] <= 1.0 for k in cfg.eval.k)
        assert metrics["recall@50"] >= metrics["recall@10"] >= metrics["recall@5"]
    for name in ("als", "bpr"):
        assert out[name]["chosen"] in out[name]["grid"] and len(out[name]["grid"]) == len(GRIDS[name])
        assert out[f"{name}_train"]["chosen"] == out[name]["chosen"]   # the same setting, fit on train only

    # choices were made on valid (Recall@50, train excluded); test was scored once per model
    label = cfg.spec.label.name
    valid = positive_pairs(split_files(cfg, "valid", version), label, ids["user"], ids["item"])
    test = positive_pairs(split_files(cfg, "test", version), label, ids["user"], ids["item"])
    tuning = [c for c in calls if c[1] == [ob.SELECT_K]]
    scoring = [c for c in calls if c[1] == cfg.eval.k]
    assert len(tuning) == len(GRIDS["als"]) + len(GRIDS["bpr"]) and len(scoring) == 5
    assert all(np.array_equal(p, valid) for p, _ in tuning)
    assert all(np.array_equal(p, test) for p, _ in scoring)


def test_compare_methods_prints_the_baselines_as_rows_per_seed(tiny_warehouse, monkeypatch):
    """benchmarks/compare_methods.py: one most_popular / als / bpr row per seed beside the
    methods (training faked here: the baselines are computed for real), '-' where AUC is."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_methods.py"
    spec = importlib.util.spec_from_file_location("compare_methods_under_test", path)
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    _, overrides = tiny_warehouse
    seen_cfgs = []

    def fake_train(cfg, spec, kind, out_dir, run_id, **_):
        return {"checkpoint": f"{out_dir}/last.pt", "test": {"student_auc": 0.7}}

    def fake_run_method(spark, cfg, method):
        seen_cfgs.append(cfg)
        return {"train_seconds": 1.0, "selected_epoch": 2, "valid": {"student_recall@50": 0.2, "student_auc": 0.6},
                "metrics": {"student": {"auc": 0.71, "logloss": 0.5, "rows": 10},
                            "student_retrieval": {"recall@10": 0.01, "ndcg@10": 0.005}}}

    monkeypatch.setattr(cm.pipeline, "train", fake_train)
    monkeypatch.setattr(cm.pipeline, "run_method", fake_run_method)
    rows = []
    for seed in (1, 2):
        seed_rows, _ = cm.run_seed(None, None, ["dssm"], [*overrides, f"run.seed={seed}"])
        rows += [{**r, "seed": seed} for r in seed_rows]
    assert [r["method"] for r in rows] == ["dssm", *cm.BASELINES] * 2
    assert all(not c.eval.baselines for c in seen_cfgs)   # not recomputed inside every method's run
    for r in rows[1:6]:
        assert r["role"] == "reference" and {"recall@10", "ndcg@50"} <= set(r) and "student_auc" not in r
    summary = cm.summarise(rows, ["dssm", *cm.BASELINES])
    assert [s["method"] for s in summary] == ["dssm", "most_popular", "als", "als_train", "bpr", "bpr_train"]
    assert all(s["seeds"] == 2 for s in summary)
    table = cm.markdown({"dataset": "synthetic", "seeds": [1, 2], "teachers": {"cross_encoder": [0.7, 0.7]},
                         "summary": summary, "machine": "2 cores", "epochs": 1})
    lines = table.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| method |")).strip("|").split("|")]
    als = dict(zip(header, (c.strip() for c in next(line for line in lines if line.startswith("| als |"))
                            .strip("|").split("|"))))
    assert als["role"] == "reference" and als["AUC"] == als["LogLoss"] == "-"   # they do not apply
    assert als["recall@10"] != "-"
    dssm = dict(zip(header, (c.strip() for c in next(line for line in lines if line.startswith("| dssm |"))
                             .strip("|").split("|"))))
    assert dssm["valid Recall@50"].startswith("0.2000") and dssm["objective"] == "mixed"


def test_the_best_student_is_compared_with_als_on_its_own_clicks_and_refit():
    """compare_methods' 1.1x goal line: against the better of most-popular and ALS fit on the
    students' training clicks, and against ALS refit on train + valid."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_methods.py"
    spec = importlib.util.spec_from_file_location("compare_methods_ratio", path)
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    summary = [{"method": "dssm", "role": "baseline", "recall@50": 0.30},
               {"method": "pfd", "role": "distill", "recall@50": 0.33},
               {"method": "most_popular", "role": "reference", "recall@50": 0.20},
               {"method": "als", "role": "reference", "recall@50": 0.36},
               {"method": "als_train", "role": "reference", "recall@50": 0.30}]
    a = cm.against_baselines(summary)
    assert a["same_data"]["best_student"] == "pfd" and a["same_data"]["reference"] == "als_train"
    assert a["same_data"]["ratio"] == pytest.approx(1.1) and a["refit"]["ratio"] == pytest.approx(0.33 / 0.36)
    text = cm.markdown({"dataset": "d", "seeds": [1], "teachers": {}, "summary": [], "machine": "m", "epochs": 1,
                        "against_baselines": a})
    assert "1.10x the better reference fit on the same training clicks (als_train 0.3000)" in text
    assert "0.92x the better reference refit on train + valid (als 0.3600)" in text


def test_tune_student_ranks_candidates_by_their_valid_recall(tiny_warehouse, tmp_path, capsys):
    """benchmarks/tune_student.py: one run per seed and candidate, each read at its selected
    epoch's valid Recall@select_k, the table ordered best first."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tune_student.py"
    spec = importlib.util.spec_from_file_location("tune_student_under_test", path)
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    _, overrides = tiny_warehouse
    out = tmp_path / "tune"
    argv = ["--method", "dssm", "--seeds", "1", "--out", str(out), "--try", "", "--try", "student.objective=pointwise",
            *[a for o in [*overrides, "train.epochs=2", "train.batch_size=256"] for a in ("--set", o)]]
    assert ts.main(argv) == 0
    runs = json.loads(out.with_suffix(".json").read_text())
    assert [r["overrides"] for r in runs] == [[], ["student.objective=pointwise"]]
    for r in runs:
        assert r["metric"] == "valid_student_recall@50" and len(r["curve"]) == 2
        assert r["valid"] == r["curve"][r["epoch"]] == max(r["curve"])   # epochs count from 0 and 0.0 <= r["valid"] <= 1.0
    table = out.with_suffix(".md").read_text().splitlines()
    means = [float(line.split("|")[2]) for line in table if line.startswith("| `")]
    assert len(means) == 2 and means == sorted(means, reverse=True)

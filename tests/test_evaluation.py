"""jobs/evaluate.py and its library: GAUC, coverage and top-K exclusion against brute force;
end to end on a tiny trained model (Delta metrics table, rerun, JSON, report, spark-submit)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from etl import delta_io
from orchestration import evaluation
from rec_models.metrics import gauc, per_user_auc, recommended_mask
from rec_models.serving.retrieval import top_k
from rec_models.serving.scoring import score_all

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- pure metrics

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_per_user_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    users = rng.choice([f"u{i}" for i in range(120)], size=n)
    labels = (rng.random(n) < 0.3).astype(np.float32)
    scores = np.round(rng.random(n) + 0.3 * labels, 1)      # rounded: many ties, counted 1/2
    aucs, weights = [], []
    for u in np.unique(users):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            aucs.append(roc_auc_score(labels[m], scores[m]))
            weights.append(m.sum())
    assert gauc(users, labels, scores) == pytest.approx(np.average(aucs, weights=weights), abs=1e-12)
    ids, got, n_rows = per_user_auc(users, labels, scores)
    assert len(ids) == len(aucs) and sorted(n_rows) == sorted(weights)
    assert sorted(got) == pytest.approx(sorted(aucs), abs=1e-12)


def test_gauc_edge_cases():
    assert np.isnan(gauc([1, 1, 2], [1, 1, 0], [0.1, 0.2, 0.3]))        # nobody has both classes
    # one user with both classes: GAUC is that user's AUC, whatever the others do
    assert gauc([1, 1, 1, 2], [1, 0, 0, 1], [0.9, 0.1, 0.95, 0.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in length"):
        gauc([1, 2], [1], [0.5, 0.5])


@pytest.mark.parametrize("k", [None, 1, 3])
def test_coverage_matches_brute_force(k):
    rng = np.random.default_rng(3)
    top = np.stack([rng.permutation(40)[:5] for _ in range(30)])
    top[0, 2:] = -1                                            # padding is not an item
    want = {int(i) for row in top for i in row[:k] if i >= 0}
    assert recommended_mask(top, 40, k).mean() == pytest.approx(len(want) / 40)
    mask = recommended_mask(top[:15], 40, k) | recommended_mask(top[15:], 40, k)
    assert set(np.flatnonzero(mask)) == want                  # batches OR to the whole


# ---------------------------------------------------------------- top-K with exclusion

def _brute_top_k(scores: np.ndarray, excluded: np.ndarray, k: int) -> np.ndarray:
    s = np.where(excluded, -np.inf, scores)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(s, order, 1) == -np.inf, -1, order)


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
@pytest.mark.parametrize("kind", ["dot", "late_interaction"])
def test_top_k_exclusion_matches_brute_force(chunk, kind):
    g = torch.Generator().manual_seed(5)
    shape_u, shape_i = ((16,), (16,)) if kind == "dot" else ((3, 8), (4, 8))
    users, items = torch.randn(20, *shape_u, generator=g), torch.randn(90, *shape_i, generator=g)
    rng = np.random.default_rng(5)
    excluded = rng.random((20, 90)) < 0.3
    excluded[3, :88], excluded[3, 88:] = True, False          # 2 items left for a top-10
    rows, cols = np.nonzero(excluded)
    got = top_k(users, items, 10, item_chunk=chunk, exclude=(rows, cols), score_kind=kind).numpy()
    scores = score_all(kind, users, items).numpy()
    assert np.array_equal(got, _brute_top_k(scores, excluded, 10))
    r, c = np.nonzero(got >= 0)
    assert not excluded[r, got[r, c]].any()                   # a masked item never comes back
    assert (got[3, 2:] == -1).all() and set(got[3, :2]) == {88, 89}
    dense = top_k(users, items, 10, item_chunk=chunk, exclude=torch.from_numpy(excluded), score_kind=kind)
    assert np.array_equal(dense.numpy(), got)
    plain = top_k(users, items, 10, item_chunk=chunk, score_kind=kind).numpy()
    assert np.array_equal(plain, _brute_top_k(scores, np.zeros_like(excluded), 10))


def test_top_k_exclusion_rejects_bad_pairs():
    users, items = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="rows must lie"):
        top_k(users, items, 3, exclude=(np.array([2]), np.array([0])))
    with pytest.raises(ValueError, match="bool"):
        top_k(users, items, 3, exclude=torch.zeros(2, 4, dtype=torch.bool))


def _brute_retrieval(users, items, positives, seen, ks):
    """Per-user Python reference: mask seen, drop seen positives, rank, score."""
    n_items = items.shape[0]
    scores = users @ items.T
    pos = {(int(p) // n_items, int(p) % n_items) for p in positives} - {
        (int(p) // n_items, int(p) % n_items) for p in seen}
    by_user = {}
    for u, i in pos:
        by_user.setdefault(u, set()).add(i)
    seen_by = {}
    for p in seen:
        seen_by.setdefault(int(p) // n_items, set()).add(int(p) % n_items)
    out = {f"{m}@{k}": [] for m in ("recall", "ndcg") for k in ks}
    cover = {k: set() for k in ks}
    for u, want in sorted(by_user.items()):
        ranked = [i for i in np.argsort(-scores[u], kind="stable") if i not in seen_by.get(u, set())]
        for k in ks:
            top = ranked[:k]
            cover[k] |= set(top)
            out[f"recall@{k}"].append(len(set(top) & want) / len(want))
            dcg = sum(1 / np.log2(r + 2) for r, i in enumerate(top) if i in want)
            idcg = sum(1 / np.log2(r + 2) for r in range(min(len(want), k)))
            out[f"ndcg@{k}"].append(dcg / idcg)
    res = {key: float(np.mean(v)) for key, v in out.items()}
    res.update({f"coverage@{k}": len(c) / n_items for k, c in cover.items()})
    res["users"] = len(by_user)
    return res


def test_retrieval_from_arrays_matches_a_per_user_reference():
    rng = np.random.default_rng(11)
    users, items = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(70, 8)).astype(np.float32)
    n_items = 70
    positives = np.unique(rng.integers(0, 50, 300) * n_items + rng.integers(0, 70, 300))
    seen = np.unique(np.concatenate([rng.choice(positives, 60, replace=False),     # repeats of test clicks
                                     rng.integers(0, 50, 400) * n_items + rng.integers(0, 70, 400)]))
    got = evaluation.retrieval_from_arrays(users, items, "dot", positives, seen, [5, 20], user_batch=7,
                                           item_chunk=16)
    want = _brute_retrieval(users, items, positives, seen, [5, 20])
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["exclude_seen"] and got["positives"] == len(np.setdiff1d(positives, seen))
    plain = evaluation.retrieval_from_arrays(users, items, "dot", positives, None, [5, 20], user_batch=7)
    want = _brute_retrieval(users, items, positives, np.zeros(0, np.int64), [5, 20])
    assert plain["recall@5"] == pytest.approx(want["recall@5"], abs=1e-12) and not plain["exclude_seen"]


def test_unknown_k_is_refused_at_configuration():
    from rec_models.config import ConfigError, load_config

    for bad in ("eval.k=[0,10]", "eval.k=[-5]", "eval.k=[]"):
        with pytest.raises(ConfigError, match="eval.k"):
            load_config(overrides=[bad])
    assert load_config(overrides=["eval.k=[50,10,50]"]).eval.k == [10, 50]
    from rec_models.config import check_ks

    with pytest.raises(ValueError, match="eval.k"):
        check_ks([10, 0])


def _job(name, *args, timeout=180):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_evaluate_without_a_checkpoint_says_what_to_run(tmp_path):
    done = _job("evaluate", "--method", "virt", "--set", f"run.output_dir={tmp_path}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no checkpoint at" in done.stderr and "jobs/distill.py --method virt" in done.stderr
    assert done.stdout == ""
    done = _job("evaluate", "--set", "eval.k=[0]")
    assert done.returncode == 2 and "eval.k" in done.stderr


def test_an_empty_test_split_is_a_named_error(spark, tmp_path):
    from rec_models.config import load_config

    cfg = load_config(overrides=[f"warehouse.root={tmp_path}"])
    df = spark.createDataFrame([("u1", "i1", 1.0, "train")], "user_key string, item_key string, label float, split string")
    delta_io.write_table(df, cfg.warehouse.uri("samples"), partition_by=["split"])
    assert evaluation.split_files(cfg, "train", None)
    with pytest.raises(ValueError, match="test split .* is empty: rerun spark-submit jobs/build_features.py"):
        evaluation.split_files(cfg, "test", None)


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory):
    """A tiny PFD model (teacher + student heads) through the pipeline, and a DSSM."""
    from jobs import distill, distill_pfd
    from tests.test_pipeline import _Capture, _run_job

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("evaluate")
    try:
        with _Capture() as cap:
            pfd = _run_job(distill_pfd, tmp, cap, "distill.train_baseline=false", "train.epochs=2")
            dssm = _run_job(distill, tmp, cap, "train.epochs=1", args=["--method", "dssm"])
    finally:
        torch.set_num_threads(threads)
    return tmp, pfd, dssm


def _evaluate(tmp, *overrides, args=()):
    from jobs import evaluate
    from tests.test_pipeline import _Capture, _run_job

    with _Capture() as cap:
        return _run_job(evaluate, tmp, cap, *overrides, args=args)


def _cfg(tmp, *overrides):
    from rec_models.config import load_config
    from tests.test_pipeline import SMALL

    return load_config(overrides=[f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}", *SMALL,
                                  *overrides])


@pytest.mark.slow
def test_evaluation_end_to_end(trained):
    tmp, pfd, dssm = trained
    first = _evaluate(tmp)
    assert first["method"] == "pfd" and first["run_id"] == pfd["run_id"]
    heads = first["test"]["heads"]
    assert set(heads) == {"teacher", "student"}
    for head, m in heads.items():   # the same model on the same snapshot: training's own test AUC
        assert m["auc"] == pytest.approx(pfd["metrics"][head]["auc"], abs=1e-9)
        assert 0.5 < m["gauc"] < 1 and m["gauc_users"] > 100
    r = first["retrieval"]
    assert r["exclude_seen"] and r["items"] == 250 and r["users"] > 100
    for k in (10, 50, 100):
        assert 0 < r[f"coverage@{k}"] <= 1 and 0 < r[f"ndcg@{k}"] <= 1
    # random top-K recall is about K / (items - seen), seen about 20 per user here
    assert r["recall@10"] > 2 * 10 / 250 and r["recall@50"] > 1.3 * 50 / 250, r
    assert r["recall@10"] < r["recall@50"] < r["recall@100"] and r["coverage@10"] < r["coverage@100"]

    # the Delta metrics table: test metrics of both heads, retrieval per K, the history
    uri = first["tables"]["metrics"]
    table = delta_io.read_arrow(uri).to_pandas()
    mine = table[table["method"] == "pfd"]
    test = mine[mine["split"] == "test"]
    assert len(test) == 2 * 3 + 3 * 3 and len(mine) == first["metric_rows"]
    assert set(zip(test["head"], test["metric"])) == {(h, m) for h in ("teacher", "student")
                                                       for m in ("auc", "logloss", "gauc")} | {
        ("student", m) for m in ("recall", "ndcg", "coverage")}
    assert sorted(test["k"].dropna().astype(int)) == sorted([10, 50, 100] * 3)
    assert set(mine["epoch"].dropna().astype(int)) == {0, 1}
    assert set(mine["run_id"]) == {pfd["run_id"]} and set(mine["model_name"]) == {"pfd_student"}
    assert set(mine["dataset"]) == {"synthetic"}

    # a rerun replaces its rows in one commit
    version = delta_io.table_version(uri)
    again = _evaluate(tmp)
    after = delta_io.read_arrow(uri).to_pandas()
    assert delta_io.table_version(uri) == version + 1 and len(after) == len(table)
    assert after["evaluated_at"].nunique() == 1
    assert again["retrieval"]["recall@10"] == pytest.approx(r["recall@10"])

    # another method adds its own partition and joins the comparison
    other = _evaluate(tmp, "run.name=dssm", args=["--method", "dssm"])
    assert set(other["test"]["heads"]) == {"student"} and "recall@10" in other["retrieval"]
    models = set(delta_io.read_arrow(uri, ["method"])["method"].to_pylist())
    assert models == {"pfd", "dssm"} and delta_io.read_arrow(uri).num_rows > len(after)

    # JSON and report
    saved = json.loads(Path(again["json"]).read_text())
    assert saved["retrieval"] == again["retrieval"] and saved["test"] == again["test"]
    assert again["json"] == str(tmp / "runs" / "pfd_student" / "v1" / "evaluation.json")
    report = Path(other["report"]["markdown"])
    assert report.parent == tmp / "runs" / "dssm" / "v1" / "report"
    text = report.read_text()
    assert "pfd_student/v1 (pfd)" in text and "dssm/v1 (dssm)" in text
    for png in other["report"]["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({Path(png).name})" in text


@pytest.mark.slow
def test_exclusion_changes_recall_sensibly(trained):
    """Masking seen items can only lift a novel test click's rank: on the same positives,
    recall with exclusion is >= without; the pipeline reports the excluded version."""
    tmp, pfd, _ = trained
    cfg = _cfg(tmp)
    kept = evaluation.retrieval_metrics(cfg, "pfd_student", "v1", exclude_seen=False)
    excl = evaluation.retrieval_metrics(cfg, "pfd_student", "v1")
    assert excl["recall@10"] == pytest.approx(pfd["metrics"]["student_retrieval"]["recall@10"])
    assert kept["positives"] > excl["positives"] > 0 and kept["recall@10"] != excl["recall@10"]

    emb = evaluation.load_embeddings(cfg, "pfd_student", "v1")
    files = {s: evaluation.split_files(cfg, s, None) for s in ("train", "valid", "test")}
    seen = np.unique(np.concatenate([evaluation.positive_pairs(files[s], "label", emb.user_ids, emb.item_ids)
                                     for s in ("train", "valid")]))
    test = evaluation.positive_pairs(files["test"], "label", emb.user_ids, emb.item_ids)
    novel = np.setdiff1d(test, seen)
    ks = [10, 50, 100]
    on_novel = evaluation.retrieval_from_arrays(emb.users, emb.items, emb.score_kind, novel, None, ks)
    for k in ks:
        assert excl[f"recall@{k}"] >= on_novel[f"recall@{k}"] - 1e-12, (k, excl, on_novel)
    assert any(excl[f"recall@{k}"] > on_novel[f"recall@{k}"] for k in ks)


@pytest.mark.slow
def test_evaluate_errors_name_what_is_missing(trained):
    from jobs import evaluate
    from tests.test_pipeline import SMALL, _Capture

    tmp, pfd, _ = trained

    def fails(*overrides, args=()):
        argv = list(args)
        for item in [f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}", *SMALL, *overrides]:
            argv += ["--set", item]
        buf = io.StringIO()
        with _Capture(), contextlib.redirect_stderr(buf):
            code = evaluate.run(evaluate.__doc__, evaluate.body, evaluate.options, argv=argv)
        return code, buf.getvalue()

    code, msg = fails("run.version=v9", args=["--checkpoint", pfd["checkpoint"]])
    assert code == 2 and "no committed embeddings of model pfd_student version v9" in msg and "jobs/distill.py" in msg
    code, msg = fails("run.version=v9")
    assert code == 2 and "no checkpoint at" in msg


@pytest.mark.slow
def test_spark_submit_evaluate(trained, tmp_path):
    """The real launcher on the trained model: exit 0, result JSON the last stdout line."""
    from tests.test_pipeline import SMALL

    tmp, pfd, _ = trained
    submit = Path(sys.executable).parent / "spark-submit"
    if not submit.exists():
        pytest.skip("spark-submit is not in this environment")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    out = tmp_path / "result.json"
    sets = [a for item in [f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}", *SMALL]
            for a in ("--set", item)]
    done = subprocess.run([str(submit), "--master", "local[2]", str(ROOT / "jobs" / "evaluate.py"), *sets,
                           "--json-out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["job"] == "evaluate" and result["run_id"] == pfd["run_id"]
    assert set(result["test"]["heads"]) == {"teacher", "student"} and result["retrieval"]["users"] > 100

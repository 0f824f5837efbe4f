"""How well could any model retrieve on the synthetic default? Rank by the generator itself.

    .venv/bin/python benchmarks/synthetic_ceiling.py [--set key=value ...] [--out results/synthetic_ceiling]

``etl.synthetic`` draws every latent quantity from hashes of row keys, so they can be drawn
again: the users' and items' latent vectors, the items' quality, each user x category
taste (its lasting part and the part redrawn every ``TASTE_PERIOD_DAYS``). This script
scores every (user, item) by the generator's expected clicks per test impression,

    P(shown i) * P(click | shown i),
    P(shown i)  = E[ sum over the EXPOSURE_CANDIDATES popularity draws of softmax(affinity) ]
                ~ C p_i E_S[ e^a_ui / (e^a_ui + S_u) ],  S_u the e^a of C - 1 other draws from p,
                  p_j = sqrt((j+1)/n) - sqrt(j/n), the law of floor(U^2 n)   (Monte Carlo over S)
    P(click)    = E_eps sigmoid(-2.2 + 1.5 a_ui + 0.8 q_i + 1.3 taste(u, cat_i, t) + 1.2 eps)
                  (Gauss-Hermite over eps; t averaged over the test window's span)

and ranks items by it with the students' metric code (same test clicks, train/valid clicks
masked): the ranking of a model that knew the click model. It leaves out only fatigue (a
pair's earlier impressions), so it is a ceiling's lower bound, not a proof of the ceiling.
Rows with parts of the model left out show which part carries the retrieval signal.
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import pandas as pd
import pyarrow.compute as pc
from pyspark.sql import functions as F

from etl import synthetic
from etl.randomness import normal
from etl.spark import get_spark
from orchestration import pipeline
from orchestration.artifacts import load_spec
from orchestration.baselines import retrieval_clicks
from rec_models.config import load_config
from rec_models.serving.retrieval import retrieval_from_arrays
from rec_models.state_files import write_bytes_atomic, write_json_atomic

MAX_PAIRS = 20_000_000   # a dense user x item score matrix: the synthetic default is 2,000 x 1,000
TIME_POINTS = 8          # the test window's span, sampled for the taste's redrawn part
EXPOSURE_DRAWS = 128     # Monte Carlo draws of the other candidates, per user


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--out", default="results/synthetic_ceiling")
    args = p.parse_args(argv)
    cfg = load_config(dataset="synthetic", overrides=args.overrides)
    if cfg.data.source.type != "synthetic":
        print("error: the ceiling needs data.source.type=synthetic (it redraws the generator)", file=sys.stderr)
        return 2
    gen = cfg.data.source.synthetic
    if gen.n_users * gen.n_items > MAX_PAIRS:
        print(f"error: {gen.n_users} x {gen.n_items} pairs exceed {MAX_PAIRS:,} (a dense score matrix)", file=sys.stderr)
        return 2
    spark = get_spark(cfg.spark)
    pipeline.ensure_features(spark, cfg)
    data = retrieval_clicks(cfg, load_spec(cfg))   # the users, items and clicks the baselines are scored on
    seen, test = data.seen, data.test
    t_lo, t_hi = _span(data.test_files, cfg.spec.keys.timestamp)
    parts = _generator_parts(spark, gen, data.user_ids, data.item_ids, np.linspace(t_lo, t_hi, TIME_POINTS))

    rows = {}
    for name, score in _rankings(parts, gen).items():
        metrics = retrieval_from_arrays(score, np.eye(score.shape[1], dtype=np.float32), "dot", test, seen,
                                        cfg.eval.k, cfg.eval.user_batch_size, cfg.eval.item_chunk_size)
        rows[name] = {k: v for k, v in metrics.items() if k.startswith(("recall@", "ndcg@"))}
        print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
    report = {"dataset": cfg.data.name, "generator": gen.model_dump(), "test_window": [t_lo, t_hi],
              "test_clicks": int(test.size), "rows": rows}
    text = _markdown(rows)
    write_json_atomic(args.out + ".json", report)
    write_bytes_atomic(args.out + ".md", text.encode())
    print(text)
    return 0


def _span(files: list[str], ts: str) -> tuple[float, float]:
    import pyarrow.parquet as pq

    bounds = [pc.min_max(pq.read_table(f, columns=[ts]).column(ts)) for f in files]
    return (float(min(b["min"].as_py() for b in bounds if b["min"].is_valid)),
            float(max(b["max"].as_py() for b in bounds if b["max"].is_valid)))


def _generator_parts(spark, gen, user_ids: pd.Index, item_ids: pd.Index, times: np.ndarray) -> dict:
    """The generator's latent draws, in feature-table order: affinity [U, I], quality [I],
    item index [I] (its popularity rank), lasting taste [U, I] and redrawn taste [T, U, I]."""
    users = synthetic._users(spark, gen).select("user_id", "z", "phase").toPandas().set_index("user_id")
    items = synthetic._items(spark, gen).select("item_id", "z", "quality", "category").toPandas().set_index("item_id")
    users, items = users.loc[list(user_ids)], items.loc[list(item_ids)]
    zu, zi = np.stack(users["z"].to_numpy()), np.stack(items["z"].to_numpy())
    categories = sorted(items["category"].unique())
    cat_of = pd.Index(categories).get_indexer(items["category"])
    # the generator's own hashed draws per (user, category[, period]), as in synthetic._events
    grid = (spark.createDataFrame(pd.DataFrame({"user_id": list(user_ids), "phase": users["phase"].to_numpy()}))
            .crossJoin(spark.createDataFrame(pd.DataFrame({"category": categories})))
            .crossJoin(spark.createDataFrame(pd.DataFrame({"t": times.astype(np.int64), "ti": np.arange(times.size)}))))
    draws = taste_at(grid, gen.seed).select("user_id", "category", "ti", "lasting", "drift").toPandas()
    u = user_ids.get_indexer(draws["user_id"])
    c = pd.Index(categories).get_indexer(draws["category"])
    lasting = np.zeros((len(user_ids), len(categories)))
    drift = np.zeros((times.size, len(user_ids), len(categories)))
    lasting[u, c] = draws["lasting"].to_numpy()
    drift[draws["ti"].to_numpy(), u, c] = draws["drift"].to_numpy()
    return {"affinity": zu @ zi.T / math.sqrt(gen.latent_dim), "quality": items["quality"].to_numpy(),
            "item_index": np.array([int(i[1:]) for i in item_ids]), "lasting": lasting[:, cat_of],
            "drift": drift[:, :, cat_of]}


def taste_at(rows, seed: int):
    """``rows`` (user_id, category, t: the time, phase: the user's) with the generator's
    user x category taste drawn again: ``lasting`` and ``drift`` (the part of t's period),
    taste = 0.8 lasting + 0.6 drift, as in ``etl.synthetic._events``."""
    period = F.floor((F.col("t") - synthetic.T0 + F.col("phase")) / (synthetic.TASTE_PERIOD_DAYS * 86400)).cast("long")
    return (rows.withColumn("period", period)
            .withColumn("lasting", normal(seed, "taste", "user_id", "category"))
            .withColumn("drift", normal(seed, "drift", "user_id", "category", "period")))


def _rankings(parts: dict, gen) -> dict[str, np.ndarray]:
    a, q = parts["affinity"], parts["quality"]
    shown = _exposure(a, parts["item_index"], gen.n_items)
    nodes, weights = np.polynomial.hermite_e.hermegauss(16)
    weights = weights / weights.sum()

    def click(taste):   # E over the moment's noise and the test window's times
        m = -2.2 + 1.5 * a + 0.8 * q[None, :] + 1.3 * taste
        return sum(w * _sigmoid(m + synthetic.MOMENT_NOISE * x) for x, w in zip(nodes, weights)).mean(axis=0)

    taste_now = 0.8 * parts["lasting"][None] + 0.6 * parts["drift"]
    full = click(taste_now)
    lasting_only = click(0.8 * parts["lasting"][None])
    no_taste = click(np.zeros_like(a)[None])
    return {"generator: shown x click (taste at test time)": (shown * full).astype(np.float32),
            "generator, taste's redrawn part left out": (shown * lasting_only).astype(np.float32),
            "generator, no user x category taste": (shown * no_taste).astype(np.float32),
            "generator, P(click) alone (exposure left out)": full.astype(np.float32),
            "generator, P(shown) alone": shown.astype(np.float32)}


def _exposure(a: np.ndarray, item_index: np.ndarray, n_items: int) -> np.ndarray:
    """P(item shown | one impression of the user): the best of C popularity draws by
    affinity + Gumbel, i.e. a softmax over the C draws (duplicates among the draws ignored)."""
    c = synthetic.EXPOSURE_CANDIDATES
    p = np.sqrt((item_index + 1) / n_items) - np.sqrt(item_index / n_items)
    p = p / p.sum()
    rng = np.random.default_rng(0)
    others = rng.choice(a.shape[1], size=(EXPOSURE_DRAWS, c - 1), p=p)     # column positions, drawn by p
    ea = np.exp(a)
    out = np.zeros_like(a)
    for start in range(0, a.shape[0], 256):   # bounded memory: 256 users x draws x items
        block = ea[start:start + 256]
        rest = block[:, others].sum(axis=2)                               # [users, draws]
        out[start:start + 256] = (block[:, None, :] / (block[:, None, :] + rest[:, :, None])).mean(axis=1)
    return c * p[None, :] * out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _markdown(rows: dict) -> str:
    ks = sorted({k for r in rows.values() for k in r}, key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    lines = ["| ranking | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
    lines += [f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in ks) + " |" for name, r in rows.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

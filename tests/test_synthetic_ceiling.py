"""benchmarks/synthetic_ceiling.py ranks by the generator's own click model: its redraws of
the generator's hidden quantities must be the ones the events were drawn from."""
from __future__ import annotations

import math

import numpy as np
import pytest
from pyspark.sql import functions as F

from benchmarks.synthetic_ceiling import taste_at
from etl import synthetic
from rec_models.config import load_config


def _clicks_with_redraws(spark, shift_days: float = 0.0):
    gen = load_config(overrides=["data.source.synthetic.n_users=300", "data.source.synthetic.n_items=200",
                                 "data.source.synthetic.n_events=20000"]).data.source.synthetic
    events, _, _ = synthetic.generate(spark, gen)
    users = synthetic._users(spark, gen).select("user_id", F.col("z").alias("zu"), "phase")
    items = synthetic._items(spark, gen).select("item_id", F.col("z").alias("zi"), "category")
    clicks = (events.where("label = 1").join(users, "user_id").join(items, "item_id")
              .withColumn("t", F.col("timestamp") + int(shift_days * 86400)))
    rows = taste_at(clicks, gen.seed).select("zu", "zi", "lasting", "drift", "dwell_time").toPandas()
    affinity = np.einsum("nd,nd->n", np.stack(rows["zu"]), np.stack(rows["zi"])) / math.sqrt(gen.latent_dim)
    taste = 0.8 * rows["lasting"].to_numpy() + 0.6 * rows["drift"].to_numpy()
    # etl.synthetic: dwell | click = exp(2.5 + 0.6 taste + 0.3 affinity + 0.5 eps)
    return np.log(rows["dwell_time"].to_numpy()) - 2.5 - 0.6 * taste - 0.3 * affinity


def test_redrawn_taste_and_affinity_explain_the_dwell_as_the_generator_drew_it(spark):
    residual = _clicks_with_redraws(spark)
    assert residual.size > 1000
    assert abs(residual.mean()) < 0.05 and 0.45 < residual.std() < 0.55   # only the dwell's own noise, sd 0.5


def test_the_taste_of_another_period_does_not(spark):
    residual = _clicks_with_redraws(spark, shift_days=synthetic.TASTE_PERIOD_DAYS)
    assert residual.std() > 0.6   # the redrawn part of the wrong period adds its own variance


@pytest.mark.slow
def test_the_ceiling_script_reports_every_ranking_on_a_small_generator(spark, tmp_path):
    import json

    from benchmarks import synthetic_ceiling

    out = tmp_path / "ceiling"
    assert synthetic_ceiling.main([
        "--out", str(out), "--set", f"warehouse.root={tmp_path / 'wh'}", "--set", f"run.output_dir={tmp_path / 'runs'}",
        "--set", "tracking.enabled=false", "--set", "data.source.synthetic.n_users=400",
        "--set", "data.source.synthetic.n_items=300", "--set", "data.source.synthetic.n_events=30000"]) == 0
    rows = json.loads((tmp_path / "ceiling.json").read_text())["rows"]
    assert len(rows) == 5 and all(0 < r["recall@50"] <= 1 for r in rows.values())
    full, click_only = rows["generator: shown x click (taste at test time)"], \
        rows["generator, P(click) alone (exposure left out)"]
    assert full["recall@50"] > click_only["recall@50"]   # who is shown what carries much of the signal


def test_the_ceiling_refuses_data_it_cannot_redraw(capsys):
    from benchmarks import synthetic_ceiling

    assert synthetic_ceiling.main(["--set", "data.source.synthetic.n_users=100000000"]) == 2
    assert "pairs exceed" in capsys.readouterr().err

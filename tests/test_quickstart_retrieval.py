"""The quickstart shows what the project is for (issue 12): on the embedded default, the PFD
student retrieves better than most-popular, and better than the same student trained
without a teacher. The default data and conf, one fixed seed (the job as `make run` runs
it, with tracking off); the margins are below the gains that benchmarks/quickstart_seeds.py
measured over 5 seeds (docs/results.md), so a real regression fails and seed noise does not."""
from __future__ import annotations

import pytest

# benchmarks/quickstart_seeds.py over run.seed 1-5 with the default settings (PFD at lr 1e-3,
# its undistilled DSSM at 3e-3; docs/results.md, section 5.3): test Recall@50 gains over
# most-popular +0.065 on average (min +0.062), over the undistilled student +0.0135 (5 seeds
# of 5, min +0.0093, std 0.0039). SEED is the seed whose gain over the undistilled student
# is nearest that mean (+0.0139 there). This session's Spark (4 shuffle partitions, not the
# job's 8) lays the tables out differently, so the same seed trains on another row order.
# The margins are half the mean gain over most-popular and a fifth of the mean
# distillation gain: the signs the issue asks for, with room for layout noise; a change
# that loses what distillation adds still fails.
SEED = 2
MARGIN_OVER_MOST_POPULAR = 0.03
MARGIN_OVER_UNDISTILLED = 0.002

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart(spark, tmp_path_factory):
    from orchestration import pipeline
    from rec_models.config import load_config

    tmp = tmp_path_factory.mktemp("quickstart")
    cfg = load_config(overrides=[f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}",
                                 f"run.seed={SEED}", "tracking.enabled=false", "train.num_threads=1"])
    return pipeline.run_method(spark, cfg, "pfd")["metrics"]


def test_student_retrieves_better_than_most_popular(quickstart):
    student = quickstart["student_retrieval"]["recall@50"]
    popular = quickstart["retrieval_baselines"]["most_popular"]["recall@50"]
    assert student > popular + MARGIN_OVER_MOST_POPULAR, (student, popular)


def test_distilled_student_retrieves_better_than_undistilled(quickstart):
    distilled = quickstart["student_retrieval"]["recall@50"]
    undistilled = quickstart["baseline_retrieval"]["recall@50"]
    assert distilled > undistilled + MARGIN_OVER_UNDISTILLED, (distilled, undistilled)


def test_teacher_sees_what_the_student_cannot(quickstart):
    # the privileged teacher (watch time, point-in-time statistics) ranks impressions far
    # better than any two-tower student: the gap the distillation draws on
    assert quickstart["teacher"]["auc"] > quickstart["student"]["auc"] + 0.15

"""The quickstart (``make run``: PFD on the synthetic default) over several training seeds:
does the student retrieve better than most-popular, and the distilled student better than
the same student trained without a teacher?

    .venv/bin/python benchmarks/quickstart_seeds.py [--seeds 1,2,3,4,5] [--out results/quickstart_seeds]
        [--set key=value ...]

One feature build (the data is the default's, fixed by its own seed); per ``run.seed``
the whole method as ``jobs/distill_pfd.py`` runs it: the PFD student (its embeddings
written and scored from the tables), the undistilled DSSM (``distill.train_baseline``,
scored by the same retrieval code from its towers), most-popular and ALS. Gains are
paired per seed and tested with ``scipy.stats.ttest_rel`` (two-sided); most-popular does
not depend on the training seed, so its test is the one-sample test of the differences.
The test suite (tests/test_quickstart_retrieval.py) checks the signs on one seed with
margins below the gains measured here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from etl.spark import get_spark
from orchestration import pipeline
from rec_models.config import load_config
from rec_models.state_files import write_bytes_atomic, write_json_atomic

METRIC = "recall@50"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--out", default="results/quickstart_seeds")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    base = load_config(overrides=args.overrides)
    spark = get_spark(base.spark)
    pipeline.ensure_features(spark, base)
    rows, started = [], time.time()
    for seed in seeds:
        cfg = load_config(overrides=[*args.overrides, f"run.seed={seed}", f"run.version=seed{seed}"])
        t0 = time.time()
        out = pipeline.run_method(spark, cfg, "pfd")
        m = out["metrics"]
        refs = m["retrieval_baselines"]
        rows.append({"seed": seed, "wall_seconds": time.time() - t0,
                     "student": m["student_retrieval"][METRIC], "undistilled": m["baseline_retrieval"][METRIC],
                     "most_popular": refs["most_popular"][METRIC], "als": refs["als"][METRIC],
                     "als_train": refs["als_train"][METRIC],
                     "student_auc": m["student"]["auc"], "undistilled_auc": m["baseline"]["auc"],
                     "teacher_auc": m["teacher"]["auc"]})
        logging.warning("seed %d: %s", seed, json.dumps(rows[-1]))
    report = {"metric": METRIC, "seeds": seeds, "rows": rows, "tests": tests(rows),
              "machine": f"{os.cpu_count()} cores", "wall_seconds": time.time() - started}
    text = markdown(report)
    write_json_atomic(args.out + ".json", report)
    write_bytes_atomic(args.out + ".md", text.encode())
    print(text)
    return 0


def tests(rows: list[dict]) -> list[dict]:
    """Paired gains (mean, std, min, seeds won) and two-sided paired t-tests."""
    from scipy.stats import ttest_rel

    out = []
    for a, b in (("student", "most_popular"), ("student", "als_train"), ("student", "als"), ("student", "undistilled"),
                 ("student_auc", "undistilled_auc")):
        x, y = np.array([r[a] for r in rows]), np.array([r[b] for r in rows])
        d = x - y
        out.append({"compare": f"{a} - {b}", "mean": float(d.mean()), "std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
                    "min": float(d.min()), "wins": int((d > 0).sum()), "seeds": int(d.size),
                    "p_value": float(ttest_rel(x, y).pvalue) if d.size > 1 and np.any(d != 0) else float("nan")})
    return out


def markdown(report: dict) -> str:
    lines = [f"Quickstart (PFD, synthetic default) over run.seed {report['seeds']}; {report['metric']} on the "
             f"test clicks; {report['machine']}.", "",
             "| seed | PFD student | undistilled DSSM | most popular | ALS (train) | ALS (train + valid) | student AUC | "
             "undistilled AUC | teacher AUC | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['seed']} | {r['student']:.4f} | {r['undistilled']:.4f} | {r['most_popular']:.4f} | "
                     f"{r.get('als_train', float('nan')):.4f} | {r['als']:.4f} | {r['student_auc']:.4f} | {r['undistilled_auc']:.4f} | {r['teacher_auc']:.4f} | "
                     f"{r['wall_seconds']:.0f} |")
    lines += ["", "| comparison | mean gain | std | min | wins | p (paired t) |", "|---|---|---|---|---|---|"]
    for t in report["tests"]:
        lines.append(f"| {t['compare']} | {t['mean']:+.4f} | {t['std']:.4f} | {t['min']:+.4f} | "
                     f"{t['wins']}/{t['seeds']} | {t['p_value']:.3g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

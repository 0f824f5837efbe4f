"""Train every method on the same data and tabulate them (Markdown + JSON).

    .venv/bin/python benchmarks/compare_methods.py [--dataset synthetic] [--methods dssm,pfd,...]
        [--seeds 1,2,3] [--out results/compare] [--set key=value ...]

One feature build; per seed, the frozen teachers (cross-encoder, ColBERT) trained once and
shared, then each method through the same pipeline as ``jobs/distill.py`` (its embeddings written
to Delta under its own model name, Recall@K / NDCG@K computed from those tables).
Columns: test AUC and LogLoss of the student, Recall@K and NDCG@K from the embedding
tables, training seconds (the method's own epochs; shared teachers excluded), and the
share of the baseline-to-teacher AUC gap closed by a distillation method: (AUC_student - AUC_dssm) /
(AUC_teacher - AUC_dssm), with the method's own teacher (the PFD teacher for PFD, the
cross-encoder for the others).

With ``eval.baselines`` (default true), per seed also the rows of ``orchestration.baselines``:
most_popular (train clicks), als and bpr (``implicit``; settings chosen on valid Recall@50,
refit on train + valid, seeded by run.seed), scored on the same test clicks by the same
retrieval code; AUC/LogLoss do not apply ('-'), "train s" is the refit's seconds.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from orchestration import pipeline
from etl.spark import get_spark
from rec_models.config import load_config
from rec_models.methods import METHODS

BASELINES = ("most_popular", "als", "bpr")   # orchestration.baselines, rows beside the methods
ORDER = ["dssm", "youtube_dnn", "colbert", "inttower", "mvke", "pfd", "kd", "endx", "trmd", "virt",
         "distilled_dual_encoder", "ernie_search"]
SHARED_TEACHERS = ("cross_encoder", "colbert")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset")
    p.add_argument("--methods", default=",".join(ORDER))
    p.add_argument("--seeds", default="42", help="comma-separated run.seed values (model init and shuffling)")
    p.add_argument("--out", default="results/compare_methods")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; known: {sorted(METHODS)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s]
    base = load_config(dataset=args.dataset, overrides=args.overrides)
    spark = get_spark(base.spark)
    pipeline.ensure_features(spark, base)
    started = time.time()
    rows, teacher_auc = [], {}
    for seed in seeds:
        seed_rows, seed_teachers = run_seed(spark, args.dataset, methods, [*args.overrides, f"run.seed={seed}",
                                                                          f"run.version=seed{seed}"])
        rows += [{**r, "seed": seed} for r in seed_rows]
        for name, value in seed_teachers.items():
            teacher_auc.setdefault(name, []).append(value)
    report = {"dataset": base.data.name, "seeds": seeds, "teachers": teacher_auc, "rows": rows,
              "summary": summarise(rows, [*methods, *(b for b in BASELINES if any(r["method"] == b for r in rows))]),
              "machine": f"{os.cpu_count()} cores",
              "backend": base.train.backend, "epochs": base.train.epochs, "wall_seconds": time.time() - started}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(report, fh, indent=2)
    with open(args.out + ".md", "w") as fh:
        fh.write(markdown(report))
    print(markdown(report))
    return 0


def run_seed(spark, dataset, methods: list[str], overrides: list[str]) -> tuple[list[dict], dict[str, float]]:
    """Shared teachers, then every method, all with one run.seed; AUC gains are paired
    with this seed's DSSM."""
    from rec_models.training.loop import teacher_config

    base = load_config(dataset=dataset, overrides=overrides)
    spec = pipeline.load_spec(base)
    run_id = pipeline.new_run_id()
    teachers, teacher_auc = {}, {}
    for name in SHARED_TEACHERS:
        t0 = time.time()
        res = pipeline.train(teacher_config(base, name), spec, name, pipeline.run_dir(base, "teachers", name), run_id)
        teachers[name] = res["checkpoint"]
        head = "teacher" if "teacher_auc" in res["test"] else "student"
        teacher_auc[name] = res["test"][f"{head}_auc"]
        logging.info("teacher %s: AUC %.4f in %.0fs", name, teacher_auc[name], time.time() - t0)
    rows = []
    for m in methods:
        cfg = load_config(dataset=dataset, method=m, overrides=[
            *overrides, f"run.name={m}", "distill.train_baseline=false", "eval.baselines=false",
            *[f"distill.teachers.{t}={path}" for t, path in teachers.items()]])
        out = pipeline.run_method(spark, cfg, m)
        metrics = out["metrics"]
        row = {"method": m, "role": METHODS[m].role, "train_seconds": out["train_seconds"],
               **{f"student_{k}": v for k, v in metrics["student"].items() if k != "rows"},
               **{k: v for k, v in metrics.get("student_retrieval", {}).items() if "@" in k}}
        row["teacher_auc"] = metrics["teacher"]["auc"] if "teacher" in metrics else teacher_auc["cross_encoder"]
        rows.append(row)
    baseline = next((r["student_auc"] for r in rows if r["method"] == "dssm"), None)
    for r in rows:
        if baseline is not None:
            r["auc_gain"] = r["student_auc"] - baseline
            if r["role"] == "distill" and r["teacher_auc"] - baseline > 1e-9:   # a teacher to close on
                r["gap_closed"] = r["auc_gain"] / (r["teacher_auc"] - baseline)
    if base.eval.baselines:   # once per seed, not per method: they do not depend on the method
        from orchestration.baselines import retrieval_baselines

        for name, res in retrieval_baselines(base).items():
            rows.append({"method": name, "role": "reference", "train_seconds": res["fit_seconds"],
                         **{k: v for k, v in res.items() if "@" in k},   # as the methods' rows
                         **({"chosen": res["chosen"], "tune_seconds": res["tune_seconds"]} if "chosen" in res else {})})
    return rows, teacher_auc


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    """Mean and standard deviation over seeds of every numeric column, per method."""
    out = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        keys = [k for k, v in mine[0].items() if isinstance(v, (int, float)) and k != "seed"]
        row = {"method": m, "role": mine[0]["role"], "seeds": len(mine)}
        for k in keys:
            values = np.array([r[k] for r in mine if k in r], dtype=float)
            row[k] = float(values.mean())
            row[f"{k}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
        if "auc_gain" in row:  # measurable: the mean gain exceeds its spread over seeds
            row["gain_exceeds_spread"] = bool(row["auc_gain"] > 0 and row["auc_gain"] > row["auc_gain_std"])
        out.append(row)
    return out


def markdown(report: dict) -> str:
    summary = report["summary"]
    ks = sorted({k for r in summary for k in r if k.startswith(("recall@", "ndcg@")) and not k.endswith("_std")},
                key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    head = ["method", "role", "AUC", "LogLoss", *ks, "AUC gain vs DSSM", "its teacher's AUC", "gap closed",
            "train s"]
    teachers = ", ".join(f"{k} {np.mean(v):.4f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.4f}"
                         for k, v in report["teachers"].items())
    lines = [f"Dataset: {report['dataset']}; seeds {report['seeds']} (mean ± std over seeds); "
             f"{report['epochs']} epochs; {report['machine']}; teachers AUC: {teachers}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(r, k, digits=4):
        return f"{r[k]:.{digits}f} ± {r[k + '_std']:.{digits}f}" if k in r else "-"

    for r in summary:
        gain = cell(r, "auc_gain") + (" *" if r.get("gain_exceeds_spread") else "")
        cells = [r["method"], r["role"], cell(r, "student_auc"), cell(r, "student_logloss"),
                 *[cell(r, k) for k in ks], gain, cell(r, "teacher_auc") if r["role"] == "distill" else "-",
                 cell(r, "gap_closed", 2), f"{r['train_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`*`: the mean AUC gain over DSSM is positive and larger than its standard deviation "
              "over seeds (gains are paired: each seed's method against the same seed's DSSM)."]
    if any(r["role"] == "reference" for r in summary):
        lines += ["", "Role `reference`: no features, no towers (orchestration/baselines.py). most_popular ranks "
                  "items by train clicks; als and bpr (`implicit`) take the setting of best valid Recall@50 "
                  "(train clicks excluded), refit on train + valid; train s is that refit. Same test clicks, "
                  "train/valid clicks excluded, same metric code as the methods."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

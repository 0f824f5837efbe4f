"""Train every method on the same data and tabulate them (Markdown + JSON).

    .venv/bin/python benchmarks/compare_methods.py [--dataset synthetic] [--methods dssm,pfd,...]
        [--out results/compare] [--set key=value ...]

One feature build, the frozen teachers (cross-encoder, ColBERT) trained once and shared,
then each method through the same pipeline as ``jobs/distill.py`` (its embeddings written
to Delta under its own model name, Recall@K / NDCG@K computed from those tables).
Columns: test AUC and LogLoss of the student, Recall@K and NDCG@K from the embedding
tables, training seconds (the method's own epochs; shared teachers excluded), and the
share of the baseline-to-teacher AUC gap closed: (AUC_student - AUC_dssm) /
(AUC_teacher - AUC_dssm), with the method's own teacher (the PFD teacher for PFD, the
cross-encoder for the others).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from etl import pipeline
from etl.spark import get_spark
from rec_models.config import load_config
from rec_models.methods import METHODS

ORDER = ["dssm", "youtube_dnn", "colbert", "inttower", "mvke", "pfd", "endx", "trmd", "virt",
         "distilled_dual_encoder", "ernie_search"]
SHARED_TEACHERS = ("cross_encoder", "colbert")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset")
    p.add_argument("--methods", default=",".join(ORDER))
    p.add_argument("--out", default="results/compare_methods")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; known: {sorted(METHODS)}", file=sys.stderr)
        return 2
    base = load_config(dataset=args.dataset, overrides=args.overrides)
    spark = get_spark(base.spark)
    spec = pipeline.ensure_features(spark, base)
    run_id = pipeline.new_run_id()

    from rec_models.train import teacher_config

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
        overrides = [*args.overrides, f"run.name={m}", "distill.train_baseline=false",
                     *[f"distill.teachers.{t}={path}" for t, path in teachers.items()]]
        cfg = load_config(dataset=args.dataset, method=m, overrides=overrides)
        out = pipeline.run_method(spark, cfg, m)
        metrics = out["metrics"]
        row = {"method": m, "role": METHODS[m].role, "train_seconds": out["train_seconds"],
               **{f"student_{k}": v for k, v in metrics["student"].items() if k != "rows"},
               **{k: v for k, v in metrics.get("student_retrieval", {}).items() if "@" in k}}
        if "teacher" in metrics:
            row["teacher_auc"] = metrics["teacher"]["auc"]
        rows.append(row)
    baseline = next((r["student_auc"] for r in rows if r["method"] == "dssm"), None)
    for r in rows:
        teacher = r.get("teacher_auc", teacher_auc["cross_encoder"])
        if baseline is not None and teacher - baseline > 1e-9:
            r["gap_closed"] = (r["student_auc"] - baseline) / (teacher - baseline)
    report = {"dataset": base.data.name, "teachers": teacher_auc, "rows": rows,
              "machine": f"{os.cpu_count()} cores", "backend": base.train.backend}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(report, fh, indent=2)
    with open(args.out + ".md", "w") as fh:
        fh.write(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    ks = sorted({k for r in report["rows"] for k in r if k.startswith(("recall@", "ndcg@"))},
                key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    head = ["method", "role", "AUC", "LogLoss", *ks, "gap closed", "train s"]
    lines = [f"Dataset: {report['dataset']}; teachers AUC: "
             + ", ".join(f"{k} {v:.4f}" for k, v in report["teachers"].items()), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        gap = f"{r['gap_closed']:.2f}" if "gap_closed" in r else "-"
        cells = [r["method"], r["role"], f"{r['student_auc']:.4f}", f"{r['student_logloss']:.4f}",
                 *[f"{r[k]:.4f}" if k in r else "-" for k in ks], gap, f"{r['train_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

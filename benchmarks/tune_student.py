"""Choose a student's settings on validation only: valid Recall@K of each override set.

    .venv/bin/python benchmarks/tune_student.py --dataset ml100k --method dssm --seeds 1,2 \
        --set data.split.scheme=per_user --set train.epochs=12 \
        --try "" --try "student.objective=mixed" --try "student.objective=mixed;model.embedding_dim=32"

One Spark session and one feature build; per seed and per ``--try`` (``;``-separated
overrides on top of the ``--set`` ones), the method trains through ``pipeline.train`` (its
teachers first, as ``jobs/distill.py`` would) and the selected epoch's valid
Recall@``eval.select_k`` over the catalogue is read from its history. The test metrics a
training computes are never looked at: this is the tool for the choices docs/results.md 5.4
reports. Prints one JSON
line per run, then a Markdown table of the mean over seeds, best first.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from etl.spark import get_spark
from orchestration import pipeline
from orchestration.artifacts import run_dir
from rec_models.config import load_config
from rec_models.state_files import write_bytes_atomic, write_json_atomic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset")
    p.add_argument("--method", default="dssm")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--conf", action="append", default=[], metavar="FILE", help="extra conf file, merged before --set")
    p.add_argument("--set", action="append", default=[], dest="overrides", help="key=value for every run")
    p.add_argument("--try", action="append", default=[], dest="candidates",
                   help="';'-separated key=value overrides of one candidate ('' = the defaults)")
    p.add_argument("--out", default="results/tune_student", help="JSON and Markdown of the runs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    common = [*args.overrides, "tracking.enabled=false", "eval.baselines=false"]
    candidates = [[o for o in c.split(";") if o] for c in (args.candidates or [""])]
    base = load_config(dataset=args.dataset, files=args.conf, overrides=common)
    spark = get_spark(base.spark)
    spec = pipeline.ensure_features(spark, base)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for overrides in candidates:
            # the method's own conf layers (conf/method/<name>.yaml, the dataset's methods.<name>)
            cfg = load_config(dataset=args.dataset, method=args.method, files=args.conf,
                              overrides=[*common, *overrides, f"run.seed={seed}", "run.version=tune"])
            teachers = pipeline.ensure_teachers(cfg, spec, args.method, "tune")
            result = pipeline.train(cfg, spec, args.method, run_dir(cfg, "tune", args.method), "tune",
                                    teachers=teachers)
            key = f"valid_student_recall@{cfg.eval.select_k}"
            curve = [e.get(key) for e in result["history"]]
            best = next(e for e in result["history"] if e["epoch"] == result["selected_epoch"])
            runs.append({"seed": seed, "overrides": overrides, "metric": key, "valid": best[key],
                         "epoch": result["selected_epoch"], "curve": curve})
            print(json.dumps(runs[-1]), flush=True)
    table = markdown(runs, args)
    write_json_atomic(args.out + ".json", runs)
    write_bytes_atomic(args.out + ".md", table.encode())
    print(table)
    return 0


def markdown(runs: list[dict], args) -> str:
    by = {}
    for r in runs:
        by.setdefault(";".join(r["overrides"]) or "(defaults)", []).append(r)
    rows = sorted(by.items(), key=lambda kv: -np.mean([r["valid"] for r in kv[1]]))
    metric = runs[0]["metric"] if runs else "valid"
    lines = [f"{args.method} on {args.dataset or 'synthetic'}, seeds {args.seeds}, common overrides "
             f"{args.overrides}; {metric} at the selected epoch (mean over seeds, best first)", "",
             "| overrides | mean | per seed | selected epochs |", "|---|---|---|---|"]
    for name, rs in rows:
        per_seed = ", ".join(f"{r['valid']:.4f}" for r in rs)
        epochs = ", ".join(str(r["epoch"]) for r in rs)
        lines.append(f"| `{name}` | {np.mean([r['valid'] for r in rs]):.4f} | {per_seed} | {epochs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Train every method on the same data and tabulate them (Markdown + JSON).

    .venv/bin/python benchmarks/compare_methods.py [--dataset synthetic] [--methods dssm,pfd,...]
        [--seeds 1,2,3] [--out results/compare] [--set key=value ...] [--set-for METHOD:key=value ...]

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

With ``--set train.refit=train_valid`` the methods are refit the same way (each at its
selected epoch count, ``orchestration.pipeline.refit_on_valid``): their test columns are
the refit model's, a "train-only recall@50" column keeps the selected model's, and the
1.1x line compares with the refit ALS only. ``--conf FILE`` merges an extra conf file
(e.g. a changed feature list) before the ``--set`` overrides; ``--set-for METHOD:key=value``
overrides one method only (its own validation-chosen setting), after them.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

from orchestration import pipeline
from etl.spark import get_spark
from rec_models.config import load_config
from rec_models.methods import METHODS
from rec_models.state_files import write_bytes_atomic, write_json_atomic

BASELINES = ("most_popular", "als", "als_train", "bpr", "bpr_train")   # orchestration.baselines, rows beside the methods
ORDER = ["dssm", "youtube_dnn", "colbert", "inttower", "mvke", "pfd", "kd", "endx", "trmd_student", "trmd",
         "token_dual_encoder_attn", "virt", "token_dual_encoder", "distilled_dual_encoder", "ernie_search"]
SHARED_TEACHERS = ("cross_encoder", "colbert")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset")
    p.add_argument("--methods", default=",".join(ORDER))
    p.add_argument("--seeds", default="42", help="comma-separated run.seed values (model init and shuffling)")
    p.add_argument("--out", default="results/compare_methods")
    p.add_argument("--conf", action="append", default=[], metavar="FILE", help="extra conf file, merged before --set")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--set-for", action="append", default=[], dest="method_overrides", metavar="METHOD:KEY=VALUE",
                   help="an override of one method only (after --set), e.g. its own validation-chosen setting")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; known: {sorted(METHODS)}", file=sys.stderr)
        return 2
    per_method = {}
    for item in args.method_overrides:
        name, sep, override = item.partition(":")
        if not sep or name not in methods or "=" not in override:
            print(f"error: --set-for '{item}' is not METHOD:key=value with METHOD one of {methods}", file=sys.stderr)
            return 2
        per_method.setdefault(name, []).append(override)
    for name, extra in per_method.items():   # a bad key or value stops the run before any work
        load_config(dataset=args.dataset, method=name, files=args.conf, overrides=[*args.overrides, *extra])
    seeds = [int(s) for s in args.seeds.split(",") if s]
    base = load_config(dataset=args.dataset, files=args.conf, overrides=args.overrides)
    spark = get_spark(base.spark)
    pipeline.ensure_features(spark, base)
    started = time.time()
    rows, teacher_auc = [], {}
    for seed in seeds:
        seed_rows, seed_teachers = run_seed(spark, args.dataset, methods, [*args.overrides, f"run.seed={seed}",
                                                                          f"run.version=seed{seed}"], args.conf,
                                             per_method)
        rows += [{**r, "seed": seed} for r in seed_rows]
        for name, value in seed_teachers.items():
            teacher_auc.setdefault(name, []).append(value)
        # the rows so far, after every seed: a long run stopped midway keeps its finished seeds
        write_json_atomic(args.out + ".partial.json", {"seeds_done": sorted({r["seed"] for r in rows}), "rows": rows,
                                                       "teachers": teacher_auc})
    summary = summarise(rows, [*methods, *(b for b in BASELINES if any(r["method"] == b for r in rows))])
    report = {"dataset": base.data.name, "seeds": seeds, "teachers": teacher_auc, "rows": rows,
              "summary": summary, "paired": paired_tests(rows),
              "against_baselines": against_baselines(summary, refit=base.train.refit == "train_valid"),
              "machine": f"{os.cpu_count()} cores", "select_k": base.eval.select_k, "objective": base.student.objective,
              "backend": base.train.backend, "epochs": base.train.epochs, "refit": base.train.refit,
              "method_overrides": per_method,
              "wall_seconds": time.time() - started}
    text = markdown(report)
    write_json_atomic(args.out + ".json", report)
    write_bytes_atomic(args.out + ".md", text.encode())
    print(text)
    return 0


def objective_of(method: str, cfg) -> str:
    """What trained the method's towers: student.objective for the DSSM students that
    follow it (``rec_models.objectives``), the method's own loss otherwise."""
    follows = {n for n, m in METHODS.items() if m.undistilled} | {m.undistilled for m in METHODS.values() if m.undistilled}
    return cfg.student.objective if method in follows else ("sampled_softmax" if method == "youtube_dnn" else "own")


def run_seed(spark, dataset, methods: list[str], overrides: list[str], files: tuple[str, ...] = (),
             per_method: dict[str, list[str]] | None = None) -> tuple[list[dict], dict[str, float]]:
    """Shared teachers, then every method, all with one run.seed (gains are paired per seed
    with the method's undistilled student in ``paired_tests``); ``per_method``: overrides of
    one method only, after the shared ones."""
    from rec_models.training.loop import teacher_config

    base = load_config(dataset=dataset, files=files, overrides=overrides)
    spec = pipeline.load_spec(base)
    run_id = pipeline.new_run_id()
    teachers, teacher_auc = {}, {}
    needed = {t for m in methods for t in METHODS[m].teachers}
    for name in (t for t in SHARED_TEACHERS if t in needed):   # only the teachers the methods use
        t0 = time.time()
        # the teacher's own conf layers, not the default method's (a dataset's methods.pfd section)
        own = load_config(dataset=dataset, method=name, files=files, overrides=overrides)
        res = pipeline.train(teacher_config(own, name), spec, name, pipeline.run_dir(base, "teachers", name), run_id)
        teachers[name] = res["checkpoint"]
        head = "teacher" if "teacher_auc" in res["test"] else "student"
        teacher_auc[name] = res["test"][f"{head}_auc"]
        logging.info("teacher %s: AUC %.4f in %.0fs", name, teacher_auc[name], time.time() - t0)
    rows = []
    for m in methods:
        cfg = load_config(dataset=dataset, method=m, files=files, overrides=[
            *overrides, *(per_method or {}).get(m, ()), f"run.name={m}", "distill.train_baseline=false",
            "eval.baselines=false",
            *[f"distill.teachers.{t}={path}" for t, path in teachers.items()]])
        out = pipeline.run_method(spark, cfg, m)
        metrics = out["metrics"]
        row = {"method": m, "role": METHODS[m].role, "train_seconds": out["train_seconds"],
               "selected_epoch": out["selected_epoch"], "objective_name": objective_of(m, cfg),
               **{f"valid_{k}": v for k, v in out["valid"].items() if k in ("student_recall@50", "student_auc")},
               **{f"student_{k}": v for k, v in metrics["student"].items() if k != "rows"},
               **{k: v for k, v in metrics.get("student_retrieval", {}).items() if "@" in k}}
        if "refit" in out and "student_retrieval" in metrics:   # train.refit=train_valid: the train-only model too
            from orchestration.evaluation import retrieval_of_checkpoint

            row["train_only_recall@50"] = retrieval_of_checkpoint(cfg, out["refit"]["selection_checkpoint"])["recall@50"]
        if METHODS[m].role == "distill":
            row["teacher_auc"] = metrics["teacher"]["auc"] if "teacher" in metrics else teacher_auc.get("cross_encoder")
        rows.append(row)
    if base.eval.baselines:   # once per seed, not per method: they do not depend on the method
        from orchestration.baselines import retrieval_baselines

        for name, res in retrieval_baselines(base).items():
            rows.append({"method": name, "role": "reference", "train_seconds": res["fit_seconds"],
                         **{k: v for k, v in res.items() if "@" in k},   # as the methods' rows
                         **{k: res[k] for k in ("chosen", "tune_seconds") if k in res}})
    return rows, teacher_auc


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    """Mean and standard deviation over seeds of every numeric column, per method: the
    columns are the union over all seeds' rows (a column one seed lacks is averaged over
    the seeds that have it, and ``<col>_n`` says how many)."""
    out = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        keys = list(dict.fromkeys(k for r in mine for k, v in r.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"))
        row = {"method": m, "role": mine[0]["role"], "seeds": len(mine),
               **({"objective_name": mine[0]["objective_name"]} if "objective_name" in mine[0] else {})}
        for k in keys:
            values = np.array([r[k] for r in mine if k in r], dtype=float)
            row[k] = float(values.mean())
            row[f"{k}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
            if values.size != len(mine):
                row[f"{k}_n"] = int(values.size)
        out.append(row)
    return out


PAIRED_METRICS = ("recall@50", "ndcg@50", "recall@10", "student_auc")


def paired_tests(rows: list[dict], metrics: tuple[str, ...] = PAIRED_METRICS) -> list[dict]:
    """Each distillation method against its undistilled student (``Method.undistilled``,
    same architecture and objective), paired per seed: mean gain, seeds won, and the paired
    t-test (``scipy.stats.ttest_rel``, two-sided). A seed missing either row is left out of
    that pair, and the count says so. For AUC also the share of the teacher's gap closed,
    as the ratio of mean gains: mean(s - base) / mean(teacher - base)."""
    from scipy.stats import ttest_rel

    by = {(r["method"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        base = METHODS[m].undistilled if m in METHODS else ""
        if not base:
            continue
        for metric in metrics:
            pairs = [(by[(m, s)][metric], by[(base, s)][metric], by[(m, s)].get("teacher_auc"))
                     for s in seeds if (m, s) in by and (base, s) in by
                     and metric in by[(m, s)] and metric in by[(base, s)]]
            if not pairs:
                continue
            a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
            test = {"method": m, "undistilled": base, "metric": metric, "seeds": len(pairs),
                    "mean": float(a.mean()), "undistilled_mean": float(b.mean()), "gain": float((a - b).mean()),
                    "wins": int((a > b).sum()),
                    "p_value": float(ttest_rel(a, b).pvalue) if len(pairs) > 1 and np.any(a != b) else float("nan")}
            if metric == "student_auc" and all(p[2] is not None for p in pairs):
                gap = float(np.mean([p[2] for p in pairs]) - b.mean())
                test["gap_closed"] = test["gain"] / gap if gap > 1e-9 else float("nan")
            out.append(test)
    return out


def against_baselines(summary: list[dict], metric: str = "recall@50", refit: bool = False) -> dict:
    """The best student's mean ``metric`` over the better of most-popular and ALS (the issue's
    1.1x goal), twice: against ALS fit on the students' own training clicks (``als_train``)
    and against ALS refit on train + valid (``als``), with the rows each compares. Students
    refit on train + valid themselves (``refit``) are compared with the refit ALS only."""
    students = [r for r in summary if r["role"] != "reference" and metric in r]
    if not students:
        return {}
    best = max(students, key=lambda r: r[metric])
    out = {}
    pairs = (("same_data", ("most_popular", "als_train")), ("refit", ("most_popular", "als")))
    for name, refs_of in pairs[1:] if refit else pairs:
        refs = {r["method"]: r[metric] for r in summary if r["method"] in refs_of and metric in r}
        if refs:
            ref = max(refs, key=refs.get)
            out[name] = {"metric": metric, "best_student": best["method"], "best_student_value": best[metric],
                         "reference": ref, "reference_value": refs[ref], "ratio": best[metric] / refs[ref]}
    return out


def markdown(report: dict) -> str:
    summary = report["summary"]
    ks = sorted({k for r in summary for k in r if k.startswith(("recall@", "ndcg@")) and not k.endswith(("_std", "_n"))},
                key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    refit = report.get("refit") == "train_valid"
    head = ["method", "role", "objective", *ks, "AUC", "LogLoss", "valid Recall@50",
            *(["train-only recall@50"] if refit else []), "epoch", "train s"]
    teachers = ", ".join(f"{k} {np.mean(v):.4f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.4f}"
                         for k, v in report["teachers"].items())
    lines = [f"Dataset: {report['dataset']}; seeds {report['seeds']} (mean ± std over seeds); up to "
             f"{report['epochs']} epochs, each model at its best validation epoch (students: valid "
             f"Recall@{report.get('select_k', 50)} over the catalogue; teachers: valid AUC)"
             f"{', then refit on train + valid for that many epochs (train.refit=train_valid)' if refit else ''}; "
             + "".join(f"{m} also with {', '.join(o)}; " for m, o in report.get("method_overrides", {}).items())
             + f"{report['machine']}; "
             f"teachers' test AUC: {teachers}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(r, k, digits=4):
        if k not in r:
            return "-"
        n = f" (n={r[k + '_n']})" if k + "_n" in r else ""
        return f"{r[k]:.{digits}f} ± {r[k + '_std']:.{digits}f}{n}"

    for r in summary:
        cells = [r["method"], r["role"], r.get("objective_name", "-") if r["role"] != "reference" else "-",
                 *[cell(r, k) for k in ks], cell(r, "student_auc"), cell(r, "student_logloss"),
                 cell(r, "valid_student_recall@50"), *([cell(r, "train_only_recall@50")] if refit else []),
                 cell(r, "selected_epoch", 1), f"{r['train_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Role `reference`: no features, no towers (orchestration/baselines.py). most_popular ranks "
              "items by train clicks; als and bpr (`implicit`) take the setting of best valid Recall@50 "
              "(train clicks excluded), refit on train + valid; train s is that refit; als_train and "
              "bpr_train are that setting fit on train only, the clicks the students train on (train s: "
              "one grid fit on average). Same test clicks, "
              "train/valid clicks excluded, same metric code as the methods. AUC/LogLoss: the student's "
              "calibrated score on the test impressions. train s: the method's own epochs (teachers apart)."]
    if refit:
        lines += ["", "Refit: each method's test columns are those of the model trained again on train + valid "
                  "for its selected epochs; train-only recall@50 is the selected model before that refit (the "
                  "figure to read beside als_train); train s counts both trainings."]
    if report.get("paired"):
        lines += ["", "Distillation against the same student trained without a teacher (paired per seed; "
                  "p: two-sided paired t-test, scipy.stats.ttest_rel):", "",
                  "| method | undistilled | metric | seeds | distilled | undistilled | gain | wins | p | gap closed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t in report["paired"]:
            gap = f"{t['gap_closed']:.2f}" if "gap_closed" in t else "-"
            lines.append(f"| {t['method']} | {t['undistilled']} | {t['metric']} | {t['seeds']} | {t['mean']:.4f} | "
                         f"{t['undistilled_mean']:.4f} | {t['gain']:+.4f} | {t['wins']}/{t['seeds']} | "
                         f"{t['p_value']:.3g} | {gap} |")
    for name, said in (("same_data", "fit on the same training clicks"), ("refit", "refit on train + valid")):
        a = (report.get("against_baselines") or {}).get(name)
        if a:
            lines += ["", f"Best student {a['best_student']} {a['metric']} {a['best_student_value']:.4f} = "
                      f"{a['ratio']:.2f}x the better reference {said} ({a['reference']} {a['reference_value']:.4f})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""The IntTower paper's MovieLens protocol (Li et al., "IntTower: the Next Generation of
Two-Tower Model for Pre-Ranking System", CIKM 2022, Table 2) on MovieLens 100K.

    .venv/bin/python benchmarks/inttower_protocol.py [--seeds 1,2,3,4,5]
        [--models dssm,inttower,dcn,cross_encoder] [--variants leaky,leak_free]
        [--out results/inttower_protocol] [--work runs/inttower_protocol] [--set key=value ...]

One SparkSession: the events are read, labelled and the entity tables encoded once; each
(seed, variant) is prepared once by ``etl/inttower_protocol.py`` (the seed draws the random
split and seeds training) and every model trains on it through ``orchestration.pipeline.train``
(conf: ``conf/dataset/ml100k_inttower.yaml`` + ``conf/method/<model>.yaml`` + ``--set``).
Writes ``<out>.md`` / ``<out>.json``: per model and variant the mean +- sample std and
min / max over the seeds of test AUC and LogLoss beside the paper's figures, the paper's
orderings checked against the measured numbers (paired over seeds: every model of a seed
sees the same split), wall time per model and the machine.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import platform
import sys
import time

import numpy as np

from orchestration import pipeline
from etl.inttower_protocol import VARIANTS, load_inputs, prepare
from etl.spark import get_spark
from rec_models.config import load_config
from rec_models.methods import METHODS
from rec_models.state_files import write_bytes_atomic, write_json_atomic

CITATION = ("X. Li, B. Chen, H. Guo, J. Li, C. Zhu, X. Long, S. Li, Y. Wang, W. Guo, L. Mao, J. Liu, "
            "Z. Dong, R. Tang. IntTower: the Next Generation of Two-Tower Model for Pre-Ranking System. "
            "CIKM 2022, Table 2 (MovieLens-1M)")
# The paper's Table 2, MovieLens-1M: model -> (AUC, LogLoss). The only constants here.
PAPER = {"Two-Tower": (0.8697, 0.4559), "DeepFM": (0.8920, 0.3211), "DCN": (0.8964, 0.3151),
         "AutoInt": (0.8948, 0.3192), "IntTower": (0.8974, 0.3128)}
COUNTERPART = {"dssm": "Two-Tower", "inttower": "IntTower", "dcn": "DCN", "cross_encoder": "AutoInt"}
DEFAULT_MODELS = ("dssm", "inttower", "dcn", "cross_encoder")
# one torch thread: two OpenMP threads on a shared 2-core box wait on each other (bench_training.py)
DEFAULT_OVERRIDES = ("train.num_threads=1",)
T_CRIT_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml100k_inttower")
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="results/inttower_protocol")
    p.add_argument("--work", default="runs/inttower_protocol", help="warehouses and checkpoints")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    bad = [m for m in models if m not in METHODS] + [v for v in variants if v not in VARIANTS]
    if bad or not seeds or not models or not variants:
        print(f"error: unknown model(s) / variant(s) {bad} (models: {sorted(METHODS)}; variants: {VARIANTS}), "
              "or an empty list", file=sys.stderr)
        return 2
    work = os.path.abspath(args.work)
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]

    def conf(seed: int, variant: str, method=None):
        extra = [f"warehouse.root={work}/data/seed{seed}_{variant}", f"run.seed={seed}",
                 f"run.output_dir={work}/runs", f"run.version=seed{seed}_{variant}"]
        if method:
            extra.append(f"run.name={method}")
        return load_config(dataset=args.dataset, method=method, overrides=[*overrides, *extra])

    started, load_before = time.time(), os.getloadavg()
    base = conf(seeds[0], variants[0])
    spark = get_spark(base.spark)
    t0 = time.perf_counter()
    inputs = load_inputs(spark, base)
    read_seconds = time.perf_counter() - t0
    runs, data = [], []
    for seed, variant in itertools.product(seeds, variants):
        prepared = prepare(conf(seed, variant), inputs, seed, variant)
        data.append({"seed": seed, "variant": variant, "rows": prepared.counts,
                     "positive_rate": prepared.positive_rate, "seconds": prepared.seconds,
                     "paper_merge_would_drop": prepared.paper_merge_would_drop})
        for model in models:
            cfg = conf(seed, variant, model)
            t0 = time.perf_counter()
            res = pipeline.train(cfg, prepared.spec, model, pipeline.run_dir(cfg), pipeline.new_run_id())
            wall = time.perf_counter() - t0
            head = next(h for h in ("student", "teacher") if f"{h}_auc" in res["test"])
            runs.append({"model": model, "variant": variant, "seed": seed, "head": head,
                         "auc": res["test"][f"{head}_auc"], "logloss": res["test"][f"{head}_logloss"],
                         "valid_auc": res["history"][-1].get(f"valid_{head}_auc"),
                         "epochs": len(res["history"]), "steps": res["steps"],
                         "train_seconds": res["train_seconds"], "wall_seconds": wall,
                         "test_rows": res["test"]["rows"]})
            logging.info("%s seed %d %s: AUC %.4f LogLoss %.4f (%.0fs)", model, seed, variant,
                         runs[-1]["auc"], runs[-1]["logloss"], wall)
    inputs.unpersist()

    import torch

    report = {
        "citation": CITATION, "paper": PAPER, "counterpart": {m: COUNTERPART.get(m) for m in models},
        "dataset": base.data.name, "seeds": seeds, "models": models, "variants": variants,
        "protocol": {"label": base.data.source.label_from.model_dump(),
                     "split": base.data.split.model_dump(), "rows_after_dropping": inputs.num_rows,
                     "features": [f"{f.name} ({f.role.value})" for f in base.spec.input_features()]},
        "train": base.train.model_dump(), "model": base.model.model_dump(), "overrides": overrides,
        "method_params": {m: conf(seeds[0], variants[0], m).distill.params for m in models},
        "runs": runs, "data": data, "read_seconds": read_seconds,
        "summary": summarise(runs, models, variants),
        "orderings": orderings(runs, models, variants),
        "time_per_model": time_per_model(runs, models, data),
        "machine": {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                    "torch_threads": base.train.num_threads or torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "load_avg_before": load_before,
                    "load_avg_after": os.getloadavg()},
        "wall_seconds": time.time() - started,
    }
    text = markdown(report)
    write_json_atomic(args.out + ".json", report)
    write_bytes_atomic(args.out + ".md", text.encode())
    print(text)
    return 0


def _values(runs, model, variant, key) -> np.ndarray:
    """``key`` of (model, variant) ordered by seed (so two arrays pair up seed by seed)."""
    return np.array([r[key] for r in sorted(runs, key=lambda r: r["seed"])
                     if r["model"] == model and r["variant"] == variant], dtype=float)


def _stats(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "n": int(x.size)}


def summarise(runs, models, variants) -> list[dict]:
    out = []
    for m, v in itertools.product(models, variants):
        paper = PAPER.get(COUNTERPART.get(m, ""), (None, None))
        out.append({"model": m, "variant": v, "paper_name": COUNTERPART.get(m),
                    "auc": _stats(_values(runs, m, v, "auc")), "logloss": _stats(_values(runs, m, v, "logloss")),
                    "paper_auc": paper[0], "paper_logloss": paper[1]})
    return out


def _paired(better: np.ndarray, worse: np.ndarray, higher_is_better: bool) -> dict:
    """Does ``better`` beat ``worse``: mean paired difference (in the "better" direction),
    its sample std, seeds where it holds, and a two-sided paired t-test at 5%."""
    d = (better - worse) if higher_is_better else (worse - better)
    n = d.size
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    t = float(d.mean() / (sd / np.sqrt(n))) if n > 1 and sd > 0 else float("inf") * np.sign(d.mean())
    return {"holds": bool(d.mean() > 0), "diff_mean": float(d.mean()), "diff_std": sd,
            "seeds_holding": int((d > 0).sum()), "seeds": int(n), "t": t,
            "significant": bool(n > 1 and abs(t) > T_CRIT_95.get(n - 1, 1.96))}


def orderings(runs, models, variants) -> list[dict]:
    """Every pairwise ordering of the paper's Table 2 among the models run (AUC higher,
    LogLoss lower), then leaky > leak-free per model; each checked on the measured runs."""
    out = []
    ran = [m for m in models if m in COUNTERPART]
    for a, b in itertools.combinations(ran, 2):
        pa, pb = PAPER[COUNTERPART[a]], PAPER[COUNTERPART[b]]
        for metric, i, higher in (("auc", 0, True), ("logloss", 1, False)):
            if pa[i] == pb[i]:
                continue
            win, lose = (a, b) if (pa[i] > pb[i]) == higher else (b, a)
            pw, pl = PAPER[COUNTERPART[win]][i], PAPER[COUNTERPART[lose]][i]
            for v in variants:
                out.append({"kind": "paper", "metric": metric, "better": win, "worse": lose, "variant": v,
                            "paper": [pw, pl], **_paired(_values(runs, win, v, metric),
                                                         _values(runs, lose, v, metric), higher)})
    if {"leaky", "leak_free"} <= set(variants):
        for m in models:
            for metric, higher in (("auc", True), ("logloss", False)):
                out.append({"kind": "leak", "metric": metric, "better": m, "worse": m, "variant": "leaky>leak_free",
                            **_paired(_values(runs, m, "leaky", metric), _values(runs, m, "leak_free", metric), higher)})
    return out


def time_per_model(runs, models, data) -> dict:
    return {m: {"runs": sum(1 for r in runs if r["model"] == m),
                "wall_seconds_total": float(sum(r["wall_seconds"] for r in runs if r["model"] == m)),
                "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in runs if r["model"] == m])),
                "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs if r["model"] == m]))}
            for m in models} | {"data_prep": {"runs": len(data),
                                              "wall_seconds_total": float(sum(d["seconds"] for d in data)),
                                              "wall_seconds_mean": float(np.mean([d["seconds"] for d in data]))}}


def _pm(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def _ordering_line(o: dict) -> str:
    metric = "AUC" if o["metric"] == "auc" else "LogLoss"
    verdict = "holds" if o["holds"] else "does not hold"
    sig = "significant" if o["significant"] else "not significant"
    return (f"{verdict} ({o['diff_mean']:+.4f} ± {o['diff_std']:.4f} {metric} in the paper's direction, "
            f"{o['seeds_holding']}/{o['seeds']} seeds, paired t {sig} at 5%)")


def verdicts(orders: list[dict], variants: list[str]) -> list[str]:
    """A few lines: which of the paper's orderings hold per variant (* = paired t significant)."""
    short = lambda m: COUNTERPART.get(m, m)  # noqa: E731
    star = lambda o: "*" if o["significant"] else ""  # noqa: E731
    out = []
    for metric, rel in (("auc", ">"), ("logloss", "<")):
        label = "AUC" if metric == "auc" else "LogLoss"
        for v in variants:
            these = [o for o in orders if o["kind"] == "paper" and o["metric"] == metric and o["variant"] == v]
            if not these:
                continue
            held = [f"{short(o['better'])} {rel} {short(o['worse'])}{star(o)}" for o in these if o["holds"]]
            failed = [f"{short(o['better'])} {rel} {short(o['worse'])}{star(o)}" for o in these if not o["holds"]]
            out.append(f"- {label}, {v}: {len(held)}/{len(these)} of the paper's orderings hold"
                       + (f": {', '.join(held)}" if held else "")
                       + (f"; reversed: {', '.join(failed)}" if failed else "") + ".")
        leak = [o for o in orders if o["kind"] == "leak" and o["metric"] == metric]
        if leak:
            held = [f"{short(o['better'])}{star(o)}" for o in leak if o["holds"]]
            out.append(f"- {label}, leaky {rel} leak-free (the leak's effect, not a claim of the paper): "
                       f"{len(held)}/{len(leak)} models"
                       + (f" ({', '.join(held)})" if held else "") + ".")
    return out + ["", "(* the paired t-test over seeds is significant at 5%.)"]


def markdown(r: dict) -> str:
    name = lambda m: f"{m} ({COUNTERPART[m]})" if m in COUNTERPART else m  # noqa: E731
    tr, mo = r["train"], r["model"]
    lab, split = r["protocol"]["label"], r["protocol"]["split"]
    lines = [
        f"# IntTower paper protocol on MovieLens 100K ({r['dataset']})", "",
        f"Paper figures: {r['citation']}. The paper ran MovieLens-1M; these runs are MovieLens 100K.", "",
        f"Protocol: ratings {lab['drop_values']} dropped, label rating >= {lab['positive_min']:g}"
        f"{' (the paper: rating > 3 on whole stars)' if lab['positive_min'] == 4 else ''}; "
        f"{r['protocol']['rows_after_dropping']} rows; random split per seed: test {split['test_fraction']:g}, "
        f"valid {split['valid_fraction']:g}, train the rest; features {', '.join(r['protocol']['features'])}; "
        "mean ratings = mean label per user / item: `leaky` over each row's own paper split (train+valid, "
        "or test: the paper), `leak_free` over the train split only (global train mean when unseen).", "",
        f"Training: {tr['epochs']} epochs, batch {tr['batch_size']}, Adam lr {tr['lr']:g}, embedding "
        f"{mo['embedding_dim']}, towers {mo['tower_dims']} -> {mo['output_dim']}, ranker MLP {mo['teacher_dims']}, "
        f"dropout {mo['dropout']:g}; the last epoch's model is scored on the test split. "
        f"Seeds {r['seeds']} (split and training). Std: sample std over seeds.", "",
        "| model (paper's) | variant | AUC mean ± std | AUC min / max | LogLoss mean ± std | LogLoss min / max "
        "| paper AUC | paper LogLoss |",
        "|---|---|---|---|---|---|---|---|"]
    for s in r["summary"]:
        pa = f"{s['paper_auc']:.4f}" if s["paper_auc"] is not None else "-"
        pl = f"{s['paper_logloss']:.4f}" if s["paper_logloss"] is not None else "-"
        lines.append(f"| {name(s['model'])} | {s['variant']} | {_pm(s['auc'])} | {s['auc']['min']:.4f} / "
                     f"{s['auc']['max']:.4f} | {_pm(s['logloss'])} | {s['logloss']['min']:.4f} / "
                     f"{s['logloss']['max']:.4f} | {pa} | {pl} |")
    for paper_name, (a, ll) in PAPER.items():
        if paper_name not in r["counterpart"].values():
            lines.append(f"| (not run: {paper_name}) | - | - | - | - | - | {a:.4f} | {ll:.4f} |")
    lines += ["", "## The paper's orderings on this data", "", *verdicts(r["orderings"], r["variants"]), "",
              "In detail, from the runs above: the mean paired difference over seeds (same split per seed) "
              "in the direction the paper reports, the seeds where it holds, and a two-sided paired t-test.", ""]
    for o in r["orderings"]:
        metric = "AUC" if o["metric"] == "auc" else "LogLoss"
        if o["kind"] == "paper":
            rel = ">" if o["metric"] == "auc" else "<"
            lines.append(f"- {metric}: {name(o['better'])} {rel} {name(o['worse'])} (paper {o['paper'][0]:.4f} "
                         f"vs {o['paper'][1]:.4f}), {o['variant']}: {_ordering_line(o)}")
        else:
            rel = ">" if o["metric"] == "auc" else "<"
            lines.append(f"- {metric}: leaky {rel} leak-free for {name(o['better'])}: {_ordering_line(o)}")
    lines += ["", "## Time and machine", "", "| step | runs | wall s total | wall s / run | train s / run |",
              "|---|---|---|---|---|"]
    for m, t in r["time_per_model"].items():
        ts = f"{t['train_seconds_mean']:.1f}" if "train_seconds_mean" in t else "-"
        lines.append(f"| {m} | {t['runs']} | {t['wall_seconds_total']:.0f} | {t['wall_seconds_mean']:.1f} | {ts} |")
    mc = r["machine"]
    lines += ["", f"Reading and encoding the inputs once: {r['read_seconds']:.0f} s. Whole run: "
              f"{r['wall_seconds'] / 60:.1f} min on {mc['cpus_usable']} usable of {mc['cpus']} CPU cores, "
              f"{mc['torch_threads']} torch thread(s), torch {mc['torch']}, Python {mc['python']}, {mc['platform']}; "
              f"load average before {mc['load_avg_before'][0]:.1f}, after {mc['load_avg_after'][0]:.1f} "
              "(the machine is shared: wall times include other users' load).", ""]
    lines.append("Rows the paper's inner merge would have dropped (a user's rows in a split where the user has "
                 "no positive; the same for both variants), kept here: "
                 + "; ".join(f"seed {d['seed']}: {d['paper_merge_would_drop']}" for d in r["data"]
                             if d["variant"] == r["variants"][0]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

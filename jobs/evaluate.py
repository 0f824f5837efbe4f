"""spark-submit jobs/evaluate.py [--method NAME] [--checkpoint PATH] [--set run.name=.. --set run.version=..]

Evaluates a trained model (runs/<name>/<version>/<method>/checkpoints/last.pt, or
--checkpoint) and its embedding tables: AUC, LogLoss and GAUC of every head on the test
split; Recall@K, NDCG@K and coverage@K (K from eval.k) by exact top-K over all items,
items the user clicked in train/valid excluded. Appends to the Delta metrics table
(a rerun replaces its own rows), writes runs/<name>/<version>/evaluation.json and a
Markdown + PNG report comparing every evaluated model under runs/<name>/<version>/report/.
"""
import sys

from jobs._common import run


def options(p):
    p.add_argument("--checkpoint", help="checkpoint to evaluate (default: the last of run.name/run.version "
                                        "for the method)")


def body(args, cfg):
    from orchestration import evaluation

    # Spark starts inside, once the inputs are known to exist: a wrong one fails in seconds
    return {"job": "evaluate", **evaluation.evaluate_model(cfg, args.checkpoint)}


if __name__ == "__main__":
    sys.exit(run(__doc__, body, options))

"""spark-submit jobs/distill.py --method <name> [--set key=value ...]

Any method of rec_models.methods (baselines, interaction models, distillation methods):
builds the feature tables if missing, trains (or loads, from distill.teachers.<name>) the
frozen teachers the method needs, trains the method and, for a distillation method, the
DSSM baseline; exports the student, writes its embeddings (with their score kind) to
Delta, and prints one JSON line with the metrics.
"""
import sys

from jobs._common import run, spark_for


def body(args, cfg):
    from orchestration import pipeline

    pipeline.validate_params(cfg, cfg.distill.method)   # before Spark starts
    return {"job": "distill", **pipeline.run_method(spark_for(cfg), cfg, cfg.distill.method)}


if __name__ == "__main__":
    sys.exit(run(__doc__, body))

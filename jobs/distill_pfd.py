"""spark-submit jobs/distill_pfd.py [--set key=value ...]

The PFD pipeline end to end: builds the feature tables if they are missing, trains the
teacher and the student jointly (or distils from a frozen teacher checkpoint given in
distill.teacher_checkpoint), trains the no-distillation baseline, exports the student,
writes user and item embeddings to Delta and prints one JSON line with the metrics
(AUC / LogLoss on the test split; Recall@K and NDCG@K from the embedding tables).
"""
import sys

from jobs._common import run, spark_for


def body(args, cfg):
    from orchestration import pipeline

    pipeline.validate_params(cfg, "pfd")   # before Spark starts
    return {"job": "distill_pfd", **pipeline.run_method(spark_for(cfg), cfg, "pfd")}


if __name__ == "__main__":
    sys.exit(run(__doc__, body))

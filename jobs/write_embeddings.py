"""spark-submit jobs/write_embeddings.py [--bundle runs/<name>/<version>/student.pt]

Runs the exported student towers over user_features and item_features and writes
user_embeddings and item_embeddings (Delta), replacing this model version's rows.
"""
import os
import sys

from jobs._common import run, spark_for


def options(p):
    p.add_argument("--bundle", help="student bundle (default: the one distill_pfd exported for run.name/version)")
    p.add_argument("--run-id", help="run id recorded with the vectors (default: from the bundle)")


def body(args, cfg):
    from orchestration import pipeline
    from orchestration.artifacts import ModelTag
    from rec_models.serving.export import load_student

    bundle = args.bundle or pipeline.run_dir(cfg, "student.pt")
    if not os.path.exists(bundle):
        raise FileNotFoundError(f"no student bundle at {bundle}: run jobs/distill_pfd.py first or pass --bundle")
    meta = load_student(bundle)[2]
    tag = ModelTag(cfg.run.name, cfg.run.version, args.run_id or meta.get("run_id") or pipeline.new_run_id())
    tables = pipeline.write_embeddings(spark_for(cfg), cfg, bundle, tag)
    return {"job": "write_embeddings", "run_id": tag.run_id, "tables": tables,
            "metrics": {"student_retrieval": pipeline.retrieval_metrics(cfg, tag)}}


if __name__ == "__main__":
    sys.exit(run(__doc__, body, options))

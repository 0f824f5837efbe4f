"""spark-submit jobs/write_embeddings.py [--bundle runs/<name>/<version>/student.pt]

Runs the exported student towers over user_features and item_features and writes
user_embeddings and item_embeddings (Delta), replacing this model version's rows.
"""
import os
import pickle
import sys

from jobs._common import run, spark_for
from rec_models.config import BadInputError, InputNotFoundError


def options(p):
    p.add_argument("--bundle", help="student bundle (default: the one distill_pfd exported for run.name/version)")
    p.add_argument("--run-id", help="run id recorded with the vectors (default: from the bundle)")


def body(args, cfg):
    from orchestration import pipeline
    from orchestration.artifacts import ModelTag
    from rec_models.serving.export import load_student

    bundle = args.bundle or pipeline.run_dir(cfg, "student.pt")
    if not os.path.exists(bundle):
        raise InputNotFoundError(f"no student bundle at {bundle}: run jobs/distill_pfd.py first or pass --bundle")
    try:
        student, bundle_spec, meta = load_student(bundle)
    except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError) as exc:
        raise BadInputError(f"cannot load the student bundle {bundle}: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}") from None
    # every input read and checked before the first write: the bundle, the warehouse's spec
    # (the retrieval metrics read it after the writes) and the feature tables
    pipeline.check_embedding_inputs(cfg, bundle_spec, student, bundle)
    tag = ModelTag(cfg.run.name, cfg.run.version, args.run_id or meta.get("run_id") or pipeline.new_run_id())
    tables = pipeline.write_embeddings(spark_for(cfg), cfg, bundle, tag)
    return {"job": "write_embeddings", "run_id": tag.run_id, "tables": tables,
            "metrics": {"student_retrieval": pipeline.retrieval_metrics(cfg, tag)}}


if __name__ == "__main__":
    sys.exit(run(__doc__, body, options))

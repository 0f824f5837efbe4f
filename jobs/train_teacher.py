"""spark-submit jobs/train_teacher.py [--set train.backend=torch_distributor ...]

Trains the PFD ranking teacher (public + privileged features) alone, from the feature
tables build_features wrote; its checkpoint can then be distilled with a frozen teacher:
``jobs/distill_pfd.py --set distill.teacher_checkpoint=<printed checkpoint>``.
"""
import sys

from jobs._common import run, spark_for


def body(args, cfg):
    from etl import pipeline

    spec = pipeline.ensure_features(spark_for(cfg), cfg)
    run_id = pipeline.new_run_id()
    result = pipeline.train(cfg, spec, "teacher", pipeline.run_dir(cfg, "teacher"), run_id)
    return {"job": "train_teacher", "run_id": run_id, "checkpoint": result["checkpoint"],
            "metrics": {"teacher": pipeline.head_metrics(result["test"], "teacher")}, "train_seconds": result["train_seconds"]}


if __name__ == "__main__":
    sys.exit(run(__doc__, body))

"""spark-submit jobs/train_teacher.py [--teacher pfd_teacher|cross_encoder|colbert] [--set ...]

Trains a teacher alone from the feature tables build_features wrote (default: the PFD
ranking teacher on public + privileged features). Its checkpoint can then be distilled
with the teacher frozen: ``jobs/distill_pfd.py --set distill.teacher_checkpoint=<ckpt>``,
or ``jobs/distill.py --method trmd --set distill.teachers.cross_encoder=<ckpt>``.
"""
import sys

from jobs._common import run, spark_for


def options(p):
    p.add_argument("--teacher", default="pfd_teacher", help="teacher method name (default pfd_teacher)")


def body(args, cfg):
    from orchestration import pipeline
    from rec_models.training.loop import teacher_config

    tcfg = teacher_config(cfg, args.teacher)   # --teacher and its distill.teacher_params, checked
    pipeline.validate_params(tcfg, args.teacher)  # before any ETL or training
    pipeline.check_training_env(cfg)
    spec = pipeline.ensure_features(spark_for(cfg), cfg)
    out = pipeline.run_dir(cfg, "teachers", args.teacher)
    run_id = pipeline.start_run(cfg, out)          # train.resume=auto: an unfinished run goes on
    result = pipeline.train(tcfg, spec, args.teacher, out, run_id)
    pipeline.finish_run(out, run_id)
    head = "teacher" if "teacher_auc" in result["test"] else "student"
    return {"job": "train_teacher", "teacher": args.teacher, "run_id": run_id, "checkpoint": result["checkpoint"],
            "metrics": {"teacher": pipeline.head_metrics(result["test"], head)},
            "train_seconds": result["train_seconds"], "world_size": result["world_size"],
            "ranks": result.get("ranks", [])}


if __name__ == "__main__":
    sys.exit(run(__doc__, body, options))

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
    from etl import pipeline
    from etl.embeddings import ModelTag

    spark = spark_for(cfg)
    spec = pipeline.ensure_features(spark, cfg)
    tag = ModelTag(cfg.run.name, cfg.run.version, pipeline.new_run_id())
    pfd = pipeline.train(cfg, spec, "pfd", pipeline.run_dir(cfg, "pfd"), tag.run_id,
                         teacher_checkpoint=cfg.distill.teacher_checkpoint)
    metrics = {"teacher": pipeline.head_metrics(pfd["test"], "teacher"),
               "student": pipeline.head_metrics(pfd["test"], "student")}
    if cfg.distill.train_baseline:
        base = pipeline.train(cfg, spec, "student", pipeline.run_dir(cfg, "baseline"), tag.run_id)
        metrics["baseline"] = pipeline.head_metrics(base["test"], "student")
    bundle = pipeline.export_student_of(pfd["checkpoint"], pipeline.run_dir(cfg, "student.pt"), tag)
    tables = pipeline.write_embeddings(spark, cfg, bundle, tag)
    metrics["student_retrieval"] = pipeline.retrieval_metrics(cfg, tag)
    tables.update({t: cfg.warehouse.uri(t) for t in pipeline.FEATURE_TABLES})
    return {"job": "distill_pfd", "run_id": tag.run_id, "model": {"name": tag.name, "version": tag.version},
            "metrics": metrics, "tables": tables, "bundle": bundle,
            "train_seconds": pfd["train_seconds"], "backend": cfg.train.backend}


if __name__ == "__main__":
    sys.exit(run(__doc__, body))

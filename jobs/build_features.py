"""spark-submit jobs/build_features.py [--dataset synthetic] [--set key=value ...]

Builds user_features, item_features and samples (Delta) and the resolved FeatureSpec.
"""
import sys

from jobs._common import run, spark_for


def body(args, cfg):
    from etl.build import build_features

    result = build_features(spark_for(cfg), cfg)
    return {"job": "build_features", "tables": result.tables, "rows": result.counts,
            "spec": cfg.warehouse.spec_path}


if __name__ == "__main__":
    sys.exit(run(__doc__, body))

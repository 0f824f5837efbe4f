"""What every job shares: arguments, configuration, logging, the one JSON result line,
and a non-zero exit with a clear message on failure."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Callable

from rec_models.config import Config, ConfigError, load_config

log = logging.getLogger("jobs")

# errors that mean "your input or configuration is wrong": one line, exit code 2
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, KeyError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="extra YAML layered over base/dataset/method/profile (repeatable)")
    p.add_argument("--dataset", help="conf/dataset/<name>.yaml")
    p.add_argument("--method", help="conf/method/<name>.yaml")
    p.add_argument("--profile", help="conf/profile/<name>.yaml (local, databricks)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one value, e.g. --set train.epochs=1 (repeatable)")
    p.add_argument("--json-out", help="also write the result JSON to this file")
    return p


def config_from(args: argparse.Namespace) -> Config:
    return load_config(dataset=args.dataset, method=args.method, profile=args.profile,
                       files=args.conf, overrides=args.overrides)


def run(description: str, body: Callable[[argparse.Namespace, Config], dict],
        extra_args: Callable[[argparse.ArgumentParser], None] | None = None, argv=None) -> int:
    """Parse, configure, run ``body``, print its result as one JSON line; return the exit code."""
    logging.basicConfig(level=os.environ.get("DTT_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # spark-submit merges the driver's stderr into stdout: keep the result JSON the last line
    logging.getLogger("py4j").setLevel(logging.WARNING)
    p = parser(description)
    if extra_args:
        extra_args(p)
    args = p.parse_args(argv)
    started = time.time()
    try:
        cfg = config_from(args)
        result = body(args, cfg)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.time() - started, 1)
    line = json.dumps(result, default=str)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(line + "\n")
    print(line)
    return 0


def spark_for(cfg: Config):
    from etl.spark import get_spark

    return get_spark(cfg.spark)

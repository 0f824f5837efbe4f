"""What every job shares: arguments, configuration, logging, the one JSON result line,
and a non-zero exit with a clear message on failure."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from typing import Callable

from rec_models.config import Config, UserError, load_config

log = logging.getLogger("jobs")

# Exit codes: 0 success; 2 a user error (rec_models.config.UserError: a wrong key, value,
# file or input), one line naming it; 1 anything else, a bug, with its traceback.
EXIT_OK, EXIT_BUG, EXIT_USER = 0, 1, 2

def is_user_error(exc: BaseException) -> bool:
    """True for an error the user can act on (exit 2, one line), False for a bug (exit 1).
    Every layer raises ``rec_models.errors`` classes for those (ETL's InputError, the
    loader's LoaderError and the spec's PrivilegedLeakError among them)."""
    return isinstance(exc, UserError)


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
    except Exception as exc:   # noqa: BLE001 - sorted into user errors and bugs
        if is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER
        traceback.print_exc(file=sys.stderr)
        print(f"error: an internal error (a bug, not your input): {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BUG
    result["seconds"] = round(time.time() - started, 1)
    line = json.dumps(result, default=str)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(line + "\n")
    print(line)
    return EXIT_OK


def spark_for(cfg: Config):
    from etl.spark import get_spark

    return get_spark(cfg.spark)

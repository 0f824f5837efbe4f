"""Benchmark training throughput (samples/s) of the student and PFD models (a benchmark, not a test).

Writes train / valid / test Parquet files with the columns of the default FeatureSpec
(random values from ``bench_loader.make_table``, no Spark), resolves the spec with fixed
vocabulary sizes and price boundaries, remaps the generated indices into those sizes, and
trains each model kind for ``--epochs`` epoch(s) through ``TrainJob`` + ``run_training``:

- ``local`` backend, 1 process, torch intra-op threads 1 and 2;
- ``torch_distributor`` backend, 2 processes of 1 torch thread each (DDP over gloo,
  ``local_mode``: both processes on the driver), on a ``local[2]`` SparkSession that is
  started only for these runs, after all local runs; then the same with ``horovod``
  (2 Horovod processes as Spark tasks, Gloo) where Horovod is installed;
- ``loader only``: one epoch of ``ArrowBatchLoader`` over the same train files with the
  training settings (shuffle, buffer, prefetch), no model: the ceiling training could reach.

Models: ``dssm`` (the DSSM student alone, BCE only) and ``pfd`` (teacher + student trained
jointly), batch sizes 1024 and 8192 by default.

How to read the figures:

- ``samples/s`` and ``train s`` are the worker's own ``samples_per_second`` /
  ``train_seconds``: the epoch loop only, *including* the per-epoch validation pass and
  checkpoint write on rank 0, but *excluding* model construction, loader set-up, the final
  test evaluation and -- for ``torch_distributor`` -- the TorchDistributor / torchrun
  start-up (process spawn, imports, process-group rendezvous). Samples are
  ``steps x batch x processes`` (full batches only; with 2 processes, rows a rank cannot
  fill a batch with are dropped).
- ``call s`` is the wall time of the whole ``run_training`` call, so ``call s - train s``
  is the fixed overhead of a run: for the distributor it *includes* its start-up cost.
- ``cores busy`` (not for ``horovod``, whose workers are Spark's Python workers) is the
  CPU time of this process and its reaped children (torchrun and
  its workers: the distributor's start-up included) over ``call s``.
- The machine has 2 cores, shared with anything else running. The cores busy with any
  work over one second before the start and the load average are printed (with a
  warning above a quarter of a core), and the 1-minute load after each run goes to the
  JSON. Two local threads or two distributor processes use both cores, and the loader's
  prefetch thread competes with them. Rates are wall-clock, so a busy machine lowers them
  all -- and it hits 2 torch threads hardest: when another process holds a core, the two
  OpenMP threads wait on each other and 2 threads ran 10-30x *slower* than 1 here during
  a concurrent Spark test run (on an idle machine they are 1.1-1.5x faster). Compare rows
  of one run with each other rather than across runs, and rerun when the warning appears
  or ``load_1min_after`` exceeds 2. The data is random, so AUCs are ~0.5 and irrelevant.

    .venv/bin/python benchmarks/bench_training.py        # ~1.5 min idle; up to ~6 when contended
    .venv/bin/python benchmarks/bench_training.py --quick --skip-distributor
    .venv/bin/python benchmarks/bench_training.py --rows 200000 --json /tmp/bench_training.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))

from bench_loader import make_table  # noqa: E402  (the shared data generator)
from orchestration.spark_training.launchers import run_training
from rec_models.config import load_config  # noqa: E402
from rec_models.loaders.arrow import ArrowBatchLoader
from rec_models.spec import FeatureSpec  # noqa: E402
from rec_models.training.loop import TrainJob, model_columns

# What ETL would have filled in; ids match the synthetic conf (n + padding + OOV).
SIZES = {
    "user_id": {"vocab_size": 2002},
    "item_id": {"vocab_size": 1002},
    "age_group": {"vocab_size": 8},
    "region": {"vocab_size": 14},
    "category": {"vocab_size": 22},
    "tags": {"vocab_size": 52},
    "price": {"boundaries": (2.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 40.0, 80.0)},
    "activity": {"mean": 0.0, "std": 1.0},
}
KINDS = ("dssm", "pfd")   # method names (rec_models.methods): the DSSM student alone, and PFD


def resolved_spec() -> FeatureSpec:
    return load_config().spec.resolve(SIZES)


def fit_to_spec(table: pa.Table, spec: FeatureSpec) -> pa.Table:
    """Remap every index column into its embedding table (``v % table_size``; 0 stays 0).

    ``make_table`` draws ids from the synthetic conf's sizes and other categoricals from
    [0, 52), bucketized numerics from [0, num_buckets + 2): larger than the tables above.
    """
    for f in spec.features:
        if not f.is_categorical:
            continue
        size = spec.embedding_table_owner(f).table_size
        col = table.column(f.name).combine_chunks()
        if f.is_list:
            values = col.values.to_numpy() % size
            new = pa.ListArray.from_arrays(col.offsets, pa.array(values.astype(np.int32)))
        else:
            new = pa.array((col.to_numpy() % size).astype(np.int32))
        table = table.set_column(table.schema.get_field_index(f.name), f.name, new)
    return table


def write_split(spec, synth, root: Path, name: str, rows: int, files: int, row_group_rows: int,
                rng: np.random.Generator) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths, per_file = [], -(-rows // files)
    for i in range(files):
        n = min(per_file, rows - i * per_file)
        if n <= 0:
            break
        path = root / f"{name}-{i:05d}.snappy.parquet"
        pq.write_table(fit_to_spec(make_table(spec, n, rng, synth), spec), path,
                       row_group_size=row_group_rows, compression="snappy")
        paths.append(str(path))
    return paths


def check_ranges(files: list[str], spec: FeatureSpec) -> None:
    """Fail early (not inside an embedding lookup in a worker) if an index is out of range."""
    for f in spec.features:
        if not f.is_categorical:
            continue
        size = spec.embedding_table_owner(f).table_size
        for path in files:
            col = pq.read_table(path, columns=[f.name]).column(f.name).combine_chunks()
            values = col.values.to_numpy() if f.is_list else col.to_numpy()
            if values.size and not (0 <= values.min() and values.max() < size):
                raise SystemExit(f"{path}: column {f.name} has values outside [0, {size})")


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped descendants (torchrun and its workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def cores_busy_now(seconds: float = 1.0):
    """Cores in use by anything on the machine over ``seconds`` (Linux /proc/stat), else None."""
    def sample():
        with open("/proc/stat") as fh:
            ticks = [int(x) for x in fh.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]          # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cpus = os.cpu_count() or 1
    return cpus * (1 - (idle1 - idle0) / max(1, total1 - total0))


def time_loader(files: list[str], spec: FeatureSpec, batch_size: int, train) -> dict:
    """One warm-up epoch, then one timed epoch, with the settings ``_train`` uses."""
    loader = ArrowBatchLoader(files, spec, model_columns(spec), batch_size, shuffle=True, seed=0,
                              shuffle_buffer_rows=train.shuffle_buffer_rows,
                              prefetch_batches=train.prefetch_batches)
    for epoch in range(2):
        loader.set_epoch(epoch)
        c0, t0, rows = cpu_seconds(), time.perf_counter(), 0
        for batch in loader:
            rows += batch["label"].shape[0]
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"kind": "-", "backend": "loader only", "processes": 1, "threads": None, "batch_size": batch_size,
            "samples_per_second": rows / wall, "train_seconds": wall, "call_seconds": wall, "steps": len(loader),
            "cores_busy": cpu / wall, "load_1min_after": os.getloadavg()[0]}


def train_once(kind: str, spec: FeatureSpec, files: dict, out_root: Path, backend: str, processes: int,
               threads: int, batch_size: int, epochs: int) -> dict:
    out_dir = out_root / f"{kind}-{backend}-p{processes}-t{threads}-b{batch_size}"
    cfg = load_config(overrides=[
        f"train.backend={backend}", f"train.num_processes={processes}", f"train.num_threads={threads}",
        f"train.batch_size={batch_size}", f"train.epochs={epochs}", f"run.output_dir={out_root}",
        "train.log_every=1000000",
        # the random rows have no item feature table, which student.objective=mixed (the
        # default) draws its corpus negatives from: the in-batch softmax, the same towers
        "student.objective=sampled_softmax",
    ])
    job = TrainJob(kind=kind, config=cfg.model_dump(mode="json"), spec_json=spec.to_json(), files=files,
                   out_dir=str(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    result = run_training(job, cfg.train)
    call, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"kind": kind, "backend": backend, "processes": processes, "threads": threads,
            "batch_size": batch_size, "samples_per_second": result["samples_per_second"],
            "train_seconds": result["train_seconds"], "call_seconds": call, "steps": result["steps"],
            "world_size": result["world_size"],
            # horovod's workers are Spark's Python workers, not this process's children
            "cores_busy": None if backend == "horovod" else cpu / call, "load_1min_after": os.getloadavg()[0],
            "test_auc": {k: v for k, v in result["test"].items() if k.endswith("_auc")}}


def distributed_backends() -> list[str]:
    """torch_distributor, and horovod where it is installed (make horovod)."""
    from orchestration.spark_training.launchers import BackendUnavailableError, check_backend_available
    from rec_models.config import TrainConf

    try:
        check_backend_available(TrainConf(backend="horovod"))
    except BackendUnavailableError as exc:
        print(f"horovod runs skipped: {exc}")
        return ["torch_distributor"]
    return ["torch_distributor", "horovod"]


def print_table(results: list[dict]) -> None:
    print("\n| kind | backend | processes | threads | batch | samples/s | train s | call s | cores busy |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['kind']} | {r['backend']} | {r['processes']} | {r['threads'] or '-'} | {r['batch_size']} "
              f"| {r['samples_per_second']:,.0f} | {r['train_seconds']:.2f} | {r['call_seconds']:.2f} "
              f"| {'-' if r['cores_busy'] is None else format(r['cores_busy'], '.2f')} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="train rows (default 400000; --quick 40000)")
    ap.add_argument("--eval-rows", type=int, default=None, help="rows of valid and of test (default 20000)")
    ap.add_argument("--files", type=int, default=4, help="train files")
    ap.add_argument("--row-group-rows", type=int, default=None, help="default: train rows / 8")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads, local backend")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--skip-distributor", action="store_true",
                    help="no SparkSession: no torch_distributor or horovod runs")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = ap.parse_args(argv)

    rows = args.rows or (40_000 if args.quick else 400_000)
    eval_rows = args.eval_rows or (4_000 if args.quick else 20_000)
    rg_rows = args.row_group_rows or max(1, -(-rows // 8))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = load_config()
    spec = resolved_spec()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    busy = cores_busy_now()

    root = Path(tempfile.mkdtemp(prefix="bench_training_"))
    spark = None
    results: list[dict] = []
    try:
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        synth = cfg.data.source.synthetic
        files = {
            "train": write_split(spec, synth, root / "data", "train", rows, args.files, rg_rows, rng),
            "valid": write_split(spec, synth, root / "data", "valid", eval_rows, 1, rg_rows, rng),
            "test": write_split(spec, synth, root / "data", "test", eval_rows, 1, rg_rows, rng),
        }
        check_ranges([p for split in files.values() for p in split], spec)
        gen_s = time.perf_counter() - t0
        print(f"data: train {rows:,} rows in {len(files['train'])} files (row groups of {rg_rows:,}), "
              f"valid {eval_rows:,}, test {eval_rows:,} (written in {gen_s:.1f}s)")
        if busy is not None and busy > 0.25:
            print(f"warning: {busy:.2f} cores busy with other work at start: rates will be low, "
                  f"2-thread rows can collapse")
        print(f"cpus {cpus}; cores busy at start {busy if busy is None else round(busy, 2)}; load average {load and ' '.join(f'{x:.2f}' for x in load)}; "
              f"epochs {args.epochs}; shuffle_buffer_rows {cfg.train.shuffle_buffer_rows:,}; "
              f"prefetch_batches {cfg.train.prefetch_batches}", flush=True)

        out_root = root / "runs"
        # warm-up (first-call costs of torch ops, imports), not reported
        warm = {"train": files["valid"], "valid": files["test"], "test": files["test"]}
        train_once("pfd", spec, warm, out_root / "warmup", "local", 1, 1, min(args.batch_sizes), 1)

        for bs in args.batch_sizes:
            results.append(time_loader(files["train"], spec, bs, cfg.train))
            print(f"  loader only, batch {bs}: {results[-1]['samples_per_second']:,.0f} samples/s", flush=True)
        for kind in args.kinds:
            for bs in args.batch_sizes:
                for threads in args.threads:
                    r = train_once(kind, spec, files, out_root, "local", 1, threads, bs, args.epochs)
                    results.append(r)
                    print(f"  {kind} local t{threads} batch {bs}: {r['samples_per_second']:,.0f} samples/s "
                          f"({r['train_seconds']:.1f}s, call {r['call_seconds']:.1f}s)", flush=True)
        if not args.skip_distributor:
            from etl.spark import get_spark
            from rec_models.config import SparkConf

            t0 = time.perf_counter()
            spark = get_spark(SparkConf(master="local[2]", conf={"spark.ui.showConsoleProgress": False}))
            print(f"SparkSession local[2] started in {time.perf_counter() - t0:.1f}s", flush=True)
            for backend in distributed_backends():
                for kind in args.kinds:
                    for bs in args.batch_sizes:
                        r = train_once(kind, spec, files, out_root, backend, 2, 1, bs, args.epochs)
                        results.append(r)
                        print(f"  {kind} {backend} p2 t1 batch {bs}: {r['samples_per_second']:,.0f} samples/s "
                              f"({r['train_seconds']:.1f}s, call {r['call_seconds']:.1f}s)", flush=True)

        print_table(results)
        if args.json:
            out = {"train_rows": rows, "eval_rows": eval_rows, "train_files": len(files["train"]),
                   "row_group_rows": rg_rows, "epochs": args.epochs, "cpus": cpus, "load_average_start": load,
                   "cores_busy_start": busy,
                   "shuffle_buffer_rows": cfg.train.shuffle_buffer_rows,
                   "prefetch_batches": cfg.train.prefetch_batches, "sizes": SIZES,
                   "notes": "samples_per_second/train_seconds: the worker's epoch loop (incl. per-epoch "
                            "validation and checkpoint, excl. TorchDistributor start-up); call_seconds: the "
                            "whole run_training call (incl. start-up)",
                   "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                "pyarrow": pa.__version__, "numpy": np.__version__},
                   "results": results}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2, default=list))
            print(f"\nwrote {args.json}")
    finally:
        if spark is not None:
            spark.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""ArrowBatchLoader vs Petastorm's make_torch_dataloader, on the same Parquet files (a benchmark).

Why: train.loader=petastorm exists for Databricks runtimes where Petastorm is the
documented path; this says what it costs next to the project's own loader. Run it in the
petastorm lane's environment (Petastorm 0.13.1 needs pyarrow < 15 and pyspark 3.5):

    bash .ci/lane_petastorm.sh --setup-only
    PYSPARK_PYTHON=.venv-petastorm/bin/python .venv-petastorm/bin/python benchmarks/bench_petastorm.py

Writes ``--rows`` rows in the encoded samples layout (the default FeatureSpec: int32 ids,
list<int32> history of 20 and tags of 4, float32 statistics and label; see
bench_loader.py) with pyarrow, then reads all of them once per setting, batch
``--batch-size``, with the same thread budget everywhere: the process is pinned to
``--threads`` CPUs, torch and Arrow use that many threads, Petastorm's reader pool has
that many workers (ArrowBatchLoader: one prefetch thread). Petastorm reads the very same
files (``make_spark_converter`` given their folder, so nothing is rewritten); the one-off
cost of materialising a DataFrame, which train.loader=petastorm pays per training run, is
timed separately. Every setting must yield every row (checked). Prints a Markdown table;
writes JSON to ``--json`` (default results/bench_petastorm.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loader import write_dataset  # noqa: E402
from rec_models.config import SparkConf, load_config  # noqa: E402
from rec_models.loaders.arrow import ArrowBatchLoader
from rec_models.loaders.petastorm import PetastormLoader, guard_end_of_data, require_petastorm


def pin(threads: int) -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, set(cpus))
    return f"pinned to cpus {cpus}"


def timed(make_iter, epochs: int) -> dict:
    """``epochs`` timed epochs; the fastest is reported (the machine may be shared)."""
    best = None
    for epoch in range(epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        rows = batches = 0
        for n in make_iter(epoch):
            rows += n
            batches += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if best is None or wall < best["wall_s"]:
            best = {"rows": rows, "batches": batches, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
    best["rows_per_s"] = best["rows"] / best["wall_s"]
    best["rows_per_cpu_s"] = best["rows"] / max(best["cpu_s"], 1e-9)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--row-group-rows", type=int, default=131_072)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2, help="CPUs, torch/Arrow threads and Petastorm workers")
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs per setting (best one reported)")
    ap.add_argument("--shuffle-rows", type=int, default=200_000,
                    help="shuffle buffer (ArrowBatchLoader) / shuffling_queue_capacity (Petastorm) for the "
                         "shuffled rows; the default DataLoader is timed without shuffling only")
    ap.add_argument("--json", default="results/bench_petastorm.json")
    args = ap.parse_args(argv)

    require_petastorm()
    from petastorm.pytorch import BatchedDataLoader, DataLoader
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    from etl.spark import get_spark

    pinned = pin(args.threads)
    torch.set_num_threads(args.threads)
    pa.set_cpu_count(args.threads)
    pa.set_io_thread_count(args.threads)
    cfg = load_config()
    spec = cfg.spec
    columns = [f.name for f in spec.features]
    bs = args.batch_size
    root = Path(tempfile.mkdtemp(prefix="bench_petastorm_"))
    spark = None
    try:
        data = root / "data"
        data.mkdir()
        t0 = time.perf_counter()
        files = write_dataset(spec, cfg.data.source.synthetic, data, args.rows, args.files, args.row_group_rows)
        size_mb = sum(os.path.getsize(f) for f in files) / 2**20
        print(f"dataset: {args.rows:,} rows, {len(files)} files, row groups of {args.row_group_rows:,}, "
              f"{size_mb:.0f} MiB snappy, {len(columns)} columns (written in {time.perf_counter() - t0:.1f}s); "
              f"batch {bs}; {args.threads} threads, process {pinned}")

        spark = get_spark(SparkConf(master=f"local[{args.threads}]", app_name="bench_petastorm",
                                    conf={"spark.ui.enabled": False, "spark.ui.showConsoleProgress": False}))
        spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, f"file://{root / 'cache'}")
        spark.range(1000).count()                                     # JVM warm-up, not timed
        t0 = time.perf_counter()
        same_files = make_spark_converter(f"file://{data}")   # these files as they are (never .delete() it)
        convert_existing_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        materialised = make_spark_converter(spark.read.parquet(str(data)), dtype=None)
        materialise_s = time.perf_counter() - t0
        materialised.delete()
        assert len(same_files) == args.rows, (len(same_files), args.rows)

        def arrow(shuffle):
            loader = ArrowBatchLoader(files, spec, columns, bs, shuffle=shuffle, drop_last=False,
                                      shuffle_buffer_rows=args.shuffle_rows, prefetch_batches=4)

            def run(epoch):
                loader.set_epoch(epoch)
                for batch in loader:
                    yield batch["label"].shape[0]
            return run

        def petastorm(fn, shuffle):
            def run(epoch):
                with same_files.make_torch_dataloader(
                        batch_size=bs, num_epochs=1, workers_count=args.threads, data_loader_fn=fn,
                        shuffling_queue_capacity=args.shuffle_rows if shuffle else 0,
                        shuffle_row_groups=shuffle, seed=epoch + 1) as loader:
                    guard_end_of_data(loader.reader)   # its reader can end an epoch early otherwise
                    for batch in loader:
                        yield batch["label"].shape[0]
            return run

        def ours(shuffle):
            loader = PetastormLoader(same_files, spec, columns, bs, shuffle=shuffle, drop_last=False,
                                     shuffling_queue_capacity=args.shuffle_rows, workers_count=args.threads)

            def run(epoch):
                loader.set_epoch(epoch)
                for batch in loader:
                    yield batch["label"].shape[0]
            return run

        settings = [
            ("ArrowBatchLoader", False, arrow(False)),
            ("ArrowBatchLoader", True, arrow(True)),
            ("Petastorm make_torch_dataloader, BatchedDataLoader", False, petastorm(BatchedDataLoader, False)),
            ("Petastorm make_torch_dataloader, BatchedDataLoader", True, petastorm(BatchedDataLoader, True)),
            ("PetastormLoader (train.loader=petastorm: BatchedDataLoader + layout)", True, ours(True)),
            ("Petastorm make_torch_dataloader, default DataLoader", False, petastorm(DataLoader, False)),
        ]
        results = []
        for name, shuffle, run in settings:
            r = timed(run, args.epochs)
            if r["rows"] != args.rows:
                raise RuntimeError(f"{name} (shuffle={shuffle}) yielded {r['rows']} rows, not {args.rows}")
            results.append({"loader": name, "shuffle": shuffle, **r})
            print(f"  {name} shuffle={shuffle}: {r['rows_per_s'] / 1e6:.3f} M rows/s", flush=True)

        base = results[0]["rows_per_s"]
        print("\n| loader | shuffle | batches | seconds | rows/s | rows/CPU-s | vs ArrowBatchLoader |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['loader']} | {'yes' if r['shuffle'] else 'no'} | {r['batches']} | {r['wall_s']:.2f} | "
                  f"{r['rows_per_s']:,.0f} | {r['rows_per_cpu_s']:,.0f} | {r['rows_per_s'] / base:.3f}x |")
        print(f"\nPetastorm one-off costs: make_spark_converter on the existing files {convert_existing_s:.1f}s; "
              f"materialising the same rows from a DataFrame (what train.loader=petastorm does per run) "
              f"{materialise_s:.1f}s")
        out = {"rows": args.rows, "files": len(files), "row_group_rows": args.row_group_rows,
               "size_mib": round(size_mb, 1), "batch_size": bs, "threads": args.threads, "pinning": pinned,
               "epochs_timed": args.epochs, "shuffle_rows": args.shuffle_rows,
               "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
               "petastorm_convert_existing_s": round(convert_existing_s, 2),
               "petastorm_materialise_s": round(materialise_s, 2),
               "versions": {"python": platform.python_version(), "pyarrow": pa.__version__,
                            "torch": torch.__version__, "numpy": np.__version__,
                            "pyspark": __import__("pyspark").__version__,
                            "petastorm": __import__("petastorm").__version__},
               "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    finally:
        if spark is not None:
            spark.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

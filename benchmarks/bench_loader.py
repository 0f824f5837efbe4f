"""Benchmark ArrowBatchLoader throughput on one core (a benchmark, not a test).

Writes a Parquet dataset with the columns of the default FeatureSpec
(conf/dataset/synthetic.yaml: int32 ids, list<int32> history of 20 and tags of 4, a
bucketized price, float32 privileged statistics and label) with pyarrow into a temp dir,
then times full epochs of the loader for batch sizes 1024 and 8192, shuffle on and off.

"One core" is honest twice over: the process (the prefetch thread included) is pinned
to one CPU with ``os.sched_setaffinity`` where available (else run it under
``taskset -c 0``), torch and Arrow are limited to one thread, and the table reports the
process CPU time per row next to the wall-clock rate; ``rows/cpu-s`` is the rate a
dedicated core would give even when the machine is shared (wall rates then drop).

    .venv/bin/python benchmarks/bench_loader.py                  # 2 M rows, < 1 minute
    .venv/bin/python benchmarks/bench_loader.py --rows 500000 --json out.json
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
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rec_models.config import load_config  # noqa: E402
from rec_models.loaders.arrow import ArrowBatchLoader
from rec_models.spec import FeatureSpec, Kind  # noqa: E402


def _vocab(name: str, synth) -> int:
    sizes = {"user_id": synth.n_users, "item_id": synth.n_items, "category": synth.n_categories,
             "tags": synth.n_tags}
    return sizes.get(name, 50) + 2


def make_table(spec: FeatureSpec, n: int, rng: np.random.Generator, synth) -> pa.Table:
    """Random values in the encoded layout ETL writes (lists padded with 0 to max_len)."""
    cols = {}
    for f in spec.features:
        if f.is_list:
            vocab = _vocab(f.vocab_of or f.name, synth)
            values = rng.integers(2, vocab, size=(n, f.max_len), dtype=np.int32)
            used = rng.integers(0, f.max_len + 1, size=n)             # pad the tail with 0
            values[np.arange(f.max_len)[None, :] >= used[:, None]] = 0
            offsets = np.arange(0, n * f.max_len + 1, f.max_len, dtype=np.int32)
            cols[f.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)))
        elif f.is_categorical:
            high = f.num_buckets + 2 if f.kind == Kind.numeric else _vocab(f.name, synth)
            cols[f.name] = pa.array(rng.integers(0, high, size=n, dtype=np.int32))
        elif f.kind == Kind.label:
            cols[f.name] = pa.array((rng.random(n) < 0.2).astype(np.float32))
        else:
            cols[f.name] = pa.array(rng.standard_normal(n, dtype=np.float32))
    return pa.table(cols)


def write_dataset(spec, synth, root: Path, rows: int, files: int, row_group_rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    paths, per_file = [], -(-rows // files)
    for i in range(files):
        n = min(per_file, rows - i * per_file)
        if n <= 0:
            break
        path = root / f"part-{i:05d}.snappy.parquet"
        pq.write_table(make_table(spec, n, rng, synth), path, row_group_size=row_group_rows,
                       compression="snappy")
        paths.append(str(path))
    return paths


def pin_one_core() -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity; use taskset -c 0)"
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to cpu {cpu}"


def time_epochs(make_iter, epochs: int) -> dict:
    """One warm-up epoch, then ``epochs`` timed ones; the best one is reported."""
    best = None
    for e in range(epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        rows = 0
        for rows_in in make_iter(e):
            rows += rows_in
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if e == 0:
            continue
        if best is None or wall < best["wall_s"]:
            best = {"rows": rows, "wall_s": wall, "cpu_s": cpu}
    best["rows_per_s"] = best["rows"] / best["wall_s"]
    best["cpu_ns_per_row"] = best["cpu_s"] / best["rows"] * 1e9
    best["rows_per_cpu_s"] = best["rows"] / best["cpu_s"]
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--row-group-rows", type=int, default=131_072)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per setting (after a warm-up)")
    ap.add_argument("--prefetch", type=int, default=None, help="prefetch_batches (default: train conf)")
    ap.add_argument("--shuffle-buffer-rows", type=int, default=None, help="default: train conf")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the process to one core")
    ap.add_argument("--data-dir", default=None, help="write the dataset here and keep it")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = ap.parse_args(argv)

    cfg = load_config()
    spec, train = cfg.spec, cfg.train
    prefetch = train.prefetch_batches if args.prefetch is None else args.prefetch
    buffer_rows = train.shuffle_buffer_rows if args.shuffle_buffer_rows is None else args.shuffle_buffer_rows
    pinned = "not pinned (--no-pin)" if args.no_pin else pin_one_core()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="bench_loader_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        files = write_dataset(spec, cfg.data.source.synthetic, root, args.rows, args.files, args.row_group_rows)
        gen_s = time.perf_counter() - t0
        size_mb = sum(os.path.getsize(f) for f in files) / 2**20
        columns = [f.name for f in spec.features]
        print(f"dataset: {args.rows:,} rows, {len(files)} files, row groups of {args.row_group_rows:,}, "
              f"{size_mb:.0f} MiB, {len(columns)} columns (written in {gen_s:.1f}s)")
        print(f"process {pinned}; torch threads 1; prefetch_batches {prefetch}; "
              f"shuffle_buffer_rows {buffer_rows:,}\n")

        def raw_read(_epoch):
            for path in files:
                pf = pq.ParquetFile(path, memory_map=True, pre_buffer=True)
                for rg in range(pf.num_row_groups):
                    yield pf.read_row_group(rg, columns=columns, use_threads=False).num_rows

        results = [{"setting": "pyarrow read_row_group only (no conversion)", "batch_size": None,
                    "shuffle": None, **time_epochs(raw_read, args.epochs)}]
        for bs in args.batch_sizes:
            for shuffle in (False, True):
                loader = ArrowBatchLoader(files, spec, columns, batch_size=bs, shuffle=shuffle, seed=0,
                                          shuffle_buffer_rows=buffer_rows, prefetch_batches=prefetch)

                def run(epoch, loader=loader):
                    loader.set_epoch(epoch)
                    for batch in loader:
                        yield batch["label"].shape[0]

                results.append({"setting": "ArrowBatchLoader", "batch_size": bs, "shuffle": shuffle,
                                "prefetch_batches": prefetch, **time_epochs(run, args.epochs)})

        print(f"{'setting':<44} {'batch':>6} {'shuffle':>7} {'M rows/s':>9} {'cpu ns/row':>10} "
              f"{'M rows/cpu-s':>12}")
        for r in results:
            print(f"{r['setting'][:44]:<44} {r['batch_size'] or '-':>6} "
                  f"{'-' if r['shuffle'] is None else str(r['shuffle']):>7} {r['rows_per_s'] / 1e6:>9.2f} "
                  f"{r['cpu_ns_per_row']:>10.0f} {r['rows_per_cpu_s'] / 1e6:>12.2f}")
        if args.json:
            out = {"rows": args.rows, "files": len(files), "row_group_rows": args.row_group_rows,
                   "size_mib": round(size_mb, 1), "pinning": pinned, "torch_threads": 1,
                   "epochs_timed": args.epochs, "shuffle_buffer_rows": buffer_rows,
                   "versions": {"python": platform.python_version(), "pyarrow": pa.__version__,
                                "torch": torch.__version__, "numpy": np.__version__},
                   "results": results}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2))
            print(f"\nwrote {args.json}")
    finally:
        if not args.data_dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

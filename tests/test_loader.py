"""ArrowBatchLoader on small Parquet files written with pyarrow (no Spark)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rec_models.loaders.arrow import ArrowBatchLoader, LoaderError
from rec_models.spec import FeatureSpec

REPO = Path(__file__).resolve().parents[1]

SPEC = FeatureSpec.model_validate({
    "keys": {"user": "user_id", "item": "item_id", "timestamp": "timestamp"},
    "features": [
        {"name": "user_id", "role": "user", "kind": "categorical", "source": "users"},
        {"name": "hist_item_ids", "role": "user", "kind": "sequence", "vocab_of": "item_id", "max_len": 3},
        {"name": "item_id", "role": "item", "kind": "categorical", "source": "items"},
        {"name": "tags", "role": "item", "kind": "multi_categorical", "source": "items", "max_len": 2},
        {"name": "price", "role": "item", "kind": "numeric", "source": "items", "transform": "bucketize"},
        {"name": "score", "role": "privileged", "kind": "numeric", "source": "derived",
         "derive": "user_item_impressions"},
        {"name": "label", "role": "label", "kind": "label"},
    ],
})
COLUMNS = [f.name for f in SPEC.features]


def _lists(values: np.ndarray) -> pa.Array:
    n, width = values.shape
    offsets = np.arange(0, n * width + 1, width, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1).astype(np.int32)))


def sample_table(ids: np.ndarray) -> pa.Table:
    """Every column is a function of the row id, so a misaligned row is detectable."""
    ids = ids.astype(np.int32)
    return pa.table({
        "user_id": ids,
        "hist_item_ids": _lists(np.stack([ids, ids + 1, ids + 2], axis=1)),
        "item_id": ids + 1000,
        "tags": _lists(np.stack([ids % 7, ids % 5], axis=1)),
        "price": (ids % 11).astype(np.int32),
        "score": (ids * 0.5).astype(np.float32),
        "label": (ids % 2).astype(np.float32),
    })


def write_dataset(root: Path, sizes=((40, 13), (57, 20), (25, 25), (71, 16))) -> tuple[list[str], int]:
    """Files of (rows, row_group_size): uneven row groups; ids 0..total-1 in file order."""
    files, start = [], 0
    for i, (rows, rg) in enumerate(sizes):
        path = root / f"part-{i:03d}.parquet"
        pq.write_table(sample_table(np.arange(start, start + rows)), path, row_group_size=rg)
        files.append(str(path))
        start += rows
    return files, start


def ids_of(batches) -> np.ndarray:
    return np.concatenate([b["user_id"].numpy() for b in batches]) if batches else np.zeros(0, np.int32)


def check_aligned(batch: dict) -> None:
    uid = batch["user_id"].numpy().astype(np.int64)
    assert np.array_equal(batch["item_id"].numpy(), uid + 1000)
    assert np.array_equal(batch["hist_item_ids"].numpy(), np.stack([uid, uid + 1, uid + 2], 1))
    assert np.array_equal(batch["tags"].numpy(), np.stack([uid % 7, uid % 5], 1))
    assert np.array_equal(batch["price"].numpy(), uid % 11)
    assert np.array_equal(batch["score"].numpy(), (uid * 0.5).astype(np.float32))
    assert np.array_equal(batch["label"].numpy(), (uid % 2).astype(np.float32))


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ArrowBatchLoader-prefetch"]


# ---- coverage and order -----------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [0, 3])
def test_every_row_once_in_file_order(dataset, prefetch):
    files, total = dataset
    loader = ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=16, shuffle=False, drop_last=False,
                              prefetch_batches=prefetch)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-total // 16)
    assert loader.num_rows == total
    assert [len(b["label"]) for b in batches] == [16] * (total // 16) + [total % 16]
    assert np.array_equal(ids_of(batches), np.arange(total))
    for b in batches:
        check_aligned(b)


def test_drop_last_yields_only_full_batches(dataset):
    files, total = dataset
    loader = ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=16, shuffle=False, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == total // 16
    assert all(len(b["user_id"]) == 16 for b in batches)
    assert np.array_equal(ids_of(batches), np.arange(total // 16 * 16))


def test_dtypes_shapes_and_columns(dataset):
    files, _ = dataset
    cols = ["label", "tags", "user_id", "price", "score", "hist_item_ids"]
    batch = next(iter(ArrowBatchLoader(files, SPEC, cols, batch_size=8, seed=3)))
    assert list(batch) == cols
    assert batch["user_id"].dtype == torch.int32 and batch["user_id"].shape == (8,)
    assert batch["price"].dtype == torch.int32 and batch["price"].shape == (8,)      # bucketized
    assert batch["hist_item_ids"].dtype == torch.int32 and batch["hist_item_ids"].shape == (8, 3)
    assert batch["tags"].dtype == torch.int32 and batch["tags"].shape == (8, 2)
    assert batch["score"].dtype == torch.float32 and batch["score"].shape == (8,)
    assert batch["label"].dtype == torch.float32 and batch["label"].shape == (8,)
    for t in batch.values():
        assert t.is_contiguous()
    batch["user_id"] += 1                       # batches own their memory: writable


def test_sync_and_prefetched_are_identical(dataset):
    files, _ = dataset
    runs = []
    for prefetch in (0, 2):
        loader = ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=10, seed=5, shuffle_buffer_rows=30,
                                  prefetch_batches=prefetch)
        loader.set_epoch(2)
        runs.append(ids_of(list(loader)))
    assert np.array_equal(runs[0], runs[1])


# ---- sharding ---------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_disjoint_equal_and_covering(dataset, shuffle):
    files, total = dataset
    bs = 8
    loaders = [ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=bs, rank=r, world_size=2, shuffle=shuffle,
                                seed=1, shuffle_buffer_rows=20) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) > 0
    per_rank = []
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(len(b["user_id"]) == bs for b in batches)
        for b in batches:
            check_aligned(b)
        ids = ids_of(batches)
        assert len(ids) == loader.num_rows == len(loader) * bs
        assert len(np.unique(ids)) == len(ids)
        per_rank.append(set(ids.tolist()))
    assert not per_rank[0] & per_rank[1]
    union = per_rank[0] | per_rank[1]
    assert union <= set(range(total))
    # only the remainders are dropped: the imbalance between ranks plus < one batch each
    rank_rows = loaders[0]._rank_rows
    assert sum(rank_rows) == total
    assert total - len(union) <= (max(rank_rows) - min(rank_rows)) + 2 * (bs - 1)
    # row groups (18 here) are spread so that ranks get about the same number of rows
    assert max(rank_rows) - min(rank_rows) <= 25


def test_ranks_equal_length_without_drop_last(dataset):
    files, total = dataset
    loaders = [ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=32, rank=r, world_size=3,
                                shuffle=False, drop_last=False) for r in range(3)]
    lengths = {len(loader) for loader in loaders}
    assert len(lengths) == 1
    counts = [sum(1 for _ in loader) for loader in loaders]
    assert counts == [len(loaders[0])] * 3


def test_fewer_row_groups_than_ranks_are_sliced_by_rows(tmp_path):
    """A small table written as one file and row group still feeds every rank, disjointly."""
    files, total = write_dataset(tmp_path, sizes=((21, 21),))
    per_rank = []
    for r in range(2):
        loader = ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=4, rank=r, world_size=2,
                                  shuffle=False, drop_last=False)
        per_rank.append(ids_of(list(loader)))
    assert len(per_rank[0]) > 0 and len(per_rank[1]) > 0
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) >= total - 4


def test_ranks_with_no_data_is_an_error(tmp_path):
    files, _ = write_dataset(tmp_path, sizes=((1, 1),))
    with pytest.raises(LoaderError, match="2 ranks"):
        ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=4, rank=0, world_size=2)


# ---- shuffle ----------------------------------------------------------------------------
def _epoch_ids(files, epoch, seed=0, **kw):
    loader = ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=9, seed=seed, shuffle_buffer_rows=40,
                              drop_last=False, **kw)
    loader.set_epoch(epoch)
    batches = list(loader)
    for b in batches:
        check_aligned(b)
    return ids_of(batches)


def test_shuffle_deterministic_per_epoch_and_changes_across_epochs(dataset):
    files, total = dataset
    e0, e0_again, e1 = _epoch_ids(files, 0), _epoch_ids(files, 0), _epoch_ids(files, 1)
    other_seed = _epoch_ids(files, 0, seed=99)
    assert np.array_equal(e0, e0_again)
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, other_seed)
    for ids in (e0, e1, other_seed):               # still every row exactly once
        assert np.array_equal(np.sort(ids), np.arange(total))
    assert not np.array_equal(e0, np.arange(total))


def test_shuffle_mixes_rows_across_row_groups(tmp_path):
    files, total = write_dataset(tmp_path, sizes=((200, 50), (200, 50)))
    loader = ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=50, shuffle_buffer_rows=400)
    first = next(iter(loader))["user_id"].numpy()
    assert len(np.unique(first // 50)) >= 4       # rows from many row groups in one batch


def test_set_epoch_on_same_loader(dataset):
    files, _ = dataset
    loader = ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=8, seed=4, shuffle_buffer_rows=30)
    a = ids_of(list(loader))
    b = ids_of(list(loader))                       # no set_epoch: the same order
    loader.set_epoch(1)
    c = ids_of(list(loader))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---- validation ------------------------------------------------------------------------
def test_list_length_validation_names_the_column(tmp_path):
    files, _ = write_dataset(tmp_path)
    bad = tmp_path / "bad.parquet"
    table = sample_table(np.arange(5000, 5010))
    hist = [[i, i + 1, i + 2] for i in range(5000, 5010)]
    hist[6] = [1, 2]
    table = table.set_column(table.schema.get_field_index("hist_item_ids"), "hist_item_ids",
                             pa.array(hist, pa.list_(pa.int32())))
    pq.write_table(table, bad)
    loader = ArrowBatchLoader(files + [str(bad)], SPEC, COLUMNS, batch_size=4, shuffle=False)
    with pytest.raises(LoaderError, match=r"hist_item_ids.*row 6 .*bad\.parquet.*max_len=3"):
        list(loader)


def test_missing_column_names_it_and_the_file(tmp_path):
    files, _ = write_dataset(tmp_path)
    pq.write_table(sample_table(np.arange(3)).drop_columns(["tags"]), tmp_path / "no_tags.parquet")
    with pytest.raises(ValueError, match=r"'tags'.*no_tags\.parquet"):
        ArrowBatchLoader(files + [str(tmp_path / "no_tags.parquet")], SPEC, COLUMNS, batch_size=4)


def test_column_not_in_spec_is_refused(dataset):
    files, _ = dataset
    with pytest.raises(ValueError, match="'user_key'"):
        ArrowBatchLoader(files, SPEC, COLUMNS + ["user_key"], batch_size=4)


def test_wrong_type_is_refused(tmp_path):
    table = sample_table(np.arange(4))
    table = table.set_column(table.schema.get_field_index("tags"), "tags", pa.array(np.arange(4, dtype=np.int32)))
    pq.write_table(table, tmp_path / "flat_tags.parquet")
    with pytest.raises(ValueError, match=r"'tags'.*flat_tags\.parquet"):
        ArrowBatchLoader([str(tmp_path / "flat_tags.parquet")], SPEC, COLUMNS, batch_size=4)


def test_nulls_become_zero_and_int64_is_cast(tmp_path):
    table = pa.table({
        "user_id": pa.array([5, None, 7], pa.int64()),
        "hist_item_ids": pa.array([[1, 2, 3], None, [4, None, 6]], pa.list_(pa.int32())),
        "item_id": pa.array([1, 2, None], pa.int32()),
        "tags": pa.array([[1, 2], [3, 4], [5, 6]], pa.list_(pa.int32())),
        "price": pa.array([1, 2, 3], pa.int32()),
        "score": pa.array([1.5, None, 2.5], pa.float64()),
        "label": pa.array([1.0, 0.0, None], pa.float32()),
    })
    pq.write_table(table, tmp_path / "nulls.parquet")
    batch = next(iter(ArrowBatchLoader([str(tmp_path / "nulls.parquet")], SPEC, COLUMNS, batch_size=3,
                                       shuffle=False, drop_last=False)))
    assert batch["user_id"].dtype == torch.int32 and batch["user_id"].tolist() == [5, 0, 7]
    assert batch["item_id"].tolist() == [1, 2, 0]
    assert batch["hist_item_ids"].tolist() == [[1, 2, 3], [0, 0, 0], [4, 0, 6]]
    assert batch["score"].dtype == torch.float32 and batch["score"].tolist() == [1.5, 0.0, 2.5]
    assert batch["label"].tolist() == [1.0, 0.0, 0.0]


def test_filters_keep_len_exact(dataset):
    files, total = dataset
    loader = ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=10, shuffle=False, drop_last=False,
                              filters=[("user_id", ">=", 100)])
    ids = ids_of(list(loader))
    assert np.array_equal(ids, np.arange(100, total))
    assert loader.num_rows == total - 100 and len(loader) == -(-(total - 100) // 10)


# ---- the prefetch thread ---------------------------------------------------------------
def test_reader_thread_exception_surfaces_with_its_traceback(dataset, monkeypatch):
    files, _ = dataset
    loader = ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=4, shuffle=False, prefetch_batches=2)
    real_read = loader._read
    calls = []

    def exploding_read(unit, open_files):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_read(unit, open_files)

    monkeypatch.setattr(loader, "_read", exploding_read)
    seen = 0
    with pytest.raises(RuntimeError, match="disk on fire") as info:
        for _ in loader:
            seen += 1
    assert seen > 0
    assert calls[0] == "ArrowBatchLoader-prefetch"                 # it did run in the thread
    assert "exploding_read" in [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    _wait_for_no_prefetch_threads()


def _wait_for_no_prefetch_threads(timeout=5.0):
    deadline = time.monotonic() + timeout
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not prefetch_threads()


def test_early_break_stops_the_thread_and_a_new_epoch_works(tmp_path):
    files, total = write_dataset(tmp_path, sizes=((3000, 500), (3000, 500)))
    loader = ArrowBatchLoader(files, SPEC, COLUMNS, batch_size=4, shuffle=False, drop_last=False,
                              prefetch_batches=2)
    it = iter(loader)
    first = next(it)
    assert first["user_id"].tolist() == [0, 1, 2, 3]
    assert len(prefetch_threads()) == 1
    del it                                          # producer blocked on a full queue must stop
    _wait_for_no_prefetch_threads()
    assert np.array_equal(ids_of(list(loader)), np.arange(total))


def test_abandoned_iterator_does_not_hang_interpreter_exit(dataset):
    files, _ = dataset
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from rec_models.loaders.arrow import ArrowBatchLoader
        from rec_models.spec import FeatureSpec
        spec = FeatureSpec.model_validate_json({SPEC.to_json()!r})
        loader = ArrowBatchLoader({files!r}, spec, {COLUMNS!r}, batch_size=2, prefetch_batches=1)
        IT = iter(loader)   # kept alive at module level until exit
        next(IT)
        print("ok", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_scan_parquet_reads_paths_and_file_uris_in_file_and_row_order(tmp_path):
    """The scan the validation and evaluation code share: every row once, files in the
    order given, rows in file order, local paths and file:// URIs alike, in bounded batches."""
    from rec_models.loaders.arrow import scan_parquet

    paths = []
    for i, lo in enumerate((0, 7)):
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(pa.table({"x": np.arange(lo, lo + 7), "y": np.arange(lo, lo + 7) * 2.0}), path, row_group_size=3)
        paths.append(path)
    for files in ([str(p) for p in paths], [p.as_uri() for p in paths]):
        batches = list(scan_parquet(files, ["x"], batch_rows=2))
        assert max(b.num_rows for b in batches) <= 2 and all(b.schema.names == ["x"] for b in batches)
        assert [v for b in batches for v in b.column(0).to_pylist()] == list(range(14))
    got = [v for b in scan_parquet([str(paths[1]), str(paths[0])], ["x"]) for v in b.column(0).to_pylist()]
    assert got == [*range(7, 14), *range(7)]

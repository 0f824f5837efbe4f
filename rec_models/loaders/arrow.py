"""ArrowBatchLoader: Parquet row groups -> shuffled, sharded batches of torch tensors.

Reads the encoded sample tables that ETL writes (see :mod:`rec_models.spec` for the column
layout) straight from Parquet files with pyarrow, without Spark, Petastorm or a torch
``DataLoader``:

- **Sharding.** The unit of work is a Parquet row group (across all files); only the
  footers are read to list ``(file, row_group, num_rows)``. Units are spread over the
  ranks by a deterministic greedy (largest first, to the rank with the fewest rows), so
  every rank computes the same assignment with no communication, and every rank yields
  exactly ``len(loader)`` batches (the minimum over ranks), so DDP never hangs on an
  uneven last step.
- **Shuffle.** Per epoch (``set_epoch``), with a seed derived from ``(seed, epoch, rank)``:
  the order of this rank's row groups, and the rows inside a bounded buffer of at least
  ``shuffle_buffer_rows`` rows (the remainder that does not fill a batch is carried over
  into the next buffer). ``shuffle=False`` keeps file order.
- **Conversion.** Each row group is converted column by column to numpy once
  (vectorised; list columns come from the Arrow values buffer reshaped to
  ``[rows, max_len]``), then copied into a fresh buffer (with the permutation applied as
  a scatter when shuffling); batches are contiguous row slices of that buffer wrapped by
  ``torch.from_numpy`` -- no per-row and little per-batch Python.
- **Prefetch.** A daemon thread produces ready batches into a bounded queue
  (``prefetch_batches``; 0 = synchronous). Errors in the thread are re-raised in the
  consumer with their original traceback; the thread stops when the consumer stops
  (generator closed or garbage collected).

Memory is bounded by a few buffers (peak about 3-4 x ``shuffle_buffer_rows`` rows: the
buffer whose batches are still queued or held -- a batch is a view of its buffer --, the
row groups read for the next one, and the copy being permuted).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from rec_models.errors import BadInputError
from rec_models.spec import FeatureSpec, Kind

__all__ = ["ArrowBatchLoader", "LoaderError"]

_INT, _FLOAT, _LIST = "int", "float", "list"


class LoaderError(BadInputError):
    """The data does not match what the loader was asked for (names the column and file)."""


@dataclass(frozen=True)
class _Unit:
    index: int        # global order: files as given, row groups in file order
    file: int         # index into the loader's files
    row_group: int
    num_rows: int     # rows after ``filters``
    start: int = 0              # a slice of the row group: rows [start, stop)
    stop: Optional[int] = None  # None: the whole row group


# fewer row groups than this many per rank: shard by row slices instead, or ranks would
# be badly unbalanced (or empty) on small tables written as one file
_MIN_UNITS_PER_RANK = 4


def _sliced(units: list[_Unit], world_size: int) -> list[_Unit]:
    """Each row group cut into ``world_size`` contiguous slices (only read, never filtered)."""
    out: list[_Unit] = []
    for u in units:
        bounds = np.linspace(0, u.num_rows, world_size + 1).astype(int)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                out.append(_Unit(len(out), u.file, u.row_group, int(b - a), int(a), int(b)))
    return out


@dataclass(frozen=True)
class _Column:
    name: str
    kind: str         # _INT, _FLOAT or _LIST
    max_len: int = 1


def _column_kind(spec: FeatureSpec, name: str) -> _Column:
    try:
        f = spec.get(name)
    except KeyError:
        raise LoaderError(
            f"column '{name}' is not a feature of the FeatureSpec; the loader yields spec "
            f"features only (known: {', '.join(x.name for x in spec.features)})") from None
    if f.is_list:
        return _Column(name, _LIST, f.max_len)
    if f.is_categorical:
        return _Column(name, _INT)
    if f.kind in (Kind.numeric, Kind.label):
        return _Column(name, _FLOAT)
    raise LoaderError(f"column '{name}': unsupported feature kind {f.kind.value}")  # pragma: no cover


def _resolve(path: str) -> tuple[Optional[pafs.FileSystem], str]:
    """A local path stays a path (memory-mapped); a URI (s3://, file://, ...) gets its filesystem."""
    if "://" not in path:
        return None, path
    fs, local = pafs.FileSystem.from_uri(path)
    if isinstance(fs, pafs.LocalFileSystem):
        return None, local
    return fs, local


def open_parquet(path: str):
    """A Parquet file to read: a local path memory-mapped, a URI through its filesystem."""
    fs, local = _resolve(path)
    return pa.memory_map(local) if fs is None else fs.open_input_file(local)


def scan_parquet(files: list[str], columns: list[str], batch_rows: int = 1 << 17) -> Iterator[pa.RecordBatch]:
    """Batches of ``columns`` over ``files`` in file and row order (the loader's order
    without its shuffle), one file open at a time: memory is one batch."""
    for path in files:
        with open_parquet(path) as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)


def _close_all(files: dict) -> None:
    """Close the ParquetFiles in ``files`` (and the handles they were given, not owned)."""
    for pf, handle in files.values():
        pf.close()
        if handle is not None:
            handle.close()
    files.clear()


def _check_type(col: _Column, typ: pa.DataType, path: str) -> None:
    where = f"column '{col.name}' in {path}"
    if col.kind == _LIST:
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)):
            raise LoaderError(f"{where} has type {typ}; expected a list of int32 (max_len {col.max_len})")
        if not pa.types.is_integer(typ.value_type):
            raise LoaderError(f"{where} has type {typ}; expected list<int32>")
        if pa.types.is_fixed_size_list(typ) and typ.list_size != col.max_len:
            raise LoaderError(f"{where} is a fixed-size list of {typ.list_size}; the spec says max_len {col.max_len}")
    elif col.kind == _INT:
        if not pa.types.is_integer(typ):
            raise LoaderError(f"{where} has type {typ}; expected an int32 index")
    elif not (pa.types.is_floating(typ) or pa.types.is_integer(typ) or pa.types.is_boolean(typ)):
        raise LoaderError(f"{where} has type {typ}; expected float32")


# ---- Arrow -> numpy, vectorised ----------------------------------------------------------
def _int_values(arr: pa.Array) -> np.ndarray:
    if arr.type != pa.int32():
        arr = arr.cast(pa.int32())          # safe cast: overflow raises instead of wrapping
    if arr.null_count:
        arr = pc.fill_null(arr, 0)
    return arr.to_numpy(zero_copy_only=False)


def _float_values(arr: pa.Array) -> np.ndarray:
    if arr.type != pa.float32():
        arr = arr.cast(pa.float32(), safe=False)
    if arr.null_count:
        arr = pc.fill_null(arr, 0.0)
    return arr.to_numpy(zero_copy_only=False)


def _list_values(arr: pa.Array, col: _Column, where: str, first_row: int) -> np.ndarray:
    n, width = len(arr), col.max_len
    if pa.types.is_fixed_size_list(arr.type):
        start = arr.offset * width
        offsets = start + np.arange(0, (n + 1) * width, width, dtype=np.int64)
    else:
        offsets = arr.offsets.to_numpy(zero_copy_only=False)
        start = int(offsets[0])
    valid = None
    if arr.null_count:                       # a null list becomes all padding
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    bad = lengths != width
    if valid is not None:
        bad &= valid
    if bad.any():
        row = int(np.argmax(bad))
        raise LoaderError(
            f"list column '{col.name}': row {first_row + row} of {where} has {int(lengths[row])} "
            f"values ({int(bad.sum())} such rows); every list must have exactly "
            f"max_len={width} values (ETL pads with 0)")
    end = int(offsets[-1])
    values = arr.values.slice(start, end - start)
    values_np = _int_values(values)
    if valid is None:
        return values_np.reshape(n, width)
    out = np.zeros((n, width), dtype=np.int32)
    rows = np.flatnonzero(valid)
    idx = (offsets[:-1][rows] - start)[:, None] + np.arange(width)
    out[rows] = values_np[idx]
    return out


def _convert(col: _Column, chunked: pa.ChunkedArray, where: str) -> np.ndarray:
    parts = []
    first_row = 0
    for arr in chunked.chunks:
        try:
            if col.kind == _INT:
                parts.append(_int_values(arr))
            elif col.kind == _FLOAT:
                parts.append(_float_values(arr))
            else:
                parts.append(_list_values(arr, col, where, first_row))
        except pa.ArrowInvalid as exc:      # e.g. an int64 index that overflows int32
            raise LoaderError(f"column '{col.name}' of {where}: {exc}") from exc
        first_row += len(arr)
    if not parts:
        shape = (0, col.max_len) if col.kind == _LIST else (0,)
        return np.zeros(shape, dtype=np.float32 if col.kind == _FLOAT else np.int32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def arrow_to_tensors(data: pa.RecordBatch | pa.Table, spec: FeatureSpec, columns: list[str]) -> dict[str, torch.Tensor]:
    """One Arrow batch (e.g. inside a Spark Arrow UDF) -> the same tensors the loader yields."""
    out = {}
    for name in columns:
        col = _column_kind(spec, name)
        arr = data.column(name)
        chunked = arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr])
        values = _convert(col, chunked, "an Arrow batch")
        out[name] = torch.from_numpy(values if values.flags.writeable else values.copy())
    return out


# ---- the prefetch thread -----------------------------------------------------------------
class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def _producer(source: Iterator, q: "queue.Queue", stop: threading.Event) -> None:
    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in source:
            if not put(item):
                return
        put(_DONE)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
        put(_Raised(exc))
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


class ArrowBatchLoader:
    """Batches of ``columns`` (name -> tensor) from Parquet ``files``, sharded by ``rank``.

    Tensors: categorical and bucketized numeric -> int32 ``[B]``; multi_categorical and
    sequence -> int32 ``[B, max_len]``; numeric, label, weight -> float32 ``[B]``. Nulls
    become 0 (a null list becomes all padding). Batches own their memory (no Arrow
    buffers are shared), so they may be modified or kept.

    ``len(loader)`` is the same on every rank: ``min over ranks of rows // batch_size``
    (``ceil`` instead of ``floor`` with ``drop_last=False``; then the last batch may be
    short). With ``drop_last=False`` and ``world_size=1`` every row is yielded exactly once
    per epoch. With ``world_size > 1`` ranks with more rows drop their surplus (a different
    part each epoch when shuffling).

    ``filters``: a ``pyarrow.compute.Expression`` or DNF list of tuples as in
    ``pyarrow.parquet.read_table``; rows that do not match are skipped. Row counts are
    then computed at construction by a pass over the filter columns (row-group statistics
    prune where they can), so ``len`` stays exact.

    Call ``set_epoch(epoch)`` before each epoch (as with ``DistributedSampler``) to get a
    new shuffle; iterating twice without it repeats the order.
    """

    def __init__(self, files: list[str], spec: FeatureSpec, columns: list[str], batch_size: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 shuffle_buffer_rows: int = 200_000, prefetch_batches: int = 4, drop_last: bool = True,
                 filters: Any = None, use_threads: bool = False):
        files = [str(f) for f in files]
        if not files:
            raise ValueError("ArrowBatchLoader: no files given")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if prefetch_batches < 0:
            raise ValueError(f"prefetch_batches must be >= 0, got {prefetch_batches}")
        columns = list(columns)
        if not columns:
            raise ValueError("ArrowBatchLoader: no columns requested")
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        if dupes:
            raise ValueError(f"columns requested twice: {', '.join(dupes)}")

        self.files = files
        self.spec = spec
        self.columns = columns
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.shuffle_buffer_rows = max(1, int(shuffle_buffer_rows))
        self.prefetch_batches = int(prefetch_batches)
        self.drop_last = bool(drop_last)
        self.use_threads = bool(use_threads)
        self.epoch = 0
        self._cols = [_column_kind(spec, c) for c in columns]
        self._filter = self._as_expression(filters)

        # footers only: schema check of every file, and the (file, row group, rows) units
        self._metadata: list[pq.FileMetaData] = []
        units: list[_Unit] = []
        for fi, path in enumerate(files):
            try:
                fs, local = _resolve(path)
                if fs is None:
                    md = pq.read_metadata(local)
                else:
                    with fs.open_input_file(local) as fh:
                        md = pq.read_metadata(fh)
            except (OSError, pa.ArrowException) as exc:
                raise LoaderError(f"cannot read the Parquet footer of {path}: {exc}") from exc
            schema = md.schema.to_arrow_schema()
            for col in self._cols:
                idx = schema.get_field_index(col.name)
                if idx < 0:
                    raise LoaderError(
                        f"column '{col.name}' is missing from {path} "
                        f"(it has: {', '.join(schema.names)})")
                _check_type(col, schema.field(idx).type, path)
            self._metadata.append(md)
            for rg in range(md.num_row_groups):
                n = md.row_group(rg).num_rows
                if self._filter is not None:
                    n = self._fragment(fi, rg).count_rows(filter=self._filter)
                if n > 0:
                    units.append(_Unit(len(units), fi, rg, n))
        if self.world_size > 1 and self._filter is None and len(units) < _MIN_UNITS_PER_RANK * self.world_size:
            units = _sliced(units, self.world_size)
        self._units = units

        self._assignment = self._assign(units, self.world_size)
        rank_rows = [sum(u.num_rows for u in part) for part in self._assignment]
        self._rank_rows = rank_rows
        if self.drop_last:
            self._num_batches = min(r // self.batch_size for r in rank_rows)
        else:
            self._num_batches = min(-(-r // self.batch_size) for r in rank_rows)
        mine = rank_rows[self.rank]
        self._num_rows = min(mine, self._num_batches * self.batch_size)
        if self.world_size > 1 and min(rank_rows) == 0:
            raise LoaderError(
                f"{len(units)} non-empty row group(s) cannot feed {self.world_size} ranks: some rank "
                f"would get no data; write smaller row groups or more files")

    # ---- public ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    @property
    def num_rows(self) -> int:
        """Rows this rank yields per epoch (sum of its batch sizes)."""
        return self._num_rows

    @property
    def total_rows(self) -> int:
        """Rows in all files (after ``filters``), over all ranks."""
        return sum(self._rank_rows)

    @property
    def num_row_groups(self) -> int:
        """Row groups (after ``filters``) assigned to this rank."""
        return len(self._assignment[self.rank])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        source = self._batches(self.epoch)
        if self.prefetch_batches == 0:
            return source
        return self._prefetched(source, self.prefetch_batches)

    # ---- sharding -------------------------------------------------------------------------
    @staticmethod
    def _assign(units: Sequence[_Unit], world_size: int) -> list[list[_Unit]]:
        """Largest row group first, to the rank with the fewest rows (ties: lowest rank)."""
        parts: list[list[_Unit]] = [[] for _ in range(world_size)]
        load = [0] * world_size
        for u in sorted(units, key=lambda u: (-u.num_rows, u.index)):
            r = min(range(world_size), key=lambda i: (load[i], i))
            parts[r].append(u)
            load[r] += u.num_rows
        for p in parts:
            p.sort(key=lambda u: u.index)      # file order within a rank
        return parts

    # ---- reading --------------------------------------------------------------------------
    @staticmethod
    def _as_expression(filters: Any) -> Optional[pc.Expression]:
        if filters is None:
            return None
        if isinstance(filters, pc.Expression):
            return filters
        return pq.filters_to_expression(filters)

    def _fragment(self, fi: int, rg: int):
        import pyarrow.dataset as ds
        fs, local = _resolve(self.files[fi])
        if fs is None:
            fs = pafs.LocalFileSystem()
        return ds.ParquetFileFormat().make_fragment(local, filesystem=fs, row_groups=[rg])

    def _read(self, unit: _Unit, files: dict) -> dict[str, np.ndarray]:
        path = self.files[unit.file]
        names = [c.name for c in self._cols]
        try:
            if self._filter is not None:
                table = self._fragment(unit.file, unit.row_group).to_table(
                    columns=names, filter=self._filter, use_threads=self.use_threads)
            else:
                opened = files.get(unit.file)
                if opened is None:
                    _close_all(files)          # keep one file open at a time
                    fs, local = _resolve(path)
                    handle = None if fs is None else fs.open_input_file(local)
                    pf = pq.ParquetFile(local if handle is None else handle,
                                        metadata=self._metadata[unit.file],
                                        memory_map=handle is None, pre_buffer=True)
                    opened = files[unit.file] = (pf, handle)
                pf = opened[0]
                table = pf.read_row_group(unit.row_group, columns=names, use_threads=self.use_threads)
        except (OSError, pa.ArrowException) as exc:
            raise LoaderError(f"cannot read row group {unit.row_group} of {path}: {exc}") from exc
        if unit.stop is not None:
            expected = self._metadata[unit.file].row_group(unit.row_group).num_rows
            if table.num_rows != expected:
                raise LoaderError(f"row group {unit.row_group} of {path} has {table.num_rows} rows, its "
                                  f"footer said {expected}: was the file rewritten while training?")
            table = table.slice(unit.start, unit.stop - unit.start)
        if table.num_rows != unit.num_rows:
            raise LoaderError(
                f"row group {unit.row_group} of {path} has {table.num_rows} rows, its footer said "
                f"{unit.num_rows}: was the file rewritten while training?")
        where = f"row group {unit.row_group} of {path}"
        return {c.name: _convert(c, table.column(c.name), where) for c in self._cols}

    def _assemble(self, chunks: list[dict[str, np.ndarray]], total: int,
                  rng: Optional[np.random.Generator]) -> dict[str, np.ndarray]:
        """One fresh buffer per column from ``chunks``; with ``rng``, rows permuted."""
        perm = rng.permutation(total) if rng is not None else None
        out = {}
        for c in self._cols:
            parts = [ch[c.name] for ch in chunks]
            if perm is not None:
                src = parts[0] if len(parts) == 1 else np.concatenate(parts)
                out[c.name] = np.take(src, perm, axis=0)     # gather: fast for [N, L] too
            else:
                out[c.name] = np.concatenate(parts)          # a copy: batches never alias Arrow
        return out

    def _batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        remaining = self._num_batches
        if remaining == 0:
            return
        bs = self.batch_size
        units = list(self._assignment[self.rank])
        rng = None
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence(
                [self.seed % (1 << 64), epoch % (1 << 64), self.rank]))
            units = [units[i] for i in rng.permutation(len(units))]
            target = max(self.shuffle_buffer_rows, bs)
        else:
            target = bs
        names = [c.name for c in self._cols]
        open_files: dict = {}
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = 0

        def flush(last: bool):
            nonlocal pending, pending_rows, remaining
            buf = self._assemble(pending, pending_rows, rng)
            n_full = pending_rows // bs
            rest = pending_rows - n_full * bs
            emit_short = bool(rest) and last and not self.drop_last
            n_emit = min(n_full + emit_short, remaining)
            if n_emit:
                # one split per column (views); per batch only a dict is built
                cut = min(pending_rows, n_emit * bs)
                splits = [torch.from_numpy(buf[k][:cut]).split(bs) for k in names]
                for i in range(n_emit):
                    yield {k: sp[i] for k, sp in zip(names, splits)}
                remaining -= n_emit
                del splits
            if emit_short:
                rest = 0
            # the short tail is copied so that this buffer is freed with its last batch
            pending = [{k: v[n_full * bs:].copy() for k, v in buf.items()}] if rest and remaining else []
            pending_rows = rest if remaining else 0

        try:
            for unit in units:
                pending.append(self._read(unit, open_files))
                pending_rows += unit.num_rows
                if pending_rows >= target:
                    yield from flush(last=False)
                    if remaining == 0:
                        return
            if pending_rows and remaining > 0:
                yield from flush(last=True)
        finally:
            _close_all(open_files)

    # ---- prefetch -------------------------------------------------------------------------
    @staticmethod
    def _prefetched(source: Iterator, size: int) -> Iterator[dict[str, torch.Tensor]]:
        q: queue.Queue = queue.Queue(maxsize=size)
        stop = threading.Event()
        thread = threading.Thread(target=_producer, args=(source, q, stop),
                                  name="ArrowBatchLoader-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = q.get(timeout=1.0)
                except queue.Empty:
                    if not thread.is_alive() and q.empty():
                        raise RuntimeError("ArrowBatchLoader: the prefetch thread died without a word")
                    continue
                if item is _DONE:
                    return
                if isinstance(item, _Raised):
                    raise item.exc             # keeps the reader thread's traceback
                yield item
        finally:
            stop.set()
            while True:                        # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            if thread is not threading.current_thread():
                thread.join(timeout=10.0)

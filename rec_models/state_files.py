"""Small files beside the tables and runs (the feature spec, run records, run states,
reports): written whole or not at all, read back leniently, so that a crash never leaves a
torn file that stops the rerun.

The feature spec sits beside the tables, so it takes the warehouse's URIs too
(``write_bytes_atomic`` / ``read_bytes`` / ``file_exists``): a local path, ``dbfs:/...``
through Databricks' ``/dbfs`` mount of DBFS (what a cluster's driver and executors all see),
or a ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``abfs[s]://``, ``hdfs://``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import Callable, Optional

log = logging.getLogger(__name__)

URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")   # s3:, dbfs:, abfss:, ... (2+ letters: not C:)
DBFS_MOUNT = "/dbfs"   # where Databricks mounts DBFS on every node of a cluster


def write_json_atomic(path: str, payload: dict, default: Optional[Callable] = None) -> None:
    """``path`` holds ``payload`` whole or keeps what it held: a temp file in the same
    folder, then os.replace (atomic on one filesystem). ``default``: json.dump's, for values
    JSON has no type for (none: such a value is a TypeError, and ``path`` is left as it was)."""
    write_bytes_atomic(path, json.dumps(payload, indent=2, default=default).encode())


def read_json_object(path: str, what: str) -> Optional[dict]:
    """The JSON object in ``path``; None when the file is missing, unreadable or not an
    object (an unreadable one is warned about, naming ``what`` it should have been)."""
    try:
        value = json.loads(read_bytes(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable %s %s: %s", what, path, exc)
        return None
    return value if isinstance(value, dict) else None


def is_uri(value: str) -> bool:
    """``dbfs:/x``, ``s3://b/x``: a location with a scheme, never joined onto the cwd."""
    return URI_SCHEME.match(value) is not None


def local_path(uri: str) -> Optional[str]:
    """The local path ``uri`` names (``dbfs:/x`` -> ``/dbfs/x``), or None for a URI that
    only a ``pyarrow.fs`` filesystem reaches."""
    if uri.startswith("dbfs:"):
        return f"{DBFS_MOUNT}/{uri[len('dbfs:'):].lstrip('/')}"
    return None if is_uri(uri) else os.path.abspath(uri)


def _remote(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)   # (filesystem, path); an unknown scheme raises, naming it


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """``uri`` holds ``data`` whole or keeps what it held: locally a temp file then
    os.replace; on an object store one PUT (readers see the old object or the new)."""
    path = local_path(uri)
    if path is None:
        fs, remote = _remote(uri)
        parent = remote.rsplit("/", 1)[0] if "/" in remote else ""
        if parent:
            fs.create_dir(parent, recursive=True)   # a no-op on object stores, needed on HDFS
        with fs.open_output_stream(remote) as out:
            out.write(data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_bytes(uri: str) -> bytes:
    """The bytes at ``uri``; FileNotFoundError when there is no file."""
    path = local_path(uri)
    if path is not None:
        with open(path, "rb") as fh:
            return fh.read()
    fs, remote = _remote(uri)
    if not file_exists(uri):
        raise FileNotFoundError(uri)
    with fs.open_input_stream(remote) as fh:
        return fh.read()


def file_exists(uri: str) -> bool:
    path = local_path(uri)
    if path is not None:
        return os.path.isfile(path)
    import pyarrow.fs as pafs

    fs, remote = _remote(uri)
    return fs.get_file_info(remote).type == pafs.FileType.File

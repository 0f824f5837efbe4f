"""Small JSON state files (run records, run states, reports): written whole or not at all,
read back leniently, so that a crash never leaves a torn file that stops the rerun."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Callable, Optional

log = logging.getLogger(__name__)


def write_json_atomic(path: str, payload: dict, default: Optional[Callable] = None) -> None:
    """``path`` holds ``payload`` whole or keeps what it held: a temp file in the same
    folder, then os.replace (atomic on one filesystem). ``default``: json.dump's, for values
    JSON has no type for (none: such a value is a TypeError, and ``path`` is left as it was)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, default=default)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json_object(path: str, what: str) -> Optional[dict]:
    """The JSON object in ``path``; None when the file is missing, unreadable or not an
    object (an unreadable one is warned about, naming ``what`` it should have been)."""
    try:
        with open(path) as fh:
            value = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable %s %s: %s", what, path, exc)
        return None
    return value if isinstance(value, dict) else None

"""The errors a user can act on. A job exits with code 2 and the error's one-line message,
which names the key, value, file, table or column, without a traceback. Any other
exception is a bug: exit code 1 with its traceback (``jobs/_common.py``).

These classes live apart from ``rec_models.config`` so that every layer can raise them,
the spec, the loaders and ETL included. ``rec_models.config`` re-exports them.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a key, a value, a file, an input table), not a bug."""


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message names it."""


class InputNotFoundError(UserError, FileNotFoundError):
    """An input the job reads (a checkpoint, a bundle, the spec, a table) is not there; the message names it."""


class BadInputError(UserError, ValueError):
    """An input (a file, a table) is there but unusable: empty, truncated, malformed; the message names it."""

"""Catalog tables: a Delta table at a path, registered under a name with comments and properties.

The path stays the table's identity (every reader of this project opens it by path); the
catalog adds the name downstream users query (``SELECT ... FROM recsys.user_embeddings``,
or ``main.recsys.user_embeddings`` in Unity Catalog) and describes it. Comments and
properties live in the Delta log itself (table description, configuration, column
metadata), so any catalog that registers the location shows them.

Registration needs a session with native Delta (Delta's catalog); the caller checks
``delta_io.has_native_delta`` first. Each change is one metadata commit, made only when
something differs: a registration that changes nothing commits nothing.
"""
from __future__ import annotations

import logging
import os
import urllib.parse
from typing import Optional

from rec_models.config import ConfigError, is_uri

log = logging.getLogger(__name__)


def quote(name: str) -> str:
    """``a.b.c`` -> ```a`.`b`.`c```` (each part a plain identifier, validated by the conf)."""
    return ".".join(f"`{part}`" for part in name.split("."))


def _literal(text: str) -> str:
    return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _same_location(a: str, b: str) -> bool:
    def norm(uri: str) -> str:
        uri = uri.rstrip("/")
        if uri.startswith("file:"):
            uri = urllib.parse.unquote(uri[len("file:"):])
            uri = "/" + uri.lstrip("/")
        return uri if is_uri(uri) else os.path.abspath(uri)
    return norm(a) == norm(b)


def register_table(spark, name: str, uri: str, comment: str, properties: dict[str, str],
                   column_comments: Optional[dict[str, str]] = None) -> str:
    """Register the Delta table at ``uri`` as ``name`` (external table), then set its
    comment, ``properties`` and ``column_comments`` where they differ. Returns ``name``.

    A name already registered at another location is a ConfigError naming both: the
    name is not silently moved to a different table."""
    namespace = name.rsplit(".", 1)[0]
    spark.sql(f"CREATE SCHEMA IF NOT EXISTS {quote(namespace)}")
    if spark.catalog.tableExists(name):
        location = spark.sql(f"DESCRIBE DETAIL {quote(name)}").first()["location"]
        if not _same_location(location, uri):
            raise ConfigError(f"catalog table {name} is registered at {location}, not at {uri}: drop it "
                              f"(DROP TABLE {name}; an external table's files stay) or write to another "
                              "warehouse.schema / warehouse.catalog")
    else:
        spark.sql(f"CREATE TABLE IF NOT EXISTS {quote(name)} USING DELTA LOCATION {_literal(uri)}")
        log.info("registered Delta table %s as %s", uri, name)
    current = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES {quote(name)}").collect()}
    current_comment = next((r["data_type"] for r in spark.sql(f"DESCRIBE TABLE EXTENDED {quote(name)}").collect()
                            if r["col_name"] == "Comment"), None)
    wanted = {k: str(v) for k, v in properties.items() if current.get(k) != str(v)}
    if comment != current_comment:
        wanted["comment"] = comment
    if wanted:   # one commit: Delta's ALTER sets the description from 'comment' and the rest as configuration
        pairs = ", ".join(f"{_literal(k)} = {_literal(v)}" for k, v in wanted.items())
        spark.sql(f"ALTER TABLE {quote(name)} SET TBLPROPERTIES ({pairs})")
    if column_comments:
        fields = {f.name: f.metadata.get("comment") for f in spark.table(name).schema}
        changes = [f"`{c}` COMMENT {_literal(text)}" for c, text in column_comments.items()
                   if c in fields and fields[c] != text]
        if changes:
            spark.sql(f"ALTER TABLE {quote(name)} ALTER COLUMN {', '.join(changes)}")
    return name

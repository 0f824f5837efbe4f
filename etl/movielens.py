"""Readers for MovieLens as GroupLens ships it and as RecBole's atomic files.

GroupLens (F. M. Harper and J. A. Konstan, "The MovieLens Datasets: History and Context",
ACM TiiS 2015). Files are Latin-1:

- 100K: ``u.data`` (tab: user, item, rating, timestamp), ``u.user`` (``|``: user, age,
  gender, occupation, zip), ``u.item`` (``|``: item, title, release date, video release
  date, IMDb URL, 19 genre flags).
- 1M: ``ratings.dat`` (``::``: user, movie, rating, timestamp), ``users.dat`` (user,
  gender, age code, occupation code, zip), ``movies.dat`` (movie, "Title (year)",
  ``|``-joined genres).

RecBole atomic files (``*.inter``, ``*.user``, ``*.item``): tab-separated with a header of
``name:type``; ``token`` and ``token_seq`` (space-separated) columns are strings, ``float``
columns doubles.

Every reader returns the same canonical columns for a table slot, so one dataset conf
serves a format: events ``user_id, item_id, rating, timestamp``; users ``user_id, age,
gender, occupation, zip_code``; items ``item_id, title, release_year, genres`` (GroupLens,
``|``-joined) or RecBole's own names (``movie_title, release_year, class``, space-joined).
A path may name the file, or the folder that holds the format's standard file names.
"""
from __future__ import annotations

import glob
import os

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from rec_models.config import BadInputError

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")

FILES = {
    "movielens_100k": {"events": "u.data", "users": "u.user", "items": "u.item"},
    "movielens_1m": {"events": "ratings.dat", "users": "users.dat", "items": "movies.dat"},
    "recbole": {"events": "*.inter", "users": "*.user", "items": "*.item"},
}
_SEPARATORS = {"u.data": "\t", "u.user": "|", "u.item": "|"}

_EVENTS = [("user_id", "string"), ("item_id", "string"), ("rating", "double"), ("timestamp", "long")]
_SCHEMAS = {
    "u.data": _EVENTS,
    "ratings.dat": _EVENTS,
    "u.user": [("user_id", "string"), ("age", "int"), ("gender", "string"), ("occupation", "string"),
               ("zip_code", "string")],
    "users.dat": [("user_id", "string"), ("gender", "string"), ("age", "int"), ("occupation", "string"),
                  ("zip_code", "string")],
    "u.item": [("item_id", "string"), ("title", "string"), ("release_date", "string"),
               ("video_release_date", "string"), ("imdb_url", "string")] + [(f"__g{i}", "int") for i in range(19)],
    "movies.dat": [("item_id", "string"), ("title", "string"), ("genres", "string")],
}
_RECBOLE_TYPES = {"token": "string", "token_seq": "string", "float": "double", "float_seq": "string"}


class MovieLensFormatError(BadInputError):
    """The file is not in the format its dataset conf says (message names file and column)."""


def resolve_file(path: str, fmt: str, table: str) -> str:
    """``path`` itself, or the format's standard file for ``table`` inside the folder ``path``."""
    if not os.path.isdir(path):
        return path
    pattern = FILES[fmt][table]
    found = sorted(glob.glob(os.path.join(path, pattern)))
    if len(found) != 1:
        raise MovieLensFormatError(
            f"{fmt} {table}: expected one file matching {pattern} in {path}, found {len(found) or 'none'}"
            f"{': ' + ', '.join(os.path.basename(f) for f in found) if found else ''}")
    return found[0]


def read_movielens(spark: SparkSession, path: str, fmt: str, table: str) -> DataFrame:
    """One table slot (events / users / items) of a MovieLens release in format ``fmt``."""
    if fmt not in FILES:
        raise MovieLensFormatError(f"unknown MovieLens format '{fmt}'; known: {', '.join(FILES)}")
    if table not in FILES[fmt]:
        raise MovieLensFormatError(f"{fmt} has no {table} table; it has: {', '.join(FILES[fmt])}")
    file = resolve_file(path if "://" in path else os.path.abspath(path), fmt, table)
    if not os.path.exists(file) and "://" not in file:
        raise MovieLensFormatError(f"{fmt} {table}: no file at {file}")
    if fmt == "recbole":
        return _read_recbole(spark, file)
    name = FILES[fmt][table]
    df = _read_delimited(spark, file, name, _SEPARATORS.get(name, "::"))
    if name == "u.item":
        flags = [F.when(F.col(f"__g{i}") == 1, F.lit(g)) for i, g in enumerate(ML100K_GENRES)]
        df = df.select("item_id", "title",
                       _year(F.col("release_date"), r"(\d{4})\s*$").alias("release_year"),
                       F.concat_ws("|", *flags).alias("genres"))
    elif name == "movies.dat":
        df = df.select("item_id", F.trim(F.regexp_replace("title", r"\s*\(\d{4}\)\s*$", "")).alias("title"),
                       _year(F.col("title"), r"\((\d{4})\)\s*$").alias("release_year"),
                       "genres")
    elif name == "users.dat":
        df = df.select("user_id", "age", "gender", "occupation", "zip_code")
    return df


def _year(text, pattern: str):
    """The 4-digit year ``pattern`` captures, null when absent (no cast error under ANSI)."""
    return F.when(text.rlike(pattern), F.regexp_extract(text, pattern, 1).cast("int"))


def _read_delimited(spark: SparkSession, file: str, name: str, sep: str) -> DataFrame:
    schema = T.StructType([T.StructField(c, T._parse_datatype_string(t)) for c, t in _SCHEMAS[name]])
    # quote "" turns quoting off: titles hold stray double quotes; FAILFAST names a bad line
    df = (spark.read.schema(schema).option("sep", sep).option("header", "false").option("quote", "")
          .option("encoding", "ISO-8859-1").option("mode", "FAILFAST").csv(file))
    return df


def _read_recbole(spark: SparkSession, file: str) -> DataFrame:
    raw = (spark.read.option("sep", "\t").option("header", "true").option("quote", "")
           .option("encoding", "UTF-8").csv(file))
    columns = []
    for header in raw.columns:
        name, _, kind = header.partition(":")
        if kind not in _RECBOLE_TYPES:
            raise MovieLensFormatError(
                f"{file}: column header '{header}' is not RecBole's name:type "
                f"(types: {', '.join(_RECBOLE_TYPES)})")
        columns.append(F.col(f"`{header}`").cast(_RECBOLE_TYPES[kind]).alias(name))
    return raw.select(*columns)


"""Dirty data and input faults (issue 11): each is an error naming table / column / file
with exit code 2 and nothing written, or a declared policy whose effect is counted in the
build report. Tiny hand-made tables; each case is one row of a table where it fits."""
from __future__ import annotations

import copy
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from etl import delta_io
from etl.build import build_features
from etl.sources import InputError
from rec_models.config import ConfigError, load_config
from rec_models.spec import PAD_INDEX

DAY = 86400
T0 = 1_700_000_000
FEATURE_TABLES = ("samples", "user_features", "item_features")
EVENT_COLUMNS = {"user_id": "uid", "item_id": "iid", "timestamp": "ts", "label": "clicked", "dwell_time": "dwell"}
# the default (synthetic) spec without the point-in-time features, for data without time
TIMELESS_FEATURES = [
    {"name": "user_id", "role": "user", "kind": "categorical", "source": "users"},
    {"name": "age_group", "role": "user", "kind": "categorical", "source": "users"},
    {"name": "activity", "role": "user", "kind": "numeric", "source": "users", "transform": "log_standard"},
    {"name": "item_id", "role": "item", "kind": "categorical", "source": "items"},
    {"name": "price", "role": "item", "kind": "numeric", "source": "items", "transform": "bucketize",
     "num_buckets": 4},
    {"name": "label", "role": "label", "kind": "label", "source": "events"},
]


def _tables(n_users=10, n_items=16, n_events=240, seed=0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    users = pd.DataFrame({"uid": [f"u{i}" for i in range(n_users)], "age": rng.integers(18, 60, n_users).astype(str),
                          "country": rng.choice(["fr", "de"], n_users),
                          "activity": rng.lognormal(0.0, 1.0, n_users)})
    items = pd.DataFrame({"iid": [f"i{i}" for i in range(n_items)], "category": [f"c{i % 3}" for i in range(n_items)],
                          "tags": ["a|b", "b", "c"] * (n_items // 3) + ["a"] * (n_items % 3),
                          "price": rng.lognormal(1.0, 0.5, n_items)})
    ev = pd.DataFrame({"uid": rng.choice(users.uid, n_events), "iid": rng.choice(items.iid, n_events),
                       "ts": T0 + rng.integers(0, 20 * DAY // 600, n_events) * 600})
    ev["clicked"] = rng.integers(0, 2, n_events)
    ev["dwell"] = np.where(ev.clicked == 1, rng.lognormal(3, 1, n_events), np.nan)
    # the synthetic spec's post-impression privileged column: logged for every impression
    ev["watch_seconds"] = rng.lognormal(1.5, 0.5, n_events)
    # one row per (user, item, time): duplicates are only those a case adds
    ev = ev.drop_duplicates(["uid", "iid", "ts"]).reset_index(drop=True)
    return {"events": ev, "users": users, "items": items}


def _write(tmp_path, tables: dict[str, pd.DataFrame], keep_nan=()) -> dict[str, str]:
    """Parquet files; pandas NaN becomes null except in the ``(table, column)`` of keep_nan."""
    paths = {}
    for name, df in tables.items():
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({c: pa.array(df[c].to_numpy(), from_pandas=(name, c) not in keep_nan)
                                 for c in df.columns}), paths[name])
    return paths


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _conf_file(tmp_path, paths, data: dict | None = None, event_columns=None) -> str:
    """A --conf YAML: this test's warehouse and tables over the default (synthetic) spec."""
    source = {"type": "tables",
              "events": {"path": paths["events"], "columns": event_columns or EVENT_COLUMNS},
              "users": {"path": paths["users"], "columns": {"user_id": "uid", "age_group": "age",
                                                            "region": "country"}},
              "items": {"path": paths["items"], "columns": {"item_id": "iid"}}}
    conf = {"warehouse": {"root": str(tmp_path / "wh")},
            "data": _merge({"source": source, "history_lookback": 1000}, data or {})}
    path = tmp_path / "conf.yaml"
    path.write_text(yaml.safe_dump(conf))
    return str(path)


def _nothing_written(cfg) -> bool:
    return not any(delta_io.table_exists(cfg.warehouse.uri(t)) for t in FEATURE_TABLES) \
        and not os.path.exists(cfg.warehouse.spec_path)


def _run_job(conf: str, capsys) -> tuple[int, str]:
    """jobs/build_features.py in this process: (exit code, stderr)."""
    from jobs._common import run
    from jobs.build_features import __doc__ as doc, body

    capsys.readouterr()
    rc = run(doc, body, argv=["--conf", conf])
    return rc, capsys.readouterr().err


def _set(table, column, index, value):
    def mutate(t):
        df = t[table]
        if isinstance(value, str):   # as a CSV reader infers it: the whole column is text
            df[column] = df[column].astype(str)
        df.loc[index, column] = value
    return mutate


def _no_time(t):
    t["events"] = t["events"].drop(columns=["ts"])


def _double_first_rows(t):
    t["events"] = pd.concat([t["events"], t["events"].iloc[:10]], ignore_index=True)


_NO_TS = {k: v for k, v in EVENT_COLUMNS.items() if k != "timestamp"}

# (case, mutate the tables, data conf, NaN kept in (table, column), event column mapping,
#  fragments the message must name, fragments it must not contain)
FAULTS = [
    ("inf item price", _set("items", "price", 3, np.inf), {}, (), None,
     ["items table", "'price'", "1 non-finite", "1 inf", "data.non_finite=missing"], []),
    ("-inf user activity", _set("users", "activity", 0, -np.inf), {}, (), None,
     ["users table", "'activity'", "1 -inf"], []),
    ("NaN item price", _set("items", "price", 5, np.nan), {}, {("items", "price")}, None,
     ["items table", "'price'", "1 NaN"], []),
    ("inf dwell", _set("events", "dwell", 2, np.inf), {}, (), None,
     ["events table", "1 rows with infinite dwell_time"], []),
    ("string in numeric column", _set("items", "price", 4, "n/a"), {}, (), None,
     ["items table", "'price'", "must be numeric, got string", "'n/a'", "casts.price"], ["CAST_INVALID_INPUT"]),
    ("missing input path", None, {"source": {"users": {"path": "/nonexistent/users_dir"}}}, (), None,
     ["users table", "/nonexistent/users_dir", "does not exist"], ["at org.apache", "Traceback"]),
    ("duplicate events, policy error", _double_first_rows, {"duplicates": "error"}, (), None,
     ["events table", "10 duplicate row(s)", "(user_id, item_id, timestamp)"], []),
    ("no time column, time split", _no_time, {}, (), _NO_TS,
     ["events table", "no time column 'timestamp'", "data.split.scheme=random"], ["(map them in"]),
    ("no time column, point-in-time features", _no_time, {"split": {"scheme": "random"}}, (), _NO_TS,
     ["no time column 'timestamp'", "hist_item_ids", "ucat_clicks_7d", "uitem_impressions"], []),
    ("unknown role", None, {"feature_spec": {"features": TIMELESS_FEATURES[:4] + [
        {"name": "price", "role": "teacher", "kind": "numeric", "source": "items"}] + TIMELESS_FEATURES[5:]}},
     (), None, ["features[price].role"], ["features.4"]),
]


@pytest.mark.parametrize("case, mutate, data, keep_nan, event_columns, named, not_named", FAULTS,
                         ids=[f[0] for f in FAULTS])
def test_fault_is_named_exits_2_and_writes_nothing(spark, tmp_path, capsys, case, mutate, data, keep_nan,
                                                   event_columns, named, not_named):
    tables = _tables(n_events=120)
    if mutate is not None:
        mutate(tables)
    conf = _conf_file(tmp_path, _write(tmp_path, tables, keep_nan), data, event_columns)
    rc, err = _run_job(conf, capsys)
    assert rc == 2, err
    for fragment in named:
        assert fragment in err, (case, fragment, err)
    for fragment in not_named:
        assert fragment not in err, (case, fragment, err)
    assert not [l for l in err.splitlines() if l.lstrip().startswith(("at org.", "at java.", "Traceback"))], err
    # the library raises the user error itself (jobs map it to exit code 2)
    if case == "unknown role":
        with pytest.raises(ConfigError):
            load_config(files=[conf])
        return
    cfg = load_config(files=[conf])
    with pytest.raises(InputError):
        build_features(spark, cfg)
    assert _nothing_written(cfg)


def test_non_finite_as_missing_and_duplicates_dropped_are_counted(spark, tmp_path):
    tables = _tables()
    n_events = len(tables["events"])
    tables["items"].loc[3, "price"] = np.inf
    act = tables["users"].activity.copy()
    act[0], act[1], act[2], act[3] = -np.inf, -2.0, -0.5, None
    tables["users"]["activity"] = act
    _double_first_rows(tables)                                 # default data.duplicates=drop
    cfg = load_config(files=[_conf_file(tmp_path, _write(tmp_path, tables), {"non_finite": "missing"})])
    result = build_features(spark, cfg)
    rep = result.report
    assert rep["numeric"]["items"]["price"] == {"non_finite": 1, "imputed": 1, "clamped": 0}
    assert rep["numeric"]["users"]["activity"] == {"non_finite": 1, "imputed": 2, "clamped": 2}
    assert rep["duplicates"] == {"policy": "drop", "key": ["user_id", "item_id", "timestamp"],
                                 "duplicates": 10, "dropped": 10}
    assert sum(result.counts.values()) == n_events
    # statistics stay finite; the infinite price is missing (bucket 0), the rest are not
    activity = result.spec.get("activity")
    assert np.isfinite(activity.mean) and np.isfinite(activity.std)
    items = delta_io.read_arrow(cfg.warehouse.uri("item_features")).to_pandas().set_index("item_key")
    assert items.loc["i3", "price"] == PAD_INDEX and (items.drop(index="i3").price > PAD_INDEX).all()
    users = delta_io.read_arrow(cfg.warehouse.uri("user_features")).to_pandas()
    assert np.isfinite(users.activity).all()
    samples = delta_io.read_arrow(cfg.warehouse.uri("samples")).to_pandas()
    assert not samples.duplicated(["user_key", "item_key", "timestamp"]).any()
    for column in ("activity", "ucat_clicks_7d", "ucat_ctr_7d", "ucat_dwell_7d", "uitem_impressions"):
        assert np.isfinite(samples[column]).all(), column


def test_duplicates_kept_when_asked(spark, tmp_path):
    tables = _tables(n_events=120)
    n_events = len(tables["events"])
    _double_first_rows(tables)
    cfg = load_config(files=[_conf_file(tmp_path, _write(tmp_path, tables), {"duplicates": "keep"})])
    result = build_features(spark, cfg)
    assert sum(result.counts.values()) == n_events + 10
    assert result.report["duplicates"]["duplicates"] == 10 and result.report["duplicates"]["dropped"] == 0


def test_sampled_negatives_never_hit_the_users_items(spark, tmp_path):
    """Dense implicit data (each user saw half the catalogue): zero negatives that the user
    interacted with in the negative's split or an earlier one, and every quota filled."""
    rng = np.random.default_rng(5)
    tables = _tables(n_users=8, n_items=12, n_events=10)
    rows = []
    for u in tables["users"].uid:
        liked = rng.choice(tables["items"].iid, 6, replace=False)
        for k in range(24):
            rows.append((u, liked[k % 6], T0 + int(rng.integers(0, 20 * DAY))))
    ev = pd.DataFrame(rows, columns=["uid", "iid", "ts"]).drop_duplicates(["uid", "iid", "ts"])
    ev["dwell"] = 10.0
    ev["watch_seconds"] = 5.0
    tables["events"] = ev.reset_index(drop=True)
    per_positive = 3
    conf = _conf_file(tmp_path, _write(tmp_path, tables),
                      {"source": {"implicit": True}, "negatives": {"per_positive": per_positive},
                       "split": {"scheme": "per_user", "valid_fraction": 0.2, "test_fraction": 0.2}},
                      {k: v for k, v in EVENT_COLUMNS.items() if k != "label"})
    result = build_features(spark, load_config(files=[conf]))
    samples = delta_io.read_arrow(load_config(files=[conf]).warehouse.uri("samples")).to_pandas()
    pos, neg = samples[samples.label == 1], samples[samples.label == 0]
    assert len(pos) == len(ev) and len(neg) == per_positive * len(ev)
    assert result.report["negatives"] == {"per_positive": 3, "requested": 3 * len(ev), "sampled": 3 * len(ev),
                                          "short": 0, "excluded": result.report["negatives"]["excluded"]}
    rank = {"train": 0, "valid": 1, "test": 2}
    first = pos.assign(r=pos.split.map(rank)).groupby(["user_key", "item_key"]).r.min()
    hit = neg.assign(r=neg.split.map(rank)).join(first.rename("first"), on=["user_key", "item_key"], how="inner")
    assert (hit.first > hit.r).all(), hit[hit.first <= hit.r]      # zero collisions
    assert set(neg.split) == {"train", "valid", "test"}


@pytest.mark.parametrize("random_by", ["global", "per_user"])
def test_random_split_without_time(spark, tmp_path, random_by):
    tables = _tables(n_events=200)
    _no_time(tables)
    tables["events"] = tables["events"].drop_duplicates(["uid", "iid"]).reset_index(drop=True)
    conf = _conf_file(tmp_path, _write(tmp_path, tables),
                      {"split": {"scheme": "random", "random_by": random_by, "test_fraction": 0.2},
                       "feature_spec": {"features": TIMELESS_FEATURES}}, _NO_TS)
    cfg = load_config(files=[conf])
    result = build_features(spark, cfg)
    samples = delta_io.read_arrow(cfg.warehouse.uri("samples")).to_pandas()
    assert len(samples) == len(tables["events"]) and set(samples.split) == {"train", "valid", "test"}
    assert samples.timestamp.isna().all()
    assert result.spec.split["scheme"] == "random" and result.spec.split_times is None
    if random_by == "per_user":   # each user's own 20%: every user with >= 5 events is tested
        n = samples.groupby("user_key").size()
        tested = set(samples[samples.split == "test"].user_key)
        assert tested == set(n[n >= 5].index)
    # seeded: the same split again
    again = build_features(spark, cfg)
    assert again.counts == result.counts


def test_dataset_given_as_a_path(tmp_path):
    from rec_models.config import CONF_DIR

    raw = yaml.safe_load((CONF_DIR / "dataset" / "synthetic.yaml").read_text())
    raw["data"]["name"] = "mine"
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(dataset=str(path)).data.name == "mine"
    assert load_config(dataset="synthetic").data.name == "synthetic"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(dataset=str(tmp_path / "nope.yaml"))


def test_pfd_without_privileged_features_warns():
    from orchestration.pipeline import method_warnings

    cfg = load_config()
    public = cfg.spec.model_copy(update={"features": tuple(f for f in cfg.spec.features
                                                           if f.role.value != "privileged")})
    warnings = method_warnings(public, "pfd")
    assert len(warnings) == 1 and "no privileged feature" in warnings[0]
    assert method_warnings(cfg.spec, "pfd") == [] and method_warnings(public, "dssm") == []

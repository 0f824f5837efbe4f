"""ETL on small hand-made tables: point-in-time correctness, encodings, splits, bad input."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl import delta_io
from etl.build import build_features
from etl.sources import InputError
from rec_models.config import load_config
from rec_models.spec import OOV_INDEX, PAD_INDEX, FeatureSpec

DAY = 86400
T0 = 1_700_000_000


def _tables(tmp_path, n_events=600, seed=0, user_ids_int=False):
    rng = np.random.default_rng(seed)
    users = pd.DataFrame({"uid": [f"u{i}" for i in range(12)], "age": rng.integers(18, 60, 12).astype(str),
                          "country": rng.choice(["fr", "de", "us"], 12)})
    items = pd.DataFrame({"iid": [f"i{i}" for i in range(30)], "category": [f"c{i % 4}" for i in range(30)],
                          "tags": ["a|b", "b", "c|d|e", ""] * 7 + ["a", "b"],
                          "price": rng.lognormal(1.0, 0.5, 30)})
    ev = pd.DataFrame({
        "uid": rng.choice(users.uid, n_events),
        "iid": rng.choice(items.iid[:25], n_events),     # i25..i29 are never seen in events
        # integer seconds with deliberate ties (same second) to test strictness
        "ts": T0 + (rng.integers(0, 20 * DAY // 600, n_events) * 600),
    })
    ev["clicked"] = rng.integers(0, 2, n_events)
    ev["dwell"] = np.where(ev.clicked == 1, rng.lognormal(3, 1, n_events), np.nan)
    # the synthetic spec's post-impression privileged column: logged for every impression
    ev["watch_seconds"] = rng.lognormal(1.5, 0.5, n_events)
    if user_ids_int:
        for df in (users, ev):
            df["uid"] = df["uid"].str[1:].astype(int)
    paths = {}
    for name, df in (("users", users), ("items", items), ("events", ev)):
        paths[name] = str(tmp_path / f"{name}.parquet")
        df.to_parquet(paths[name], index=False)
    return paths, ev, users, items


EVENT_HISTORY = {"name": "hist_shown_ids", "role": "user", "kind": "sequence", "source": "events",
                 "vocab_of": "item_id", "max_len": 8, "history_of": "events"}


def _cfg(tmp_path, paths, extra=(), features=()):
    overrides = [
        f"warehouse.root={tmp_path / 'wh'}",
        "data.source.type=tables",
        f"data.source.events.path={paths['events']}",
        "data.source.events.columns={user_id: uid, item_id: iid, timestamp: ts, label: clicked, dwell_time: dwell}",
        f"data.source.users.path={paths['users']}",
        "data.source.users.columns={user_id: uid, age_group: age, region: country}",
        f"data.source.items.path={paths['items']}",
        "data.source.items.columns={item_id: iid}",
        "data.history_lookback=1000",
        *extra,
    ]
    cfg = load_config(overrides=overrides)
    # the hand-made users table has no 'activity' column: drop it from the spec
    raw = cfg.model_dump(mode="json")
    raw["data"]["feature_spec"]["features"] = [f for f in raw["data"]["feature_spec"]["features"]
                                               if f["name"] != "activity"] + list(features)
    from rec_models.config import validate_config
    return validate_config(raw)


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("etl")
    paths, ev, users, items = _tables(tmp)
    cfg = _cfg(tmp, paths, features=[EVENT_HISTORY])
    result = build_features(spark, cfg)
    samples = delta_io.read_arrow(cfg.warehouse.uri("samples")).to_pandas()
    return cfg, result, samples, ev, users, items


def test_point_in_time_privileged_statistics_match_brute_force(built):
    cfg, result, samples, ev, _, items = built
    cat = dict(zip(items.iid, items.category))
    ev = ev.assign(category=ev.iid.map(cat))
    spec = result.spec
    f_clicks, f_imps = spec.get("ucat_clicks_7d"), spec.get("uitem_impressions")
    got = samples.sort_values(["user_key", "timestamp", "item_key"]).reset_index(drop=True)
    rng = np.random.default_rng(1)
    for idx in rng.choice(len(got), 60, replace=False):
        row = got.iloc[idx]
        u, t, i = row.user_key, row.timestamp, row.item_key
        c = cat[i]
        past = ev[(ev.uid == u) & (ev.category == c) & (ev.ts < t) & (ev.ts >= t - 7 * DAY)]
        clicks = past.clicked.sum()
        expected = (np.log1p(clicks) - f_clicks.mean) / f_clicks.std
        assert row.ucat_clicks_7d == pytest.approx(expected, abs=1e-4), (u, t, i)
        imps = ((ev.uid == u) & (ev.iid == i) & (ev.ts < t)).sum()
        assert row.uitem_impressions == pytest.approx((np.log1p(imps) - f_imps.mean) / f_imps.std, abs=1e-4)


def test_history_holds_only_strictly_earlier_clicks(built):
    cfg, result, samples, ev, _, items = built
    vocab = _item_vocab(samples)
    inverse = {v: k for k, v in vocab.items()}
    max_len = result.spec.get("hist_item_ids").max_len
    for _, row in samples.sample(60, random_state=0).iterrows():
        past = ev[(ev.uid == row.user_key) & (ev.ts < row.timestamp) & (ev.clicked == 1)].sort_values("ts")
        hist = [inverse[x] for x in row.hist_item_ids if x != PAD_INDEX]
        assert len(row.hist_item_ids) == max_len
        assert set(hist) <= set(past.iid)                 # nothing from the same second or later
        assert len(hist) == min(max_len, len(past))
        # the most recent clicks are kept (ties in time may order either way)
        if len(past) > max_len:
            assert set(hist) >= set(past[past.ts > past.ts.iloc[-max_len]].iid)


def test_event_history_holds_every_strictly_earlier_event_clicked_or_not(built):
    cfg, result, samples, ev, _, _ = built
    inverse = {v: k for k, v in _item_vocab(samples).items()}
    max_len = result.spec.get("hist_shown_ids").max_len
    longer = 0
    for _, row in samples.sample(60, random_state=1).iterrows():
        past = ev[(ev.uid == row.user_key) & (ev.ts < row.timestamp)].sort_values("ts")
        hist = [inverse[x] for x in row.hist_shown_ids if x != PAD_INDEX]
        assert set(hist) <= set(past.iid) and len(hist) == min(max_len, len(past))
        longer += len(hist) > len([x for x in row.hist_item_ids if x != PAD_INDEX])
    assert longer > 0   # the non-clicked events are in it: longer than the click history
    # the serving snapshot: events before the user's test start only
    user_table = delta_io.read_arrow(cfg.warehouse.uri("user_features")).to_pandas()
    test_start = samples[samples.split == "test"].timestamp.min()
    for _, row in user_table.sample(10, random_state=0).iterrows():
        before = ev[(ev.uid == row.user_key) & (ev.ts < test_start)]
        hist = [inverse[x] for x in row.hist_shown_ids if x != PAD_INDEX]
        assert set(hist) <= set(before.iid) and len(hist) == min(max_len, len(before))


def test_history_of_is_only_for_sequences():
    from rec_models.spec import Feature

    with pytest.raises(ValueError, match="history_of is for sequences"):
        Feature(name="age_group", role="user", kind="categorical", source="users", history_of="events")


def _item_vocab(samples) -> dict:
    pairs = samples[["item_key", "item_id"]].drop_duplicates()
    assert pairs.item_key.is_unique, "one item key must map to one index"
    return dict(zip(pairs.item_key, pairs.item_id))


def test_numeric_statistics_of_several_features_in_one_pass(spark):
    """etl.encoders.numeric_stats: each feature's statistics, from one aggregation for all
    means and deviations and one quantile job per bucket count, not a job per feature (its
    frame is the point-in-time lineage over every event, computed again by each job)."""
    from etl.encoders import numeric_stats
    from rec_models.spec import Feature

    rng = np.random.default_rng(3)
    data = pd.DataFrame({"a": rng.normal(5, 2, 4000), "b": rng.exponential(3, 4000), "c": rng.uniform(0, 1, 4000),
                         "d": rng.normal(0, 1, 4000), "e": rng.normal(0, 1, 4000)})
    data.loc[::7, "a"] = np.nan   # missing: left out of every statistic
    data.loc[::5, "c"] = np.nan
    df = spark.createDataFrame(data)

    def feature(name, transform, **kw):
        return Feature(name=name, role="user", kind="numeric", source="users", transform=transform, **kw)

    features = [feature("a", "standard"), feature("b", "log_standard"), feature("c", "bucketize", num_buckets=4),
                feature("d", "bucketize", num_buckets=4), feature("e", "none")]
    tracker = spark.sparkContext.statusTracker()
    before = set(tracker.getJobIdsForGroup())
    stats = numeric_stats(df, features)
    jobs = len(set(tracker.getJobIdsForGroup()) - before)
    a, c = data.a.dropna(), data.c.dropna()
    assert stats["a"] == {"mean": pytest.approx(a.mean()), "std": pytest.approx(a.std(ddof=0))}
    assert stats["b"] == {"mean": pytest.approx(np.log1p(data.b).mean()),
                          "std": pytest.approx(np.log1p(data.b).std(ddof=0))}
    assert stats["c"]["boundaries"] == pytest.approx(tuple(np.quantile(c, [0.25, 0.5, 0.75])), abs=5e-3)
    assert stats["d"]["boundaries"] == pytest.approx(tuple(np.quantile(data.d, [0.25, 0.5, 0.75])), abs=2e-2)
    assert stats["e"] == {}
    alone = [numeric_stats(df, [f]) for f in features]
    assert stats == {k: v for one in alone for k, v in one.items()}   # the same as one feature at a time
    assert numeric_stats(df, []) == {}
    # one aggregation and one quantile pass for the four features; one per feature before
    per_feature = len(set(tracker.getJobIdsForGroup()) - before) - jobs
    assert jobs < per_feature, (jobs, per_feature)


def test_time_split_and_encodings(built):
    cfg, result, samples, ev, users, items = built
    order = samples.groupby("split").timestamp.agg(["min", "max"])
    assert order.loc["train", "max"] < order.loc["valid", "min"] <= order.loc["valid", "max"] < order.loc["test", "min"]
    assert len(samples) == len(ev)
    spec = result.spec
    assert set(samples.columns) >= set(f.name for f in spec.features)
    vocab = _item_vocab(samples)
    assert min(vocab.values()) >= 2 and spec.get("item_id").vocab_size == len(items) + 2
    # items never seen in events are still in item_features, with their own index
    item_table = delta_io.read_arrow(cfg.warehouse.uri("item_features")).to_pandas()
    assert set(item_table.item_key) == set(items.iid)
    assert item_table.item_id.is_unique
    # multi-valued tags: padded to max_len with 0; the empty string gives all padding
    tags = np.stack(item_table.tags.to_numpy())
    assert tags.shape == (30, spec.get("tags").max_len)
    empty = item_table[item_table.item_key.isin(items.iid[items.tags == ""])]
    assert all((np.asarray(t) == PAD_INDEX).all() for t in empty.tags)
    # numeric bucketised price: indices in 1..num_buckets
    assert item_table.price.between(1, len(spec.get("price").boundaries) + 1).all()
    # user serving snapshot: one row per user, history only from before the test split
    user_table = delta_io.read_arrow(cfg.warehouse.uri("user_features")).to_pandas()
    assert sorted(user_table.user_key) == sorted(users.uid)
    assert "ucat_clicks_7d" not in user_table.columns and "label" not in user_table.columns
    loaded = FeatureSpec.load(cfg.warehouse.spec_path)
    assert loaded.resolved
    # the recorded cut times are the ones that split the events: a split starts at or after
    # its cut, the split before it ends before it
    times = loaded.split_times
    assert order.loc["train", "max"] < times["valid"] <= order.loc["valid", "min"], (times, order)
    assert order.loc["valid", "max"] < times["test"] <= order.loc["test", "min"], (times, order)


def _expected_per_user_split(ev: pd.DataFrame, valid_fraction: float, test_fraction: float) -> pd.DataFrame:
    """Brute force of the per-user split: (uid, ts) -> split, and each user's test start."""
    rows = []
    for uid, g in ev.groupby("uid"):
        ts = np.sort(g.ts.to_numpy())
        n = len(ts)
        n_test, n_valid = int(np.floor(n * test_fraction)), int(np.floor(n * valid_fraction))
        t_test = ts[n - n_test] if n_test else None
        t_valid = ts[n - n_test - n_valid] if n_test + n_valid else None
        for t in np.unique(ts):
            split = ("test" if t_test is not None and t >= t_test else
                     "valid" if t_valid is not None and t >= t_valid else "train")
            rows.append((uid, t, split, t_test))
    return pd.DataFrame(rows, columns=["uid", "ts", "split", "test_start"])


def test_per_user_split_holds_each_users_last_events(spark, tmp_path):
    from orchestration.artifacts import load_spec

    paths, ev, users, _ = _tables(tmp_path, n_events=600, seed=3)
    cfg = _cfg(tmp_path, paths, ["data.split.scheme=per_user", "data.split.valid_fraction=0.1",
                                 "data.split.test_fraction=0.2"])
    result = build_features(spark, cfg)
    samples = delta_io.read_arrow(cfg.warehouse.uri("samples")).to_pandas()
    expected = _expected_per_user_split(ev, 0.1, 0.2)
    got = samples[["user_key", "timestamp", "split"]].drop_duplicates()
    assert got.groupby(["user_key", "timestamp"]).size().max() == 1, "one user's same-second events split apart"
    merged = expected.merge(got, left_on=["uid", "ts"], right_on=["user_key", "timestamp"], how="outer",
                            suffixes=("_expected", "_got"), indicator=True)
    assert (merged["_merge"] == "both").all()
    assert (merged.split_expected == merged.split_got).all()
    # every user with enough events is in the test split: no cold-start test users
    assert set(samples[samples.split == "test"].user_key) == set(ev.uid)
    # the serving history of each user stops at that user's own test start
    vocab = _item_vocab(samples)
    inverse = {v: k for k, v in vocab.items()}
    max_len = result.spec.get("hist_item_ids").max_len
    user_table = delta_io.read_arrow(cfg.warehouse.uri("user_features")).to_pandas()
    starts = expected.groupby("uid").test_start.first()
    for _, row in user_table.iterrows():
        before = ev[(ev.uid == row.user_key) & (ev.ts < starts[row.user_key]) & (ev.clicked == 1)]
        hist = [inverse[x] for x in row.hist_item_ids if x != PAD_INDEX]
        assert set(hist) <= set(before.iid) and len(hist) == min(max_len, len(before))
    assert result.spec.split_times is None and result.spec.split["scheme"] == "per_user"
    # tables built with one split are refused under a conf that declares another
    with pytest.raises(ValueError, match="data.split"):
        load_spec(_cfg(tmp_path, paths))


def test_rebuild_is_idempotent(spark, built):
    cfg, result, samples, *_ = built
    version = delta_io.table_version(cfg.warehouse.uri("samples"))
    again = build_features(spark, cfg)
    assert delta_io.table_version(cfg.warehouse.uri("samples")) == version + 1
    assert sum(again.counts.values()) == len(samples)


def test_implicit_feedback_samples_negatives(spark, tmp_path):
    paths, ev, *_ = _tables(tmp_path, n_events=300, user_ids_int=True)
    cfg = _cfg(tmp_path, paths, ["data.source.implicit=true", "data.negatives.per_positive=3",
                                 "data.source.events.columns={user_id: uid, item_id: iid, timestamp: ts, dwell_time: dwell}"])
    result = build_features(spark, cfg)
    samples = delta_io.read_arrow(cfg.warehouse.uri("samples")).to_pandas()
    assert len(samples) == 4 * len(ev)
    assert (samples.label == 1).sum() == len(ev)
    assert samples.user_key.str.isdigit().all()          # integer ids arrive as strings
    assert result.spec.get("user_id").vocab_size == 12 + 2


def _no_tables(cfg):
    return not any(delta_io.table_exists(cfg.warehouse.uri(t)) for t in ("samples", "user_features", "item_features")) \
        and not os.path.exists(cfg.warehouse.spec_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda ev: ev.drop(columns=["clicked"]), "mapped column(s) clicked not found"),
    (lambda ev: ev.assign(uid=ev.uid.where(ev.index % 7 != 0, None)), "rows with null user_id"),
    (lambda ev: ev.assign(dwell=ev.dwell.where(ev.index % 5 != 1, -3.0)), "negative dwell_time"),
    (lambda ev: ev.assign(dwell=np.where(ev.index % 9 == 2, np.nan, ev.dwell.fillna(1.0))), "rows with NaN dwell_time"),
    (lambda ev: ev.assign(clicked=ev.clicked * 2), "label not 0 or 1"),
    (lambda ev: ev.iloc[:0], "events table is empty"),
    (lambda ev: ev.assign(uid=ev.uid.where(ev.index != 3, "ghost")), "not in the users table"),
    (lambda ev: ev.assign(ts=ev.ts.astype(str) + "s"), "must be numeric seconds or a timestamp"),
])
def test_bad_input_is_named_and_writes_nothing(spark, tmp_path, mutate, message):
    paths, ev, *_ = _tables(tmp_path, n_events=100)
    bad = mutate(ev)
    # pandas writes NaN as null; the NaN case needs real NaN values in the file
    keep_nan = "NaN" in message
    pq.write_table(pa.table({c: pa.array(bad[c].to_numpy(), from_pandas=not keep_nan) for c in bad.columns}),
                   paths["events"])
    cfg = _cfg(tmp_path, paths)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_features(spark, cfg)
    assert _no_tables(cfg)


def test_missing_label_column_is_named(spark, tmp_path):
    paths, ev, *_ = _tables(tmp_path, n_events=50)
    ev.drop(columns=["clicked"]).to_parquet(paths["events"], index=False)
    cfg = _cfg(tmp_path, paths)
    raw = cfg.model_dump(mode="json")
    del raw["data"]["source"]["events"]["columns"]["label"]     # no mapping: the label is absent
    from rec_models.config import validate_config
    cfg = validate_config(raw)
    with pytest.raises(InputError, match=r"missing column\(s\) label"):
        build_features(spark, cfg)
    assert _no_tables(cfg)


def test_delta_source(spark, tmp_path):
    paths, ev, *_ = _tables(tmp_path, n_events=200)
    events_uri = str(tmp_path / "events_delta")
    delta_io.write_table(spark.read.parquet(paths["events"]), events_uri)
    cfg = _cfg(tmp_path, paths, [f"data.source.events.path={events_uri}", "data.source.events.format=delta"])
    result = build_features(spark, cfg)
    assert sum(result.counts.values()) == len(ev)


def test_misnamed_mapped_column_is_named(spark, tmp_path):
    paths, *_ = _tables(tmp_path, n_events=50)
    cfg = _cfg(tmp_path, paths, ["data.source.items.columns={item_id: item_ident}"])
    with pytest.raises(InputError, match="item_ident"):
        build_features(spark, cfg)
    assert _no_tables(cfg)


def test_csv_source_and_unknown_ids_as_oov(spark, tmp_path):
    paths, ev, *_ = _tables(tmp_path, n_events=300)
    ev.loc[ev.index % 50 == 0, "uid"] = "newcomer"
    csv = str(tmp_path / "events.csv")
    ev.to_csv(csv, index=False)
    cfg = _cfg(tmp_path, paths, [f"data.source.events.path={csv}", "data.source.events.format=csv",
                                 "data.unknown_ids=oov"])
    build_features(spark, cfg)
    samples = delta_io.read_arrow(cfg.warehouse.uri("samples")).to_pandas()
    newcomers = samples[samples.user_key == "newcomer"]
    assert len(newcomers) == (ev.uid == "newcomer").sum()
    assert (newcomers.user_id == OOV_INDEX).all() and (newcomers.age_group == PAD_INDEX).all()

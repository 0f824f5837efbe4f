"""MovieLens readers (GroupLens 100K / 1M, RecBole atomic files), ratings as labels, and
the point-in-time privileged statistics of explicit feedback: brute force, and proof that
no future event changes any feature."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from etl import delta_io
from etl.build import build_features
from etl.movielens import ML100K_GENRES, read_movielens
from etl.sources import InputError, read_source
from rec_models.config import TableSource, load_config
from rec_models.spec import PAD_INDEX

DAY = 86400
T0 = 880_000_000
GENRES = ("Action", "Comedy", "Drama", "Film-Noir", "Sci-Fi", "Children's")


# ---- readers --------------------------------------------------------------------------
def _write(path, text: str, encoding="latin-1"):
    path.write_bytes(text.encode(encoding))
    return path


def test_grouplens_100k_files(spark, tmp_path):
    _write(tmp_path / "u.data", "1\t10\t4\t881250949\n2\t11\t1\t891717742\n")
    _write(tmp_path / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = ["0"] * 19
    flags[ML100K_GENRES.index("Comedy")] = flags[ML100K_GENRES.index("Film-Noir")] = "1"
    _write(tmp_path / "u.item",
           f"10|Café \"Noir\" (1995)|01-Jan-1995||http://x|{'|'.join(flags)}\n"
           f"11|unknown|||http://y|{'|'.join(['1'] + ['0'] * 18)}\n")
    events = read_movielens(spark, str(tmp_path), "movielens_100k", "events").toPandas()
    assert events.to_dict("records")[0] == {"user_id": "1", "item_id": "10", "rating": 4.0, "timestamp": 881250949}
    users = read_movielens(spark, str(tmp_path), "movielens_100k", "users").toPandas()
    assert list(users.columns) == ["user_id", "age", "gender", "occupation", "zip_code"]
    assert users.age.tolist() == [24, 53]
    items = read_movielens(spark, str(tmp_path / "u.item"), "movielens_100k", "items").toPandas()
    first, second = items.to_dict("records")
    assert first["title"] == 'Café "Noir" (1995)'          # Latin-1 decoded, quotes kept
    assert first["genres"] == "Comedy|Film-Noir" and first["release_year"] == 1995
    assert second["genres"] == "unknown" and pd.isna(second["release_year"])


def test_grouplens_1m_files(spark, tmp_path):
    _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    _write(tmp_path / "users.dat", "1::F::1::10::48067\n")
    _write(tmp_path / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                    "661::Amélie (Le Fabuleux Destin d'Amélie Poulain) (2001)::Comedy|Romance\n")
    events = read_movielens(spark, str(tmp_path), "movielens_1m", "events").toPandas()
    assert events.rating.tolist() == [5.0, 3.0] and events.timestamp.tolist() == [978300760, 978302109]
    users = read_movielens(spark, str(tmp_path), "movielens_1m", "users").toPandas()
    assert users.to_dict("records") == [{"user_id": "1", "age": 1, "gender": "F", "occupation": "10",
                                         "zip_code": "48067"}]
    items = read_movielens(spark, str(tmp_path), "movielens_1m", "items").toPandas().set_index("item_id")
    assert items.loc["661", "title"] == "Amélie (Le Fabuleux Destin d'Amélie Poulain)"
    assert items.loc["661", "release_year"] == 2001 and items.loc["661", "genres"] == "Comedy|Romance"


def test_recbole_atomic_files_and_errors(spark, tmp_path):
    _write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t9\t4\t100\n",
           "utf-8")
    df = read_movielens(spark, str(tmp_path), "recbole", "events").toPandas()
    assert df.to_dict("records") == [{"user_id": "7", "item_id": "9", "rating": 4.0, "timestamp": 100.0}]
    with pytest.raises(InputError, match=r"expected one file matching \*\.user"):
        read_source(spark, TableSource(path=str(tmp_path), format="recbole"), "users")
    _write(tmp_path / "bad.item", "item_id\tclass:token_seq\n1\tDrama\n", "utf-8")
    with pytest.raises(InputError, match="'item_id' is not RecBole's name:type"):
        read_source(spark, TableSource(path=str(tmp_path), format="recbole"), "items")
    with pytest.raises(InputError, match="cast of missing column 'agee'"):
        read_source(spark, TableSource(path=str(tmp_path), format="recbole", casts={"agee": "int"}), "events")


def test_real_ml100k_reads_whole(spark, ml100k_dir):
    counts = {t: read_movielens(spark, str(ml100k_dir), "recbole", t).count() for t in ("events", "users", "items")}
    assert counts == {"events": 100_000, "users": 943, "items": 1682}


# ---- ratings -> labels, privileged statistics point-in-time ----------------------------
def _recbole_folder(path, n_events=1500, seed=0):
    """A small MovieLens-like folder in RecBole's format (ties in time on purpose)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    users = pd.DataFrame({"user_id": np.arange(1, 31), "age": rng.integers(10, 70, 30),
                          "gender": rng.choice(["M", "F"], 30), "occupation": rng.choice(["a", "b", "c"], 30),
                          "zip_code": "00000"})
    items = pd.DataFrame({"item_id": np.arange(1, 41), "movie_title": [f"m{i}" for i in range(40)],
                          "release_year": rng.integers(1950, 1999, 40),
                          "class": [" ".join(rng.choice(GENRES, rng.integers(1, 4), replace=False)) for _ in range(40)]})
    ev = pd.DataFrame({"user_id": rng.integers(1, 31, n_events), "item_id": rng.integers(1, 41, n_events),
                       "rating": rng.integers(1, 6, n_events).astype(float),
                       "timestamp": T0 + rng.integers(0, 60 * DAY // 3600, n_events) * 3600})
    ev = ev.drop_duplicates(["user_id", "item_id"]).reset_index(drop=True)
    header = {"user_id": "token", "item_id": "token", "rating": "float", "timestamp": "float", "age": "token",
              "gender": "token", "occupation": "token", "zip_code": "token", "movie_title": "token_seq",
              "release_year": "token", "class": "token_seq"}
    for name, df in (("ml.inter", ev), ("ml.user", users), ("ml.item", items)):
        df.to_csv(path / name, sep="\t", index=False, header=[f"{c}:{header[c]}" for c in df.columns])
    return ev, items


def _ml_cfg(folder, root, *extra):
    return load_config(dataset="ml100k", overrides=[
        f"data.source.{t}.path={folder}" for t in ("events", "users", "items")] + [
        f"warehouse.root={root}", "data.history_lookback=2000", *extra])


def _raw(samples: pd.DataFrame, spec, name: str) -> np.ndarray:
    """Undo the standardisation ETL applied, giving the raw statistic."""
    f = spec.get(name)
    x = samples[name].to_numpy(np.float64) * f.std + f.mean
    return np.expm1(x) if f.transform == "log_standard" else x


@pytest.fixture(scope="module")
def ml_built(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ml")
    ev, items = _recbole_folder(tmp / "data")
    cfg = _ml_cfg(tmp / "data", tmp / "wh")
    result = build_features(spark, cfg)
    samples = delta_io.read_arrow(cfg.warehouse.uri("samples")).to_pandas()
    return tmp, ev, items, result, samples


def test_ratings_become_labels(ml_built):
    _, ev, _, result, samples = ml_built
    assert len(samples) == len(ev)
    merged = samples.merge(ev.astype({"user_id": str, "item_id": str}),
                           left_on=["user_key", "item_key"], right_on=["user_id", "item_id"])
    assert len(merged) == len(ev)
    assert (merged.label == (merged.rating >= 4)).all()


def test_label_from_drops_values(spark, tmp_path):
    ev, _ = _recbole_folder(tmp_path / "data", n_events=400)
    cfg = _ml_cfg(tmp_path / "data", tmp_path / "wh", "data.source.label_from.drop_values=[3]")
    result = build_features(spark, cfg)
    assert sum(result.counts.values()) == int((ev.rating != 3).sum())


def test_privileged_rating_statistics_match_brute_force(ml_built):
    _, ev, items, result, samples = ml_built
    spec = result.spec
    genres = {str(i): set(c.split()) for i, c in zip(items.item_id, items["class"])}
    ev = ev.assign(user_id=ev.user_id.astype(str), item_id=ev.item_id.astype(str))
    raw = {n: _raw(samples, spec, n) for n in ("ugenre_count", "ugenre_mean_rating", "item_mean_rating")}
    for idx in np.random.default_rng(3).choice(len(samples), 80, replace=False):
        row = samples.iloc[idx]
        t, g = row.timestamp, genres[row.item_key]
        prior = ev[ev.timestamp // DAY < t // DAY].rating.mean()   # all ratings of earlier days
        past = ev[(ev.user_id == row.user_key) & (ev.timestamp < t)]
        per_genre = [past.loc[past.item_id.map(lambda i: k in genres[i]).astype(bool)] for k in sorted(g)]
        counts = [len(p) for p in per_genre]
        sums = [p.rating.sum() for p in per_genre]
        assert raw["ugenre_count"][idx] == pytest.approx(np.mean(counts), rel=1e-4, abs=1e-4)
        assert raw["ugenre_mean_rating"][idx] == pytest.approx(
            _smoothed(sum(sums), sum(counts), prior, spec.get("ugenre_mean_rating").mean), abs=1e-4)
        item_past = ev[(ev.item_id == row.item_key) & (ev.timestamp < t)]
        assert raw["item_mean_rating"][idx] == pytest.approx(
            _smoothed(item_past.rating.sum(), len(item_past), prior, spec.get("item_mean_rating").mean), abs=1e-4)


def _smoothed(total, count, prior, fill, m=5.0):
    """The smoothed mean of etl/point_in_time.py; before any prior exists (the first day)
    the plain mean, and with no past at all the missing value ETL fills with the mean."""
    if np.isnan(prior):
        return total / count if count else fill
    return (total + m * prior) / (count + m)


def test_no_future_event_reaches_any_feature(spark, ml_built):
    """Rewrite every rating at or after a cut inside the training split (and add events
    after it): each row before the cut keeps the same privileged statistics and history."""
    tmp, ev, _, result, samples = ml_built
    cut = int(np.quantile(ev.timestamp, 0.5))
    changed = ev.copy()
    late = changed.timestamp >= cut
    changed.loc[late, "rating"] = 6.0 - changed.loc[late, "rating"]          # flips every label too
    extra = changed[late].assign(user_id=lambda d: d.user_id % 30 + 1).drop_duplicates(["user_id", "item_id"])
    changed = pd.concat([changed, extra]).drop_duplicates(["user_id", "item_id"])
    folder = tmp / "data_changed"
    _, _ = _recbole_folder(folder)        # same users and items tables (same seed)
    changed.to_csv(folder / "ml.inter", sep="\t", index=False,
                   header=["user_id:token", "item_id:token", "rating:float", "timestamp:float"])
    cfg = _ml_cfg(folder, tmp / "wh_changed")
    other = build_features(spark, cfg)
    again = delta_io.read_arrow(cfg.warehouse.uri("samples")).to_pandas()

    key = ["user_key", "item_key"]
    before = samples[samples.timestamp < cut].sort_values(key).reset_index(drop=True)
    after = again[again.timestamp < cut].sort_values(key).reset_index(drop=True)
    assert len(before) == len(after) > 100 and (before[key] == after[key]).all().all()
    for name in ("ugenre_count", "ugenre_mean_rating", "item_mean_rating"):
        # raw values: the two builds may normalise with other training statistics; a value
        # missing (no past, no prior yet: the first day) is encoded 0 in both
        missing = (before[name] == 0) & (after[name] == 0)
        assert (before.timestamp[missing] // DAY == ev.timestamp.min() // DAY).all()
        np.testing.assert_allclose(_raw(before[~missing], result.spec, name), _raw(after[~missing], other.spec, name),
                                   rtol=1e-5, atol=1e-4, err_msg=name)
    for a, b in zip(before.hist_item_ids, after.hist_item_ids):
        assert list(a) == list(b)
    assert (before.label == after.label).all()
    # the perturbation is visible after the cut, so this test can fail
    late = samples[samples.timestamp > cut + DAY].merge(again, on=key, suffixes=("", "_changed"))
    old_raw = _raw(late, result.spec, "item_mean_rating")
    new_raw = _raw(late.drop(columns="item_mean_rating").rename(columns={"item_mean_rating_changed": "item_mean_rating"}),
                   other.spec, "item_mean_rating")
    assert np.abs(old_raw - new_raw).mean() > 0.1


def test_real_ml100k_builds_with_privileged_columns(spark, ml100k_dir, tmp_path):
    cfg = load_config(dataset="ml100k", overrides=[
        f"data.source.{t}.path={ml100k_dir}" for t in ("events", "users", "items")] + [f"warehouse.root={tmp_path}"])
    result = build_features(spark, cfg)
    assert sum(result.counts.values()) == 100_000
    spec = result.spec
    assert spec.get("genres").vocab_size == 19 + 2 and spec.get("user_id").vocab_size == 943 + 2
    samples = delta_io.read_arrow(cfg.warehouse.uri("samples"), ["genres", "item_mean_rating", "label"]).to_pandas()
    assert 0.5 < samples.label.mean() < 0.6                 # ratings >= 4 are about 55%
    assert (np.stack(samples.genres.to_numpy())[:, 0] != PAD_INDEX).all()
    assert samples.item_mean_rating.std() > 0.5

"""FeatureSpec: validation rules, lookups, resolution, persistence and the privileged guard."""
from __future__ import annotations

import copy
import os

import pytest
from pydantic import ValidationError

from rec_models.spec import (
    PRIVILEGED_DERIVATIONS, Feature, FeatureSpec, Kind, PrivilegedLeakError, Role,
)

BASE = [
    {"name": "user_id", "role": "user", "kind": "categorical", "source": "users"},
    {"name": "age", "role": "user", "kind": "numeric", "source": "users"},
    {"name": "hist", "role": "user", "kind": "sequence", "vocab_of": "item_id", "max_len": 5},
    {"name": "item_id", "role": "item", "kind": "categorical", "source": "items"},
    {"name": "price", "role": "item", "kind": "numeric", "source": "items",
     "transform": "bucketize", "num_buckets": 4},
    {"name": "hour", "role": "context", "kind": "categorical"},
    {"name": "clicks_7d", "role": "privileged", "kind": "numeric", "source": "derived",
     "derive": "user_category_clicks", "window_days": 7},
    {"name": "impr", "role": "privileged", "kind": "numeric", "source": "derived",
     "derive": "user_item_impressions"},
    {"name": "label", "role": "label", "kind": "label"},
    {"name": "w", "role": "weight", "kind": "numeric", "transform": "none"},
]


def _raw(features=None, **extra) -> dict:
    return {"features": copy.deepcopy(BASE if features is None else features), **extra}


def _spec(features=None, **extra) -> FeatureSpec:
    return FeatureSpec.model_validate(_raw(features, **extra))


def _invalid(raw: dict) -> str:
    with pytest.raises(ValidationError) as info:
        FeatureSpec.model_validate(raw)
    return str(info.value)


def _replace(name: str, **fields) -> list[dict]:
    feats = copy.deepcopy(BASE)
    for f in feats:
        if f["name"] == name:
            f.update(fields)
    return feats


# ---- validation --------------------------------------------------------------------------
def test_base_spec_is_valid():
    spec = _spec()
    assert len(spec.features) == len(BASE)
    assert spec.resolved is False
    assert spec.split_times is None


def test_duplicate_feature_name():
    feats = BASE + [{"name": "age", "role": "user", "kind": "categorical"}]
    msg = _invalid(_raw(feats))
    assert "feature 'age' is declared twice" in msg


def test_zero_labels():
    feats = [f for f in BASE if f["role"] != "label"]
    msg = _invalid(_raw(feats))
    assert "exactly one label feature, found 0" in msg


def test_two_labels():
    feats = BASE + [{"name": "label2", "role": "label", "kind": "label"}]
    msg = _invalid(_raw(feats))
    assert "exactly one label feature, found 2" in msg


def test_sequence_without_vocab_of():
    msg = _invalid(_raw(_replace("hist", vocab_of=None)))
    assert "feature 'hist'" in msg
    assert "vocab_of" in msg


def test_sequence_of_item_role_rejected():
    msg = _invalid(_raw(_replace("hist", role="item")))
    assert "feature 'hist'" in msg
    assert "role user" in msg


def test_vocab_of_unknown_feature():
    msg = _invalid(_raw(_replace("hist", vocab_of="movie_id")))
    assert "feature 'hist'" in msg
    assert "vocab_of 'movie_id' is not a declared feature" in msg


def test_unknown_derivation():
    msg = _invalid(_raw(_replace("clicks_7d", derive="user_magic")))
    assert "feature 'clicks_7d'" in msg
    assert "unknown derivation 'user_magic'" in msg
    for known in PRIVILEGED_DERIVATIONS:
        assert known in msg


def test_derived_without_derive():
    msg = _invalid(_raw(_replace("impr", derive=None)))
    assert "feature 'impr'" in msg
    assert "unknown derivation None" in msg


def test_derive_without_derived_source():
    msg = _invalid(_raw(_replace("impr", source="events")))
    assert "feature 'impr'" in msg
    assert "'derive' needs source 'derived'" in msg


def test_derived_feature_must_be_privileged():
    msg = _invalid(_raw(_replace("impr", role="user")))
    assert "feature 'impr'" in msg
    assert "privileged only" in msg


def test_user_key_must_be_categorical_user_feature():
    # the key names a numeric user feature
    msg = _invalid(_raw(keys={"user": "age"}))
    assert "user key 'age'" in msg
    assert "categorical feature of role user" in msg
    # the key names a categorical feature of another role
    msg = _invalid(_raw(keys={"user": "hour"}))
    assert "user key 'hour'" in msg
    # the key names no feature at all
    msg = _invalid(_raw(keys={"user": "uid"}))
    assert "user key 'uid'" in msg


def test_item_key_must_be_categorical_item_feature():
    msg = _invalid(_raw(keys={"item": "price"}))
    assert "item key 'price'" in msg
    assert "categorical feature of role item" in msg


def test_label_kind_only_for_label_roles():
    msg = _invalid(_raw(_replace("age", kind="label")))
    assert "feature 'age'" in msg
    assert "kind 'label'" in msg


def test_unknown_field_and_enum_rejected():
    msg = _invalid(_raw(_replace("age", colour="red")))
    assert "colour" in msg
    msg = _invalid(_raw(_replace("age", role="teacher")))
    assert "role" in msg


def test_feature_alone_validates_too():
    with pytest.raises(ValidationError, match="feature 'x'"):
        Feature(name="x", role=Role.user, kind=Kind.sequence)
    f = Feature(name="x", role=Role.user, kind=Kind.sequence, vocab_of="item_id")
    assert f.vocab_of == "item_id"


# ---- lookups -----------------------------------------------------------------------------
def test_by_role_and_names():
    spec = _spec()
    assert [f.name for f in spec.by_role(Role.user)] == ["user_id", "age", "hist"]
    assert [f.name for f in spec.by_role("item", "context")] == ["item_id", "price", "hour"]
    assert [f.name for f in spec.user_features] == ["user_id", "age", "hist"]
    assert [f.name for f in spec.item_features] == ["item_id", "price"]
    assert spec.privileged_names == frozenset({"clicks_7d", "impr"})
    assert [f.name for f in spec.input_features()] == [
        "user_id", "age", "hist", "item_id", "price", "hour", "clicks_7d", "impr"]
    assert spec.label.name == "label"
    assert spec.weight.name == "w"
    assert spec.get("price").transform == "bucketize"
    assert spec.embedding_table_owner(spec.get("hist")).name == "item_id"
    assert spec.embedding_table_owner(spec.get("age")).name == "age"
    with pytest.raises(KeyError, match="nope"):
        spec.get("nope")
    with pytest.raises(ValueError):
        spec.by_role("teacher")


def test_no_weight():
    spec = _spec([f for f in BASE if f["role"] != "weight"])
    assert spec.weight is None


def test_is_categorical_and_is_list():
    spec = _spec()
    assert spec.get("price").is_categorical  # bucketized numeric
    assert not spec.get("age").is_categorical
    assert spec.get("hist").is_categorical and spec.get("hist").is_list
    assert not spec.get("user_id").is_list


# ---- resolution --------------------------------------------------------------------------
def test_table_size_before_resolve_raises():
    spec = _spec()
    with pytest.raises(ValueError, match="feature 'user_id'"):
        spec.get("user_id").table_size
    with pytest.raises(ValueError, match="feature 'price' is not resolved"):
        spec.get("price").table_size


def test_resolve_returns_a_resolved_copy():
    spec = _spec()
    before = spec.to_json()
    resolved = spec.resolve({
        "user_id": {"vocab_size": 12},
        "item_id": {"vocab_size": 30},
        "price": {"boundaries": (1.0, 5.0, 10.0)},
        "age": {"mean": 35.5, "std": 9.0},
    })
    assert resolved is not spec
    assert resolved.resolved is True
    assert resolved.get("user_id").table_size == 12
    assert resolved.get("item_id").table_size == 30
    assert resolved.get("price").table_size == 3 + 2   # len(boundaries) + 2
    assert resolved.get("price").boundaries == (1.0, 5.0, 10.0)
    assert resolved.get("age").mean == 35.5 and resolved.get("age").std == 9.0
    # untouched features carry over unchanged
    assert resolved.get("hist") == spec.get("hist")
    assert resolved.keys == spec.keys
    # the original is not mutated
    assert spec.resolved is False
    assert spec.get("user_id").vocab_size is None
    assert spec.get("price").boundaries is None
    assert spec.to_json() == before
    with pytest.raises(ValueError):
        spec.get("user_id").table_size


# ---- persistence -------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    spec = _spec(keys={"timestamp": "ts"}).resolve({
        "user_id": {"vocab_size": 7}, "price": {"boundaries": (0.5, 2.5)}})
    spec = spec.model_copy(update={"split_times": {"valid": 100, "test": 200}})
    path = tmp_path / "nested" / "feature_spec.json"
    spec.save(str(path))
    assert path.exists()
    assert os.listdir(path.parent) == ["feature_spec.json"]   # no temp file left behind
    loaded = FeatureSpec.load(str(path))
    assert loaded == spec
    assert loaded.to_json() == spec.to_json()
    assert loaded.keys.timestamp == "ts"
    assert loaded.split_times == {"valid": 100, "test": 200}
    assert loaded.get("price").boundaries == (0.5, 2.5)
    assert loaded.get("price").table_size == 4
    assert loaded.get("user_id").role is Role.user
    assert loaded.resolved is True


def test_save_overwrites(tmp_path):
    path = tmp_path / "feature_spec.json"
    _spec().save(str(path))
    resolved = _spec().resolve({"user_id": {"vocab_size": 3}})
    resolved.save(str(path))
    assert sorted(os.listdir(tmp_path)) == ["feature_spec.json"]
    assert FeatureSpec.load(str(path)) == resolved


def test_load_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        FeatureSpec.load(str(tmp_path / "absent.json"))
    assert "build_features" in str(info.value)
    assert "absent.json" in str(info.value)


# ---- privileged guard --------------------------------------------------------------------
def test_assert_public_raises_naming_leaked_columns():
    spec = _spec()
    with pytest.raises(PrivilegedLeakError) as info:
        spec.assert_public(["user_id", "impr", "age", "clicks_7d"], "student user tower")
    msg = str(info.value)
    assert "student user tower" in msg
    assert "clicks_7d, impr" in msg    # sorted, all leaked columns
    assert "user_id" not in msg and "age" not in msg
    assert isinstance(info.value, ValueError)


def test_assert_public_passes_for_public_columns():
    spec = _spec()
    public = [f.name for f in spec.input_features() if f.role != Role.privileged]
    assert spec.assert_public(public, "serving") is None
    assert spec.assert_public([], "serving") is None

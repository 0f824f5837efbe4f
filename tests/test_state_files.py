"""Small files beside the tables and runs (rec_models/state_files.py): atomic writes, and
the feature spec at the warehouse's own URIs (dbfs:/ through the /dbfs mount, object
stores through pyarrow.fs), so that every node finds it where the tables are."""
from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from rec_models import state_files
from rec_models.config import WarehouseConf, load_config
from rec_models.errors import InputNotFoundError


def test_a_write_that_fails_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "state.json"
    state_files.write_json_atomic(str(path), {"a": 1})
    with pytest.raises(TypeError):
        state_files.write_json_atomic(str(path), {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]
    assert state_files.read_json_object(str(tmp_path / "missing.json"), "state") is None
    (tmp_path / "torn.json").write_text('{"a": ')
    assert state_files.read_json_object(str(tmp_path / "torn.json"), "state") is None


@pytest.mark.parametrize("root, table, spec", [
    ("dbfs:/dtt", "dbfs:/dtt/samples", "dbfs:/dtt/feature_spec.json"),
    ("s3://bucket/dtt/", "s3://bucket/dtt/samples", "s3://bucket/dtt/feature_spec.json"),
    ("abfss://c@acct.dfs.core.windows.net/dtt", "abfss://c@acct.dfs.core.windows.net/dtt/samples",
     "abfss://c@acct.dfs.core.windows.net/dtt/feature_spec.json"),
])
def test_uri_roots_are_never_joined_onto_the_working_directory(root, table, spec):
    wh = WarehouseConf(root=root)
    assert wh.uri("samples") == table and wh.spec_path == spec


def test_a_relative_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert WarehouseConf(root="wh").spec_path == f"{tmp_path}/wh/feature_spec.json"


def test_the_spec_on_dbfs_goes_through_the_dbfs_mount(tmp_path, monkeypatch):
    monkeypatch.setattr(state_files, "DBFS_MOUNT", str(tmp_path / "dbfs"))
    spec = load_config().spec
    spec.save("dbfs:/dtt/feature_spec.json")
    assert (tmp_path / "dbfs" / "dtt" / "feature_spec.json").is_file()
    assert type(spec).load("dbfs:/dtt/feature_spec.json") == spec


def test_the_spec_on_an_object_store_is_one_put_and_reads_back(tmp_path, monkeypatch):
    """s3:// (any pyarrow.fs URI): stood in for by a local folder behind pyarrow's
    filesystem interface, the calls a real store gets."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    store = pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem())
    seen = []

    def remote(uri):
        seen.append(uri)
        assert uri.startswith("s3://bucket/")
        return store, uri[len("s3://bucket/"):]

    monkeypatch.setattr(state_files, "_remote", remote)
    uri = WarehouseConf(root="s3://bucket/dtt").spec_path
    spec = load_config().spec
    with pytest.raises(InputNotFoundError, match="s3://bucket/dtt/feature_spec.json"):
        type(spec).load(uri)
    assert not state_files.file_exists(uri)
    spec.save(uri)
    assert state_files.file_exists(uri) and (bucket / "dtt" / "feature_spec.json").is_file()
    assert type(spec).load(uri) == spec
    assert seen and all(u == uri for u in seen)

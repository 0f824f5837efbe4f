"""The pipeline on native Delta, end to end: a small model trained and tracked in MLflow,
its student registered, its tables written by Spark's Delta and registered as catalog
tables (queried by name), and the registered model's embeddings equal to the tables'."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from deltalake import DeltaTable

from etl import delta_io
from rec_models.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread_native")


@pytest.fixture(scope="module")
def one_thread_native():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(spark, tmp_path_factory):
    from orchestration import pipeline

    tmp = tmp_path_factory.mktemp("native-run")
    cfg = load_config(method="dssm", overrides=[
        f"warehouse.root={tmp / 'warehouse'}", f"run.output_dir={tmp / 'runs'}", "run.name=dssm_native",
        "data.source.synthetic.n_users=150", "data.source.synthetic.n_items=100",
        "data.source.synthetic.n_events=6000", "data.source.synthetic.partitions=2",
        "train.epochs=2", "train.batch_size=512", "eval.baselines=false", "eval.k=[10]",
        "tracking.enabled=true"])
    result = pipeline.run_method(spark, cfg, "dssm")
    return cfg, result


def test_the_tables_are_catalog_tables_queried_by_name(run, spark):
    cfg, result = run
    assert result["catalog"]["user_embeddings"] == "recsys.user_embeddings"
    assert set(result["catalog"]) >= {"user_features", "item_features", "samples", "user_embeddings",
                                      "item_embeddings", "model_versions"}
    n = spark.sql("SELECT count(*) AS n FROM recsys.user_embeddings WHERE model_name = 'dssm_native'").first()["n"]
    assert n == spark.sql("SELECT count(*) AS n FROM recsys.user_features").first()["n"] > 0
    # the table versions model_versions names, by time travel on the catalog name
    pair = spark.sql("SELECT user_table_version FROM recsys.model_versions WHERE model_name = 'dssm_native'").first()
    at = spark.sql(f"SELECT count(*) AS n FROM recsys.user_embeddings VERSION AS OF {pair['user_table_version']}")
    assert at.first()["n"] == n


def test_catalog_tables_carry_comments_and_properties_linking_model_spec_and_mlflow(run, spark):
    cfg, result = run
    props = {r["key"]: r["value"] for r in spark.sql("SHOW TBLPROPERTIES recsys.user_embeddings").collect()}
    links = result["mlflow"]
    assert props["dtt.model_name"] == "dssm_native" and props["dtt.model_version"] == "v1"
    assert props["dtt.score_kind"] == "dot" and int(props["dtt.embedding_dim"]) == cfg.model.output_dim
    assert props["dtt.mlflow_run_id"] == links["run_id"]
    assert props["dtt.registered_model"] == "dssm_native" and props["dtt.registered_model_version"] == "1"
    assert len(props["dtt.feature_spec_sha256"]) == 64
    detail = {r["col_name"]: r["data_type"] for r in spark.sql("DESCRIBE TABLE EXTENDED recsys.user_embeddings").collect()}
    comment = detail["Comment"]
    assert "dssm_native version v1" in comment and f"embedding dim {cfg.model.output_dim}" in comment
    assert "score_kind dot" in comment and "FeatureSpec sha256" in comment and links["run_id"] in comment
    columns = {f.name: f.metadata.get("comment", "") for f in spark.table("recsys.user_embeddings").schema}
    assert "flattened" in columns["vector"] and all(columns.values())
    feature_cols = {f.name: f.metadata.get("comment", "") for f in spark.table("recsys.samples").schema}
    privileged = [f.name for f in cfg.spec.features if f.role == "privileged"]
    assert privileged and all("privileged" in feature_cols[c] for c in privileged)
    # a second registration that changes nothing commits nothing
    from orchestration.catalog import register_tables

    before = DeltaTable(cfg.warehouse.uri("user_embeddings")).version()
    register_tables(spark, cfg, ["user_embeddings"], links={k: v for k, v in links.items() if k != "ui"})
    assert DeltaTable(cfg.warehouse.uri("user_embeddings")).version() == before


def test_a_name_registered_at_another_location_is_refused(run, spark, tmp_path):
    from etl.catalog import register_table

    cfg, _ = run
    with pytest.raises(ConfigError, match=r"catalog table recsys.user_embeddings is registered at .*, not at"):
        register_table(spark, "recsys.user_embeddings", str(tmp_path / "elsewhere"), "x", {})


def test_the_embedding_writes_were_native_and_record_the_registered_model_version(run):
    cfg, result = run
    for table in ("user_embeddings", "item_embeddings", "model_versions"):
        history = DeltaTable(cfg.warehouse.uri(table)).history()
        writes = [h for h in history if h.get("operation") == "WRITE"]
        assert writes and all("Apache-Spark" in (h.get("engineInfo") or "") for h in writes), writes
        meta = json.loads(writes[0]["userMetadata"])   # the latest write: this run's
        assert meta["registered_model_version"] == "1" and meta["mlflow_run_id"] == result["mlflow"]["run_id"]


def test_the_mlflow_run_has_conf_params_epoch_curves_test_metrics_and_artifacts(run):
    from mlflow.tracking import MlflowClient

    from orchestration import tracking

    cfg, result = run
    client = MlflowClient(tracking.tracking_uri(cfg))
    mlrun = client.get_run(result["mlflow"]["run_id"])
    assert mlrun.data.params["train.epochs"] == "2" and mlrun.data.params["run.name"] == "dssm_native"
    assert mlrun.data.tags[tracking.RUN_TAG] == result["run_id"]
    for name in ("dssm.valid_student_auc", "dssm.train_loss"):   # per-epoch curves, step = epoch
        assert [m.step for m in client.get_metric_history(mlrun.info.run_id, name)] == [0, 1], \
            sorted(mlrun.data.metrics)
    assert "dssm.test_student_auc" in mlrun.data.metrics
    arts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert "feature_spec" in arts
    assert result["mlflow"]["ui"].startswith("mlflow ui --backend-store-uri sqlite:///")


def test_the_registered_model_gives_the_tables_embeddings_for_the_same_rows(run):
    import mlflow

    from orchestration import tracking
    from orchestration.artifacts import read_committed_embeddings

    cfg, result = run
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    model = mlflow.pyfunc.load_model("models:/dssm_native/1")
    assert model.metadata.get_params_schema() is not None
    users, items, _ = read_committed_embeddings(cfg, "dssm_native", "v1", ["id", "vector"])
    spec_versions = json.load(open(cfg.warehouse.spec_path)).get("table_versions") or {}
    for side, table, key in (("user", users, "user_key"), ("item", items, "item_key")):
        features = delta_io.read_arrow(cfg.warehouse.uri(f"{side}_features"),
                                       version=spec_versions.get(f"{side}_features")).slice(0, 40).to_pandas()
        out = model.predict(features, params={"side": side})
        assert list(out["id"]) == list(features[key].astype(str))
        stored = dict(zip(table["id"].to_pylist(), table["vector"].to_pylist()))
        got = np.stack([np.asarray(v, dtype=np.float32) for v in out["vector"]])
        want = np.stack([np.asarray(stored[i], dtype=np.float32) for i in out["id"]])
        assert got.shape[1] == math.prod(out["shape"][0]) == cfg.model.output_dim
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="side"):
        model.predict(features, params={"side": "both"})

"""Layered YAML configuration: defaults, overrides, profiles, extra files and errors."""
from __future__ import annotations

import pytest

from rec_models.config import BACKENDS, ConfigError, load_config
from rec_models.spec import Kind, Role

PRIVILEGED = {"ucat_clicks_7d", "ucat_ctr_7d", "ucat_dwell_7d", "watch_seconds", "uitem_impressions"}


def _error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return str(info.value)


# ---- defaults ----------------------------------------------------------------------------
def test_default_config_loads_synthetic_pfd_local():
    cfg = load_config()
    assert cfg.data.name == "synthetic"
    assert cfg.data.source.type == "synthetic"
    assert cfg.distill.method == "pfd"
    assert cfg.profile == "local"
    assert cfg.spark.master == "local[2]"
    assert cfg.spark.conf["spark.sql.shuffle.partitions"] == 8
    assert cfg.train.backend == "local"
    assert cfg.train.epochs == 16   # the synthetic dataset's own for PFD (base: 3)
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.train.restore_best_epoch is True
    assert cfg.student.objective == "mixed" and cfg.student.temperature == pytest.approx(0.02)
    assert cfg.eval.k == [10, 50, 100] and cfg.eval.select_k == 50
    assert cfg.warehouse.writer == "auto"


def test_default_spec_has_the_privileged_features():
    spec = load_config().spec
    assert spec.privileged_names == frozenset(PRIVILEGED)
    # point-in-time statistics, and the impression's own post-impression watch time
    assert {f.name for f in spec.by_role(Role.privileged) if f.source != "derived"} == {"watch_seconds"}
    assert spec.get("watch_seconds").source == "events"
    assert spec.label.name == "label"
    assert spec.keys.user == "user_id" and spec.keys.item == "item_id"
    assert spec.get("hist_item_ids").kind == Kind.sequence
    assert spec.get("hist_item_ids").vocab_of == "item_id"
    assert not spec.resolved
    # no privileged column among the public towers' features
    public = {f.name for f in spec.user_features + spec.item_features}
    assert public.isdisjoint(PRIVILEGED)


# ---- overrides ---------------------------------------------------------------------------
def test_overrides_are_typed():
    cfg = load_config(overrides=["train.epochs=1", "train.use_gpu=true", "eval.k=[5,20]",
                                 "train.lr=0.01", "run.name=exp"])
    assert cfg.train.epochs == 1 and type(cfg.train.epochs) is int
    assert cfg.train.use_gpu is True
    assert cfg.eval.k == [5, 20] and all(type(k) is int for k in cfg.eval.k)
    assert cfg.train.lr == pytest.approx(0.01) and type(cfg.train.lr) is float
    assert cfg.run.name == "exp"


def test_override_nested_dict():
    cfg = load_config(overrides=[
        "data.source.type=tables",
        "data.source.events.path=/data/events.parquet",
        "data.source.events.columns={user_id: uid, item_id: iid}",
    ])
    events = cfg.data.source.events
    assert events is not None
    assert events.path == "/data/events.parquet"
    assert events.format == "parquet"
    assert events.columns == {"user_id": "uid", "item_id": "iid"}


def test_override_null():
    assert load_config(overrides=["spark.master=null"]).spark.master is None


# ---- profiles and layering ---------------------------------------------------------------
def test_databricks_profile():
    cfg = load_config(profile="databricks")
    assert cfg.profile == "databricks"
    assert cfg.warehouse.writer == "spark"
    assert cfg.warehouse.root == "dbfs:/distill_two_tower"
    assert cfg.train.backend == "torch_distributor"
    assert cfg.train.use_gpu is True
    assert cfg.train.local_mode is False
    assert cfg.spark.master is None
    # the base and dataset layers still supply what the profile leaves alone
    assert cfg.train.epochs == 16
    assert cfg.spec.privileged_names == frozenset(PRIVILEGED)


def test_extra_file_wins_over_profile_and_loses_to_overrides(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "train:\n"
        "  batch_size: 77\n"
        "  epochs: 9\n"
        "warehouse:\n"
        "  writer: delta_rs\n"
    )
    # databricks sets batch_size 8192 and writer spark; the extra file overrides both
    cfg = load_config(profile="databricks", files=[str(extra)], overrides=["train.epochs=2"])
    assert cfg.train.batch_size == 77
    assert cfg.warehouse.writer == "delta_rs"
    assert cfg.train.epochs == 2          # the override beats the file's 9
    assert cfg.train.backend == "torch_distributor"  # untouched profile value kept
    # without the override the file's value is used
    assert load_config(files=[str(extra)]).train.epochs == 9


def test_a_datasets_settings_for_one_method_apply_to_that_method_only(tmp_path):
    import shutil
    from rec_models.config import CONF_DIR

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "dataset" / "mine.yaml").write_text(
        (CONF_DIR / "dataset" / "synthetic.yaml").read_text().split("\nmethods:")[0]
        + "\nmethods:\n  pfd: {train: {lr: 0.0007}, model: {dropout: 0.1}}\n  dssm: {train: {epochs: 5}}\n")
    pfd = load_config(dataset="mine", conf_dir=conf)
    assert (pfd.train.lr, pfd.model.dropout, pfd.train.epochs) == (0.0007, 0.1, 8)   # over the method's conf
    dssm = load_config(dataset="mine", method="dssm", conf_dir=conf)
    assert (dssm.train.lr, dssm.model.dropout, dssm.train.epochs) == (0.003, 0.0, 5)
    kd = load_config(dataset="mine", method="kd", conf_dir=conf)
    assert (kd.train.lr, kd.train.epochs) == (0.003, 8)
    # under the profile, --conf files and --set overrides
    assert load_config(dataset="mine", conf_dir=conf, overrides=["train.lr=0.01"]).train.lr == 0.01
    (conf / "dataset" / "typo.yaml").write_text(
        (conf / "dataset" / "mine.yaml").read_text().replace("  dssm:", "  dsm:"))
    assert "methods.dsm names no conf/method" in _error(dataset="typo", conf_dir=conf)


def test_the_synthetic_default_trains_pfd_and_its_undistilled_student_at_their_own_settings():
    cfg = load_config()
    assert (cfg.train.lr, cfg.train.epochs) == (0.001, 16)
    assert (cfg.undistilled_train().lr, cfg.undistilled_train().epochs) == (0.003, 16)
    assert cfg.undistilled_train().batch_size == cfg.train.batch_size       # the rest is the method's
    assert load_config(method="dssm").train.lr == cfg.undistilled_train().lr
    # a shorter run shortens both students
    assert load_config(overrides=["train.epochs=2"]).undistilled_train().epochs == 2
    assert load_config(dataset="ml100k").distill.baseline_train == {}
    assert load_config(dataset="ml100k").undistilled_train() == load_config(dataset="ml100k").train


def test_the_undistilled_student_the_job_trains_takes_baseline_train():
    from orchestration.pipeline import undistilled_config

    cfg = load_config(overrides=["distill.baseline_train.batch_size=512"])
    base = undistilled_config(cfg, "pfd")
    assert (base.train.lr, base.train.batch_size, base.train.epochs) == (0.003, 512, 16)
    assert (cfg.train.lr, cfg.train.batch_size) == (0.001, 1024)      # the distilled student's untouched


@pytest.mark.parametrize("override, fragment", [
    ("distill.baseline_train.lrr=1", "lrr: Extra inputs are not permitted"),
    ("distill.baseline_train.epochs=0", "epochs: Input should be greater than or equal to 1"),
])
def test_a_bad_baseline_train_setting_is_named(override, fragment):
    msg = _error(overrides=[override])
    assert "distill.baseline_train" in msg and fragment in msg


def test_later_extra_file_wins(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train: {epochs: 4, batch_size: 10}\n")
    b.write_text("train: {epochs: 5}\n")
    cfg = load_config(files=[str(a), str(b)])
    assert cfg.train.epochs == 5
    assert cfg.train.batch_size == 10


def test_missing_extra_file(tmp_path):
    missing = tmp_path / "nothere.yaml"
    msg = _error(files=[str(missing)])
    assert "extra" in msg and "nothere" in msg


# ---- errors ------------------------------------------------------------------------------
def test_unknown_key():
    msg = _error(overrides=["train.bogus=1"])
    assert "train.bogus" in msg
    assert "unknown key" in msg


def test_unknown_key_in_extra_file(tmp_path):
    extra = tmp_path / "typo.yaml"
    extra.write_text("model:\n  embeding_dim: 8\n")
    msg = _error(files=[str(extra)])
    assert "model.embeding_dim: unknown key" in msg


def test_unknown_backend_lists_known_ones():
    msg = _error(overrides=["train.backend=horovodx"])
    assert "train.backend" in msg
    assert "horovodx" in msg
    for backend in BACKENDS:
        assert backend in msg
    assert "torch_distributor" in msg and "local" in msg


@pytest.mark.parametrize("kind, must_list", [
    ("dataset", ["synthetic"]),
    ("method", ["pfd", "dssm"]),
    ("profile", ["databricks", "local"]),
])
def test_unknown_layer_name(kind, must_list):
    from rec_models.config import CONF_DIR

    available = sorted(p.stem for p in (CONF_DIR / kind).glob("*.yaml"))
    assert set(must_list) <= set(available)
    msg = _error(**{kind: "nosuchthing"})
    assert f"no {kind} conf 'nosuchthing'" in msg
    assert f"{kind}/nosuchthing.yaml" in msg
    assert "available: " + ", ".join(available) in msg


def test_bad_int():
    msg = _error(overrides=["train.epochs=abc"])
    assert "train.epochs" in msg
    assert "integer" in msg


def test_negative_lr():
    msg = _error(overrides=["train.lr=-1"])
    assert "train.lr" in msg
    assert "greater than 0" in msg


def test_zero_epochs():
    msg = _error(overrides=["train.epochs=0"])
    assert "train.epochs" in msg


def test_bad_literal():
    msg = _error(overrides=["warehouse.writer=hdfs"])
    assert "warehouse.writer" in msg


def test_bad_refit_names_the_key_and_the_choices():
    msg = _error(overrides=["train.refit=all"])
    assert "train.refit" in msg and "train_valid" in msg
    assert load_config(overrides=["train.refit=train_valid"]).train.refit == "train_valid"
    assert load_config().train.refit == "none"


def test_override_indexing_a_list_by_position_is_a_config_error_pointing_to_the_named_form():
    msg = _error(dataset="ml100k", overrides=["data.feature_spec.features.4.max_len=50"])
    assert "data.feature_spec.features.4.max_len=50" in msg and "features[hist_item_ids]" in msg and "--conf" in msg


def test_override_names_a_feature_of_the_list_and_changes_only_that_one():
    default = load_config(dataset="ml100k").data.feature_spec.features
    cfg = load_config(dataset="ml100k", overrides=["data.feature_spec.features[hist_item_ids].max_len=50",
                                                   "data.feature_spec.features[genres].max_len=3"])
    changed = {f.name: f for f in cfg.data.feature_spec.features}
    assert changed["hist_item_ids"].max_len == 50 and changed["genres"].max_len == 3
    assert [f.name for f in cfg.data.feature_spec.features] == [f.name for f in default]
    assert [f for f in cfg.data.feature_spec.features if f.name not in ("hist_item_ids", "genres")] == \
        [f for f in default if f.name not in ("hist_item_ids", "genres")]


def test_override_with_a_new_name_and_a_mapping_adds_that_element():
    cfg = load_config(overrides=["data.feature_spec.features[hist_shown_ids]={role: user, kind: sequence, "
                                 "source: events, vocab_of: item_id, max_len: 50, history_of: events}"])
    added = cfg.data.feature_spec.features[-1]
    assert (added.name, added.kind.value, added.max_len, added.history_of) == ("hist_shown_ids", "sequence", 50, "events")
    assert len(cfg.data.feature_spec.features) == len(load_config().data.feature_spec.features) + 1


@pytest.mark.parametrize("override, fragments", [
    ("data.feature_spec.features[hist_items].max_len=50", ["no element named 'hist_items'", "hist_item_ids"]),
    ("data.split[valid].fraction=0.2", ["data.split is not a list"]),
    ("data.feature_spec.features[hist_item_ids].max_len=many", ["features[hist_item_ids].max_len", "integer"]),
    ("data.feature_spec.features[hist_item_ids].maxlen=5", ["features[hist_item_ids].maxlen", "unknown key"]),
])
def test_bad_named_override_names_what_is_wrong(override, fragments):
    msg = _error(dataset="ml100k", overrides=[override])
    assert all(f in msg for f in fragments), msg


def test_override_without_equals():
    msg = _error(overrides=["train.epochs"])
    assert "train.epochs" in msg
    assert "key=value" in msg


def test_split_fractions_too_large():
    msg = _error(overrides=["data.split.valid_fraction=0.6", "data.split.test_fraction=0.35"])
    assert "data.split" in msg
    assert "valid_fraction + test_fraction" in msg
    # a sane split is accepted
    cfg = load_config(overrides=["data.split.valid_fraction=0.2", "data.split.test_fraction=0.3"])
    assert cfg.data.split.valid_fraction == pytest.approx(0.2)
    assert cfg.data.split.test_fraction == pytest.approx(0.3)


def test_split_scheme_is_global_per_user_or_random():
    assert load_config().data.split.scheme == "global"
    assert load_config(overrides=["data.split.scheme=per_user"]).data.split.scheme == "per_user"
    assert load_config(overrides=["data.split.scheme=random"]).data.split.scheme == "random"
    msg = _error(overrides=["data.split.scheme=weekly"])
    assert "data.split.scheme" in msg and "per_user" in msg and "random" in msg


def test_tables_source_needs_events():
    msg = _error(overrides=["data.source.type=tables"])
    assert "data.source" in msg
    assert "data.source.events is not set" in msg


def test_events_need_a_path():
    msg = _error(overrides=["data.source.events.columns={user_id: uid}"])
    assert "data.source.events.path" in msg


def test_all_problems_reported_at_once():
    msg = _error(overrides=["train.epochs=abc", "train.bogus=1", "train.backend=horovodx",
                            "train.lr=-1", "data.source.type=tables"])
    lines = [line.strip() for line in msg.splitlines()[1:]]
    assert msg.splitlines()[0] == "invalid configuration:"
    assert len(lines) == 5
    assert any(line.startswith("train.epochs:") for line in lines)
    assert "train.bogus: unknown key" in lines
    assert any(line.startswith("train.backend:") and "horovodx" in line for line in lines)
    assert any(line.startswith("train.lr:") for line in lines)
    assert any(line.startswith("data.source:") for line in lines)


def test_invalid_feature_spec_in_config_names_the_feature(tmp_path):
    extra = tmp_path / "spec.yaml"
    extra.write_text(
        "data:\n"
        "  feature_spec:\n"
        "    features:\n"
        "      - {name: user_id, role: user, kind: categorical, source: users}\n"
        "      - {name: item_id, role: item, kind: categorical, source: items}\n"
        "      - {name: hist, role: user, kind: sequence}\n"
        "      - {name: label, role: label, kind: label}\n"
    )
    msg = _error(files=[str(extra)])
    assert "data.feature_spec" in msg
    assert "feature 'hist'" in msg


@pytest.mark.parametrize("dataset", ["ml100k", "ml100k_grouplens", "ml1m"])
def test_real_datasets_keep_their_own_tables_and_runs(dataset):
    """A MovieLens build must not overwrite (or be refused by) the synthetic default's
    warehouse: each dataset conf has its own roots, and --set still wins."""
    default = load_config()
    cfg = load_config(dataset=dataset, method="virt")
    assert cfg.warehouse.root == f"warehouse/{dataset}" != default.warehouse.root
    assert cfg.run.output_dir == f"runs/{dataset}" != default.run.output_dir
    assert cfg.run.name == "virt"      # the method's layer still merges over the dataset's
    assert load_config(dataset=dataset, overrides=["warehouse.root=/tmp/wh"]).warehouse.root == "/tmp/wh"


def test_impression_weight_is_refused_on_implicit_data():
    assert load_config(overrides=["student.impression_weight=0.2"]).student.impression_weight == pytest.approx(0.2)
    message = _error(overrides=["data.source.implicit=true", "student.impression_weight=0.2"])
    assert "student.impression_weight" in message and "implicit" in message
    assert "student.impression_weight" in _error(overrides=["student.impression_weight=-1"])
    assert "pointwise" in _error(overrides=["student.objective=pointwise", "student.impression_weight=0.2"])

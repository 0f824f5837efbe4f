"""train.loader=petastorm: Petastorm's Spark converter behind the training loop.

Petastorm 0.13.1 runs only beside pyarrow < 15 and pyspark 3.5, so most of these tests run
in the petastorm lane (`make test-petastorm`, .ci/lane_petastorm.sh) and skip in the main
environment, where the tests of the clear error run instead. With DTT_REQUIRE_PETASTORM=1
(the lane sets it) a Petastorm that cannot run fails the tests instead of skipping them.
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from orchestration.spark_training import petastorm_converter as pc
from rec_models.config import ConfigError, load_config
from rec_models.loaders import petastorm as pl
from rec_models.loaders.arrow import ArrowBatchLoader, LoaderError
from rec_models.loaders.petastorm import PetastormUnavailableError

SMALL = [
    "data.source.synthetic.n_users=300", "data.source.synthetic.n_items=200",
    "data.source.synthetic.n_events=20000", "data.source.synthetic.partitions=4",
    "train.epochs=2", "train.batch_size=512", "distill.warmup_steps=20",
]


@pytest.fixture(scope="module")
def petastorm():
    """Skip where Petastorm cannot run (the main env); fail instead in the lane."""
    try:
        pl.require_petastorm()
    except PetastormUnavailableError as exc:
        if os.environ.get("DTT_REQUIRE_PETASTORM") == "1":
            pytest.fail(f"DTT_REQUIRE_PETASTORM=1, but Petastorm cannot run in this environment: {exc}")
        pytest.skip(f"Petastorm cannot run in this environment; the petastorm lane runs this "
                    f"(make test-petastorm). Reason: {exc}")


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread


# ---- everywhere ------------------------------------------------------------------------------
def test_config_accepts_petastorm_and_names_the_loaders():
    """The config stays valid in any env (a checkpoint trained in the lane loads beside pyspark 4)."""
    assert load_config(overrides=["train.loader=petastorm"]).train.loader == "petastorm"
    with pytest.raises(ConfigError, match="unknown train.loader 'nope'; known: arrow, petastorm"):
        load_config(overrides=["train.loader=nope"])


def test_reason_under_pyspark_4_says_why_and_what_instead(monkeypatch):
    versions = {"pyspark": "4.2.0", "pyarrow": "26.0.1", "petastorm": None}
    monkeypatch.setattr(pl, "_version", versions.get)
    reason = pl.petastorm_unavailable()
    for part in ("Petastorm 0.13.1", "pyarrow < 15", "pyspark 3.5", "pyspark 4.2.0", "pyarrow 26.0.1",
                 "petastorm is not installed", "train.loader=arrow", "make test-petastorm", ".venv-petastorm"):
        assert part in reason, (part, reason)
    versions.update(pyspark="3.5.9", pyarrow="14.0.2", petastorm="0.13.1")
    assert pl.petastorm_unavailable() is None


def test_job_with_petastorm_fails_before_etl_where_it_cannot_run(tmp_path, capsys):
    """Under pyspark 4: exit 2 with the reason, and no table was built."""
    reason = pl.petastorm_unavailable()
    if reason is None:
        pytest.skip("Petastorm can run here (the petastorm lane): the error path is for pyspark 4 environments")
    from jobs import train_teacher
    from rec_models.loaders.factory import make_train_loader

    argv = []
    for item in [f"warehouse.root={tmp_path / 'wh'}", f"run.output_dir={tmp_path / 'runs'}", "train.loader=petastorm"]:
        argv += ["--set", item]
    code = train_teacher.run(train_teacher.__doc__, train_teacher.body, train_teacher.options, argv=argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "error: train.loader=petastorm needs Petastorm 0.13.1" in err
    assert "pyarrow < 15" in err and "train.loader=arrow" in err and "make test-petastorm" in err
    assert not (tmp_path / "wh").exists()
    # a worker handed such a job says the same, whatever the job carries
    cfg = load_config(overrides=["train.loader=petastorm"])
    with pytest.raises(PetastormUnavailableError, match="pyarrow < 15"):
        make_train_loader([], None, cfg.spec, [], 0, 1, cfg)


# ---- the petastorm lane ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(petastorm, spark, tmp_path_factory):
    """A small synthetic feature set (ETL on Spark, Delta via delta-rs) and its resolved spec."""
    from etl.build import build_features

    tmp = tmp_path_factory.mktemp("petastorm")
    cfg = load_config(overrides=[f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}", *SMALL])
    return tmp, cfg, build_features(spark, cfg).spec


def _rows(batches: list[dict], columns: list[str]) -> Counter:
    """Each row's values (lists flattened) as bytes: a multiset that ignores order."""
    mats = [torch.cat([b[c].reshape(len(b[c]), -1).to(torch.float64) for c in columns], 1).numpy()
            for b in batches]
    return Counter(map(bytes, np.ascontiguousarray(np.concatenate(mats))))


def _layout(batch: dict) -> list:
    return [(k, v.dtype, tuple(v.shape)) for k, v in batch.items()]


def test_one_rank_yields_the_train_split_as_arrow_loader_does(built, spark):
    from orchestration import pipeline
    from rec_models.training.loop import model_columns

    tmp, cfg, spec = built
    columns = model_columns(spec)
    arrow = list(ArrowBatchLoader(pipeline.training_files(cfg, spec)["train"], spec, columns, 1000,
                                  shuffle=False, drop_last=False))
    converter = pc.make_train_converter(spark, cfg, spec, columns, str(tmp / "cache1"), world_size=1)
    try:
        loader = pl.PetastormLoader(converter, spec, columns, 1000, drop_last=False)
        batches = list(loader)
    finally:
        converter.delete()
    total = sum(len(b["label"]) for b in arrow)
    assert loader.num_rows == loader.total_rows == total == len(converter)
    assert len(batches) == len(loader) == -(-total // 1000)
    assert _layout(batches[0]) == _layout(arrow[0])              # keys in order, dtypes, [B] / [B, max_len]
    for b in batches:
        assert [(k, v.dtype, tuple(v.shape[1:])) for k, v in b.items()] == \
            [(k, v.dtype, tuple(v.shape[1:])) for k, v in arrow[0].items()]
    assert _rows(batches, columns) == _rows(arrow, columns)       # the same rows, each once
    assert not os.listdir(tmp / "cache1")


def test_refit_converter_holds_the_train_and_valid_rows(built, spark):
    """train.refit=train_valid trains on train + valid: the converter of its splits holds
    exactly the rows the arrow loader reads from both splits' files."""
    from orchestration import pipeline
    from rec_models.training.loop import model_columns

    tmp, cfg, spec = built
    columns = model_columns(spec)
    files = pipeline.training_files(cfg, spec)
    both = ArrowBatchLoader(files["train"] + files["valid"], spec, columns, 1000, shuffle=False, drop_last=False)
    train_only = ArrowBatchLoader(files["train"], spec, columns, 1000, shuffle=False, drop_last=False)
    converter = pc.make_train_converter(spark, cfg, spec, columns, str(tmp / "cache_refit"), splits=("train", "valid"))
    try:
        assert len(converter) == both.num_rows > train_only.num_rows
    finally:
        converter.delete()


def test_two_ranks_equal_batch_counts_disjoint_shards_new_order_per_epoch(built, spark):
    from orchestration import pipeline
    from rec_models.training.loop import model_columns

    tmp, cfg, spec = built
    columns = model_columns(spec)
    files = pipeline.training_files(cfg, spec)["train"]
    train = _rows(list(ArrowBatchLoader(files, spec, columns, 4096, shuffle=False, drop_last=False)), columns)
    converter = pc.make_train_converter(spark, cfg, spec, columns, str(tmp / "cache2"), world_size=2)
    try:
        loaders = [pl.PetastormLoader(converter, spec, columns, 500, rank=r, world_size=2, seed=3) for r in (0, 1)]
        shards = loaders[0].rank_rows
        assert loaders[1].rank_rows == shards and sum(shards) == sum(train.values())
        assert len(loaders[0]) == len(loaders[1]) == min(shards) // 500 > 0
        assert loaders[0].num_rows == loaders[1].num_rows == len(loaders[0]) * 500
        # round-robin repartition: shards differ by at most one row per input partition
        assert abs(shards[0] - shards[1]) <= len(files)
        seen = Counter()
        firsts = []
        for lo in loaders:
            batches = list(lo)
            assert len(batches) == len(lo) and {len(b["label"]) for b in batches} == {500}
            firsts.append(batches[0]["user_id"].clone())
            seen += _rows(batches, columns)
        assert not seen - train                   # only train rows, and no row on both ranks
        assert sum(seen.values()) == 2 * len(loaders[0]) * 500
        loaders[0].set_epoch(1)
        assert not torch.equal(next(iter(loaders[0]))["user_id"], firsts[0])   # reshuffled
        with pytest.raises(LoaderError, match="fewer than the 3 ranks"):
            pl.PetastormLoader(converter, spec, columns, 500, rank=0, world_size=3)
    finally:
        converter.delete()
    narrow = pc.make_train_converter(spark, cfg, spec, ["user_id", "label"], str(tmp / "cache2"))
    try:
        with pytest.raises(LoaderError, match=r"columns \['item_id'\] are not in the Petastorm cache"):
            pl.PetastormLoader(narrow, spec, ["user_id", "item_id", "label"], 500)
    finally:
        narrow.delete()


def _train_cfg(built, *overrides):
    tmp, _, _ = built
    return load_config(overrides=[f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}", *SMALL,
                                  "train.loader=petastorm", *overrides])


def test_local_training_through_the_pipeline(built):
    from orchestration import pipeline

    _, _, spec = built
    cfg = _train_cfg(built, "run.name=pst_local")
    out = pipeline.run_dir(cfg, "pfd")
    result = pipeline.train(cfg, spec, "pfd", out, "r1")
    n_train = ArrowBatchLoader(pipeline.training_files(cfg, spec)["train"], spec, ["label"], 1).total_rows
    assert result["world_size"] == 1
    assert result["steps"] == 2 * (n_train // 512)
    assert result["test"]["teacher_auc"] > 0.6, result["test"]
    # the student is a retriever (student.objective): its epoch was chosen on valid Recall@50
    selected = next(h for h in result["history"] if h["epoch"] == result["selected_epoch"])
    assert selected["valid_student_recall@50"] > 0 and result["test"]["student_logloss"] < 0.69, selected
    assert os.path.exists(result["checkpoint"])
    assert not os.path.exists(os.path.join(out, "petastorm_cache"))   # converter.delete() ran


def test_converter_files_are_deleted_when_training_fails(built, monkeypatch):
    from orchestration import pipeline
    from orchestration.spark_training import launchers as backends

    _, _, spec = built
    cfg = _train_cfg(built, "run.name=pst_fail")
    out = pipeline.run_dir(cfg, "dssm")
    seen = {}

    def fail(job, train):
        seen["job"] = job
        seen["cache"] = job.converter.cache_dir_url
        assert os.path.isdir(job.converter.cache_dir_url[len("file://"):])
        raise RuntimeError("worker lost")

    monkeypatch.setattr(backends, "run_training", fail)
    with pytest.raises(RuntimeError, match="worker lost"):
        pipeline.train(cfg, spec, "dssm", out, "r2")
    assert isinstance(seen["job"], pc.PetastormTrainJob)
    assert seen["cache"].startswith("file://" + os.path.join(out, "petastorm_cache") + "/")
    assert not os.path.exists(seen["cache"][len("file://"):])


@pytest.mark.slow
def test_torch_distributor_two_ranks_through_the_pipeline(built):
    """Two gloo processes, each reading its Petastorm shard from the converter in the job."""
    from orchestration import pipeline

    _, _, spec = built
    cfg = _train_cfg(built, "run.name=pst_td", "train.backend=torch_distributor", "train.num_processes=2")
    out = pipeline.run_dir(cfg, "pfd")
    result = pipeline.train(cfg, spec, "pfd", out, "r3")
    files = pipeline.training_files(cfg, spec)["train"]
    n_train = ArrowBatchLoader(files, spec, ["label"], 1).total_rows
    assert result["world_size"] == 2
    # per epoch: the smaller shard // batch; round-robin shards differ by <= one row per input file
    per_epoch = {(n_train // 2 - d) // 512 for d in range(len(files) + 1)}
    assert result["steps"] in {2 * n for n in per_epoch}, (result["steps"], per_epoch)
    assert result["test"]["teacher_auc"] > 0.6, result["test"]
    assert not os.path.exists(os.path.join(out, "petastorm_cache"))

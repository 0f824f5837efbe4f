"""A rerun after a failure at any stage of ``jobs/distill.py`` continues from what is
complete (``train.resume=auto``): features -> frozen teacher -> student -> baseline student
-> embeddings -> retrieval metrics.

Each test makes one stage raise once, reruns the job with ``train.resume=auto`` and checks,
by counting what the rerun did, that no completed stage ran again; that the rerun kept the
failed run's id; and that the result's metrics and the embedding tables equal those of an
uninterrupted run of the same conf. The method is KD (a frozen cross-encoder teacher, the
student, the DSSM baseline), one epoch each on the tiny data of tests/test_faults_jobs.py.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jobs import distill
from tests.test_faults_jobs import _run

KD = ["train.epochs=1", "eval.baselines=false", "tracking.enabled=false", "distill.train_baseline=true"]
TRAININGS = ("cross_encoder", "kd", "dssm")   # the frozen teacher, the student, the baseline student
SIDES = ("user", "item")


class StageFailed(RuntimeError):
    """The injected failure (an Exception: the job exits 1 with its traceback)."""


class Spy:
    """What one job run did: feature builds, trainings (by kind), embedding writes; and one
    stage that raises the first time it runs (``fail``)."""

    def __init__(self, monkeypatch, fail: str | None = None):
        from etl import build, delta_io
        from orchestration import embeddings, evaluation
        from orchestration.spark_training import launchers

        self.fail, self.failed = fail, False
        self.builds, self.trainings, self.writes = 0, Counter(), 0
        real_build, real_tables = build.build_features, build.write_feature_tables
        real_train, real_write = launchers.run_training, embeddings.write_embeddings
        real_table, real_metrics = delta_io.write_table, evaluation.retrieval_metrics

        def build_features(spark, cfg):
            self.builds += 1
            return real_build(spark, cfg)

        def write_feature_tables(*args, **kwargs):
            out = real_tables(*args, **kwargs)
            self._maybe_fail("features")   # the tables are written, the spec file is not
            return out

        def run_training(job, tc):
            self._maybe_fail(job.kind)      # the training dies before its first epoch
            self.trainings[job.kind] += 1
            return real_train(job, tc)

        def write_embeddings(*args, **kwargs):
            self.writes += 1
            return real_write(*args, **kwargs)

        def write_table(df, uri, *args, **kwargs):
            if uri.endswith("/item_embeddings"):   # the user table is committed, the item table not
                self._maybe_fail("embeddings")
            return real_table(df, uri, *args, **kwargs)

        def retrieval_metrics(*args, **kwargs):
            self._maybe_fail("metrics")     # after the embeddings are committed
            return real_metrics(*args, **kwargs)

        monkeypatch.setattr(build, "build_features", build_features)
        monkeypatch.setattr(build, "write_feature_tables", write_feature_tables)
        monkeypatch.setattr(launchers, "run_training", run_training)
        monkeypatch.setattr(embeddings, "write_embeddings", write_embeddings)
        monkeypatch.setattr(delta_io, "write_table", write_table)
        monkeypatch.setattr(evaluation, "retrieval_metrics", retrieval_metrics)

    def _maybe_fail(self, stage: str):
        if stage == self.fail and not self.failed:
            self.failed = True
            raise StageFailed(f"injected failure in stage {stage}")

    def did(self) -> dict:
        return {"builds": self.builds, **{k: self.trainings[k] for k in TRAININGS}, "writes": self.writes}


def _distill(tmp: Path, name: str, *overrides) -> tuple[int, dict, str]:
    t0 = time.monotonic()
    code, out, err = _run(distill, tmp, f"run.name={name}", *KD, *overrides, args=["--method", "kd"])
    print(f"distill run.name={name} {' '.join(overrides)}: exit {code} in {time.monotonic() - t0:.0f} s")
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else {}), err


def _embeddings(tmp: Path, name: str) -> dict[str, dict]:
    """Each side's rows of model ``name`` v1: {id: (vector, run_id)}; ids unique, and no data
    file in the partition that no version of the Delta log names."""
    import pyarrow.fs as pafs

    from etl import delta_io

    part = [("model_name", "=", name), ("model_version", "=", "v1")]
    sides = {}
    for side in SIDES:
        table = tmp / "wh" / f"{side}_embeddings"
        t = delta_io.read_arrow(str(table), ["id", "vector", "run_id"], part)
        ids = t.column("id").to_pylist()
        assert len(ids) == len(set(ids)) > 0, f"{side}: {len(ids)} rows, {len(set(ids))} ids"
        sides[side] = {i: (np.asarray(v, np.float32), r) for i, v, r in
                       zip(ids, t.column("vector").to_pylist(), t.column("run_id").to_pylist())}
        # every data file is one a version of the log names (a failed write's replaced files
        # stay for time travel; a file of a failed task attempt would be named by none)
        on_disk = {str(p.relative_to(table)) for p in (table / f"model_name={name}" / "model_version=v1").glob("*.parquet")}
        current = {p.removeprefix("file://").removeprefix(f"{table}/") for p in delta_io.snapshot_files(str(table), part)}
        ever = delta_io._logged_paths(pafs.LocalFileSystem(), str(table))
        assert current <= on_disk and on_disk <= ever, (side, current - on_disk, on_disk - ever)
    return sides


def _assert_same_vectors(got: dict, want: dict):
    for side in SIDES:
        assert got[side].keys() == want[side].keys(), side
        for k, (v, _) in want[side].items():
            np.testing.assert_allclose(got[side][k][0], v, rtol=0, atol=1e-6, err_msg=f"{side} {k}")


def _assert_same_metrics(got, want, path="metrics"):
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (path, got, want)
        for k in want:
            _assert_same_metrics(got[k], want[k], f"{path}.{k}")
    else:
        assert got == pytest.approx(want, abs=1e-6), path


def _run_id(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "runs" / name / "v1" / "kd" / "run.json").read_text())


@pytest.fixture(scope="module")
def straight(spark, tmp_path_factory):
    """The features (tiny) and one uninterrupted KD run: its result and embedding rows."""
    tmp = tmp_path_factory.mktemp("stages")
    code, result, err = _distill(tmp, "straight")
    assert code == 0, err[-3000:]
    return tmp, result, _embeddings(tmp, "straight")


# stage that fails -> what the failed run did, what the rerun did (counts)
CASES = {
    "teacher": ({"builds": 0, "cross_encoder": 0, "kd": 0, "dssm": 0, "writes": 0},
                {"builds": 0, "cross_encoder": 1, "kd": 1, "dssm": 1, "writes": 1}),
    "student": ({"builds": 0, "cross_encoder": 1, "kd": 0, "dssm": 0, "writes": 0},
                {"builds": 0, "cross_encoder": 0, "kd": 1, "dssm": 1, "writes": 1}),
    "baseline": ({"builds": 0, "cross_encoder": 1, "kd": 1, "dssm": 0, "writes": 0},
                 {"builds": 0, "cross_encoder": 0, "kd": 0, "dssm": 1, "writes": 1}),
    "embeddings": ({"builds": 0, "cross_encoder": 1, "kd": 1, "dssm": 1, "writes": 1},
                   {"builds": 0, "cross_encoder": 0, "kd": 0, "dssm": 0, "writes": 1}),
    "metrics": ({"builds": 0, "cross_encoder": 1, "kd": 1, "dssm": 1, "writes": 1},
                {"builds": 0, "cross_encoder": 0, "kd": 0, "dssm": 0, "writes": 0}),
}
FAILING = {"teacher": "cross_encoder", "student": "kd", "baseline": "dssm", "embeddings": "embeddings",
           "metrics": "metrics"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(CASES))
def test_a_rerun_after_a_failed_stage_redoes_nothing_complete(straight, monkeypatch, stage):
    tmp, want, want_rows = straight
    failed_did, rerun_did = CASES[stage]
    spy = Spy(monkeypatch, fail=FAILING[stage])
    code, _, err = _distill(tmp, stage, "train.resume=auto")
    assert code == 1 and spy.failed and f"injected failure in stage {FAILING[stage]}" in err, err[-3000:]
    assert spy.did() == failed_did
    failed = _run_id(tmp, stage)
    assert not failed["finished"]

    spy = Spy(monkeypatch)
    code, got, err = _distill(tmp, stage, "train.resume=auto")
    assert code == 0, err[-3000:]
    assert spy.did() == rerun_did, (stage, spy.did())
    assert got["run_id"] == failed["run_id"] and _run_id(tmp, stage)["finished"]
    _assert_same_metrics(got["metrics"], want["metrics"])
    assert got["selected_epoch"] == want["selected_epoch"] and got["tables"].keys() == want["tables"].keys()
    rows = _embeddings(tmp, stage)
    _assert_same_vectors(rows, want_rows)
    for side in SIDES:
        assert {r for _, r in rows[side].values()} == {got["run_id"]}, side
    from orchestration.artifacts import committed_embeddings
    from rec_models.config import load_config

    cfg = load_config(method="kd", overrides=[f"warehouse.root={tmp / 'wh'}"])
    assert committed_embeddings(cfg, stage, "v1").run_id == got["run_id"]


@pytest.mark.slow
def test_a_rerun_after_the_feature_build_failed_builds_them_then_runs_once(straight, tmp_path, monkeypatch):
    """The build dies after writing the tables, before the spec file: the tables are not
    complete, so the rerun builds them again (the run id starts there: no run before it).
    That rerun then fails in the student's training: the next one reads back the teacher
    trained on the spec the build returned, with the spec now read from its file.

    The rebuilt tables hold the straight run's rows, but a Spark shuffle may order them
    differently from build to build, and the loader's seeded shuffle starts from that order:
    so the resumed run is compared with an uninterrupted run on these same tables."""
    straight_tmp = straight[0]
    spy = Spy(monkeypatch, fail="features")
    code, _, err = _distill(tmp_path, "features", "train.resume=auto")
    assert code == 1 and "injected failure in stage features" in err, err[-3000:]
    assert spy.did() == {"builds": 1, "cross_encoder": 0, "kd": 0, "dssm": 0, "writes": 0}
    assert (tmp_path / "wh" / "samples").exists() and not (tmp_path / "wh" / "feature_spec.json").exists()
    spy = Spy(monkeypatch, fail="kd")
    code, _, err = _distill(tmp_path, "features", "train.resume=auto")
    assert code == 1 and "injected failure in stage kd" in err, err[-3000:]
    assert spy.did() == {"builds": 1, "cross_encoder": 1, "kd": 0, "dssm": 0, "writes": 0}
    failed = _run_id(tmp_path, "features")
    spy = Spy(monkeypatch)
    code, got, err = _distill(tmp_path, "features", "train.resume=auto")
    assert code == 0, err[-3000:]
    assert spy.did() == {"builds": 0, "cross_encoder": 0, "kd": 1, "dssm": 1, "writes": 1}
    assert got["run_id"] == failed["run_id"]
    assert _sample_rows(tmp_path) == _sample_rows(straight_tmp)
    spy = Spy(monkeypatch)
    code, want, err = _distill(tmp_path, "uninterrupted")
    assert code == 0, err[-3000:]
    assert spy.did() == {"builds": 0, "cross_encoder": 1, "kd": 1, "dssm": 1, "writes": 1}
    _assert_same_metrics(got["metrics"], want["metrics"])
    _assert_same_vectors(_embeddings(tmp_path, "features"), _embeddings(tmp_path, "uninterrupted"))


def _sample_rows(tmp: Path) -> list[tuple]:
    """The samples table's rows, sorted (a multiset: the build's row order is not fixed)."""
    from etl import delta_io

    t = delta_io.read_arrow(str(tmp / "wh" / "samples"))
    return sorted(zip(*(map(repr, t.column(c).to_pylist()) for c in sorted(t.column_names))))


@pytest.mark.slow
def test_a_rerun_after_success_is_a_new_run_with_the_same_rows(straight, monkeypatch):
    """train.resume=auto after a finished run: a new run id, every training again (as a new
    run), the feature tables untouched, and the same embedding rows under the new id."""
    from etl import delta_io

    tmp, want, want_rows = straight
    versions = {t: delta_io.table_version(str(tmp / "wh" / t)) for t in ("user_features", "item_features", "samples")}
    spy = Spy(monkeypatch)
    code, got, err = _distill(tmp, "straight", "train.resume=auto")
    assert code == 0, err[-3000:]
    assert got["run_id"] != want["run_id"]
    assert spy.did() == {"builds": 0, "cross_encoder": 1, "kd": 1, "dssm": 1, "writes": 1}
    assert {t: delta_io.table_version(str(tmp / "wh" / t)) for t in versions} == versions
    _assert_same_metrics(got["metrics"], want["metrics"])
    rows = _embeddings(tmp, "straight")
    _assert_same_vectors(rows, want_rows)
    assert {r for side in SIDES for _, r in rows[side].values()} == {got["run_id"]}


# ---- the training record, without Spark (fast) ------------------------------------------

def test_a_training_record_is_read_back_only_for_its_run_fingerprint_and_checkpoint(tmp_path, caplog):
    from orchestration.artifacts import record_training, recorded_training, training_record_path

    caplog.set_level("INFO", logger="orchestration.artifacts")
    ckpt = tmp_path / "checkpoints" / "r1" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    result = {"checkpoint": str(ckpt), "test": {"student_auc": 0.7}, "history": [{"epoch": 0}]}
    assert recorded_training(str(tmp_path), "r1", "f1") is None          # nothing recorded
    record_training(str(tmp_path), "r1", "f1", result)
    assert recorded_training(str(tmp_path), "r1", "f1") == result
    assert recorded_training(str(tmp_path), "r2", "f1") is None          # another run's
    assert recorded_training(str(tmp_path), "r1", "f2") is None          # another conf, spec or teachers
    assert "another conf" in caplog.text
    ckpt.unlink()
    assert recorded_training(str(tmp_path), "r1", "f1") is None          # its checkpoint is gone
    assert "is gone" in caplog.text
    ckpt.write_bytes(b"x")
    Path(training_record_path(str(tmp_path), "r1")).write_text('{"run_id": "r1", "res')   # a torn file
    assert recorded_training(str(tmp_path), "r1", "f1") is None
    assert "unreadable" in caplog.text
    assert [p.name for p in ckpt.parent.iterdir() if p.suffix == ".tmp"] == []


def test_a_record_that_cannot_be_written_leaves_the_old_one(tmp_path):
    from orchestration.artifacts import record_training, recorded_training

    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"x")
    record_training(str(tmp_path), "r1", "f1", {"checkpoint": str(ckpt), "v": 1})
    with pytest.raises(TypeError):
        record_training(str(tmp_path), "r1", "f1", {"checkpoint": str(ckpt), "v": object()})
    assert recorded_training(str(tmp_path), "r1", "f1") == {"checkpoint": str(ckpt), "v": 1}
    assert not list((tmp_path / "checkpoints" / "r1").glob("*.tmp"))


@pytest.mark.slow
def test_a_token_method_is_compared_with_its_own_undistilled_student(straight, monkeypatch):
    """distill.train_baseline: the baseline is the method's own student trained without a
    teacher (VIRT: the token towers with attention), not DSSM: like for like."""
    tmp, _, _ = straight
    spy = Spy(monkeypatch)
    code, out, err = _run(distill, tmp, "run.name=virt_base", *KD, args=["--method", "virt"])
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert spy.trainings["token_dual_encoder_attn"] == 1 and spy.trainings["dssm"] == 0, spy.trainings
    assert result["metrics"]["baseline"]["method"] == "token_dual_encoder_attn"
    assert 0.0 <= result["metrics"]["baseline_retrieval"]["recall@50"] <= 1.0

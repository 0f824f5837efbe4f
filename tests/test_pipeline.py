"""End to end on a small synthetic set: spark-submit's entry points, called in-process
(one SparkSession), from raw events to Delta embedding tables and metrics."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from etl import delta_io

pytestmark = pytest.mark.slow

SMALL = [
    "data.source.synthetic.n_users=400", "data.source.synthetic.n_items=250",
    "data.source.synthetic.n_events=40000", "data.source.synthetic.partitions=4",
    "train.epochs=3",
]


def _run_job(module, tmp, capsys, *overrides, args=()):
    argv = list(args)
    for item in [f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}", *SMALL, *overrides]:
        argv += ["--set", item]
    code = module.run(module.__doc__, module.body, getattr(module, "options", None), argv=argv)
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return json.loads(out.out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pfd_run(spark, tmp_path_factory):
    from jobs import distill_pfd

    tmp = tmp_path_factory.mktemp("e2e")
    capsys = _Capture()
    with capsys:
        result = _run_job(distill_pfd, tmp, capsys)
    return tmp, result


class _Capture:
    """capsys for a module-scoped fixture (pytest's own is function-scoped)."""

    def __enter__(self):
        import io
        import sys

        self._old, self._buf = sys.stdout, io.StringIO()
        sys.stdout = self._buf
        return self

    def __exit__(self, *exc):
        import sys

        sys.stdout = self._old

    def readouterr(self):
        text = self._buf.getvalue()
        self._buf.seek(0)
        self._buf.truncate()
        return type("Out", (), {"out": text, "err": ""})()


def test_teacher_beats_baseline_and_every_head_is_calibrated(pfd_run):
    # the students are retrievers (student.objective); their retrieval against the
    # undistilled one is checked at full size in tests/test_quickstart_retrieval.py
    _, result = pfd_run
    m = result["metrics"]
    assert m["teacher"]["auc"] > m["baseline"]["auc"] + 0.02, m
    assert set(m["baseline_retrieval"]) >= {"recall@10", "recall@50", "ndcg@50"}
    for head in ("teacher", "student", "baseline"):
        assert 0.0 < m[head]["logloss"] < 0.69, (head, m)   # better than a coin
        assert m[head]["rows"] > 1000


def test_embedding_tables_hold_every_entity_once_and_nothing_privileged(pfd_run):
    tmp, result = pfd_run
    tables = result["tables"]
    for side in ("user", "item"):
        emb = delta_io.read_arrow(tables[f"{side}_embeddings"])
        feats = delta_io.read_arrow(tables[f"{side}_features"], [f"{side}_key"])
        assert set(emb.column_names) == {"id", "vector", "score_kind", "shape", "model_name", "model_version",
                                         "run_id", "created_at"}
        assert set(emb["score_kind"].to_pylist()) == {"dot"} and emb["shape"][0].as_py() == [32]
        assert emb.num_rows == feats.num_rows
        assert sorted(emb["id"].to_pylist()) == sorted(feats[f"{side}_key"].to_pylist())
        lengths = set(pa.compute.list_value_length(emb["vector"]).to_pylist())
        assert lengths == {32}
        vectors = np.stack(emb["vector"].to_numpy(zero_copy_only=False))
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
        assert set(emb["run_id"].to_pylist()) == {result["run_id"]}
        assert set(emb["model_version"].to_pylist()) == {"v1"}


def test_retrieval_from_tables_beats_random(pfd_run):
    _, result = pfd_run
    r = result["metrics"]["student_retrieval"]
    n_items = r["items"]
    assert n_items == 250 and r["users"] > 100
    # random top-K recall is K / n_items in expectation
    assert r["recall@10"] > 1.5 * 10 / n_items, r
    assert r["recall@50"] > 1.2 * 50 / n_items, r
    assert 0 < r["ndcg@10"] <= 1


def test_the_job_result_carries_the_retrieval_baselines_on_the_same_test_set(pfd_run):
    """eval.baselines (default true): most popular, ALS and BPR beside the student, with
    its metric keys and over the same test users and clicks."""
    _, result = pfd_run
    student, baselines = result["metrics"]["student_retrieval"], result["metrics"]["retrieval_baselines"]
    assert set(baselines) == {"most_popular", "als", "als_train", "bpr", "bpr_train"}
    for name, b in baselines.items():
        assert {k for k in student if "@" in k} <= set(b), name
        assert b["users"] == student["users"] and b["positives"] == student["positives"], (name, b, student)
        assert b["recall@50"] > 1.2 * 50 / student["items"], (name, b)
    assert set(baselines["als"]["chosen"]) >= {"factors", "regularization"}


def test_chained_jobs_rerun_replace_their_rows(pfd_run, capsys):
    """write_embeddings reads what distill_pfd left; a rerun of the same version does not
    duplicate rows; another version adds its own partition."""
    from jobs import write_embeddings

    tmp, first = pfd_run
    uri = first["tables"]["user_embeddings"]
    before = delta_io.read_arrow(uri).num_rows
    version = delta_io.table_version(uri)
    again = _run_job(write_embeddings, tmp, capsys)
    assert delta_io.table_version(uri) == version + 1
    assert delta_io.read_arrow(uri).num_rows == before
    assert again["metrics"]["student_retrieval"]["recall@10"] == pytest.approx(
        first["metrics"]["student_retrieval"]["recall@10"])
    bundle = str(tmp / "runs" / "pfd_student" / "v1" / "student.pt")
    _run_job(write_embeddings, tmp, capsys, "run.version=v2", args=["--bundle", bundle])
    versions = delta_io.read_arrow(uri, ["model_version"])["model_version"].to_pylist()
    assert sorted(set(versions)) == ["v1", "v2"] and len(versions) == 2 * before


def test_teacher_job_then_distillation_from_frozen_teacher(pfd_run, capsys):
    from jobs import distill_pfd, train_teacher

    tmp, first = pfd_run
    teacher = _run_job(train_teacher, tmp, capsys, "run.name=frozen")
    assert teacher["metrics"]["teacher"]["auc"] > first["metrics"]["baseline"]["auc"]
    frozen = _run_job(distill_pfd, tmp, capsys, "run.name=frozen", "distill.train_baseline=false",
                      f"distill.teacher_checkpoint={teacher['checkpoint']}")
    assert frozen["metrics"]["teacher"]["auc"] > first["metrics"]["baseline"]["auc"]
    assert "baseline" not in frozen["metrics"]
    # the frozen teacher's own weights came through the distillation run unchanged (its
    # public embeddings are the student's, shared, and keep training)
    import torch

    from rec_models.training.loop import load_checkpoint, load_trained

    before = load_checkpoint(teacher["checkpoint"])["model"]
    model = load_trained(frozen["checkpoint"])[0]
    teacher_only = {id(p) for m in model.teacher.teacher_only_modules() for p in m.parameters()}
    after = {n: p for n, p in model.named_parameters() if id(p) in teacher_only}
    assert after
    for name, value in after.items():
        assert torch.equal(value, before[name]), name
    student = {n for n, _ in model.named_parameters() if n.startswith("student.")}
    assert student and not any(n in after for n in student)


def test_restore_best_epoch_keeps_the_epoch_of_best_validation_recall(pfd_run, monkeypatch):
    """A student's valid Recall@50 (over the catalogue) scripted to peak at epoch 1 of 3,
    its valid AUC to rise throughout: the kept model, its checkpoint and its test metrics
    are epoch 1's (students are selected as retrievers); without the option they are the
    last epoch's."""
    import torch

    from orchestration import pipeline
    from rec_models.training import loop as train
    from rec_models.training.validation import RetrievalValidation
    from rec_models.config import load_config

    tmp, _ = pfd_run
    cfg = load_config(method="dssm", overrides=[f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}",
                                                *SMALL, "train.restore_best_epoch=true", "train.num_threads=1"])
    spec = pipeline.load_spec(cfg)
    files = pipeline.training_files(cfg, spec)
    scripted = iter([0.21, 0.25, 0.23])
    aucs = iter([0.6, 0.7, 0.8, 0.9] * 3)
    real_evaluate = train.evaluate
    real_retrieval = RetrievalValidation.__call__

    def evaluate(model, paths, *args):
        metrics = real_evaluate(model, paths, *args)
        return {**metrics, "student_auc": next(aucs)} if paths == files["valid"] else metrics

    def retrieval(self, student, device):
        return {**real_retrieval(self, student, device), "student_recall@50": next(scripted)}

    monkeypatch.setattr(train, "evaluate", evaluate)
    monkeypatch.setattr(RetrievalValidation, "__call__", retrieval)
    out = tmp / "runs" / "restore_best"
    result = pipeline.train(cfg, spec, "dssm", str(out), "r")
    assert result["selected_epoch"] == 1 and len(result["history"]) == 3
    kept = train.load_checkpoint(result["checkpoint"])
    run_ckpts = out / "checkpoints" / "r"           # checkpoints live under the run id
    assert result["checkpoint"] == str(run_ckpts / "last.pt")
    epoch_1 = train.load_checkpoint(str(run_ckpts / "epoch_1.pt"))
    epoch_2 = train.load_checkpoint(str(run_ckpts / "epoch_2.pt"))
    assert kept["epoch"] == 1
    for name, value in epoch_1["model"].items():
        assert torch.equal(kept["model"][name], value), name
    assert any(not torch.equal(epoch_2["model"][n], v) for n, v in epoch_1["model"].items())
    model = train.load_trained(str(run_ckpts / "epoch_1.pt"))[0]
    assert result["test"] == pytest.approx(real_evaluate(model, files["test"], spec, cfg, torch.device("cpu")))

    scripted = iter([0.21, 0.25, 0.23])
    last = pipeline.train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"restore_best_epoch": False})}),
                          spec, "dssm", str(tmp / "runs" / "keep_last"), "r")
    assert last["selected_epoch"] == 2

    # early stopping (patience 1) ends after epoch 2; the kept model is still epoch 1's
    scripted = iter([0.21, 0.25, 0.23, 0.9])
    stopped = pipeline.train(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"epochs": 4, "early_stopping_patience": 1})}), spec, "dssm", str(tmp / "runs" / "stopped"), "r")
    assert len(stopped["history"]) == 3 and stopped["selected_epoch"] == 1


def test_a_refit_job_trains_on_the_train_and_valid_files_and_keeps_the_rest():
    from rec_models.training.loop import TrainJob

    job = TrainJob(kind="dssm", config={}, spec_json="{}", out_dir="runs/a",
                   files={"train": ["t0", "t1"], "valid": ["v0"], "test": ["s0"], "items": ["i0"]})
    assert job.train_splits == ("train",)
    refit = job.as_refit(3, "runs/a/refit")
    assert refit.train_splits == ("train", "valid") and refit.refit_epochs == 3 and refit.out_dir == "runs/a/refit"
    assert refit.files == {"train": ["t0", "t1", "v0"], "valid": ["v0"], "test": ["s0"], "items": ["i0"]}
    assert job.files["train"] == ["t0", "t1"] and job.refit_epochs is None   # the selection job is left as it was


def test_refit_trains_the_selected_epochs_again_on_train_and_valid(pfd_run, monkeypatch):
    """train.refit=train_valid: valid Recall@50 scripted to peak at epoch 1 of 3, so the
    refit trains 2 epochs, on train + valid (more steps per epoch), without validating;
    its model is the result's checkpoint, test metrics and the published last.pt, while
    the selection's history and epoch are kept."""
    import torch

    from orchestration import pipeline
    from rec_models.training import loop as train
    from rec_models.training.validation import RetrievalValidation
    from rec_models.config import load_config

    tmp, _ = pfd_run
    cfg = load_config(method="dssm", overrides=[f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}",
                                                *SMALL, "train.refit=train_valid", "train.num_threads=1"])
    spec = pipeline.load_spec(cfg)
    files = pipeline.training_files(cfg, spec)
    scripted = iter([0.21, 0.25, 0.23])
    real_retrieval = RetrievalValidation.__call__
    monkeypatch.setattr(RetrievalValidation, "__call__", lambda self, student, device: {
        **real_retrieval(self, student, device), "student_recall@50": next(scripted)})
    out = tmp / "runs" / "refit"
    result = pipeline.train(cfg, spec, "dssm", str(out), "r")

    assert result["selected_epoch"] == 1 and len(result["history"]) == 3
    refit = result["refit"]
    assert refit["epochs"] == 2 and len(refit["history"]) == 2
    assert not any(k.startswith("valid_") for h in refit["history"] for k in h)   # valid is training data now
    steps_per_epoch = result["history"][0]["steps"]
    assert refit["history"][0]["steps"] > steps_per_epoch   # train + valid rows
    with open(os.path.join(os.path.dirname(refit["selection_checkpoint"]), "metrics.json")) as fh:
        selection_seconds = json.load(fh)["train_seconds"]
    assert result["train_seconds"] == pytest.approx(selection_seconds + refit["train_seconds"])
    assert refit["train_seconds"] > 0
    served = train.load_checkpoint(result["checkpoint"])
    selected = train.load_checkpoint(refit["selection_checkpoint"])
    assert served["epoch"] == 1 and selected["epoch"] == 1
    assert any(not torch.equal(served["model"][n], v) for n, v in selected["model"].items())
    published = train.load_checkpoint(str(out / "checkpoints" / "last.pt"))
    for name, value in served["model"].items():
        assert torch.equal(published["model"][name], value), name
    model = train.load_trained(result["checkpoint"])[0]
    assert result["test"] == pytest.approx(train.evaluate(model, files["test"], spec, cfg, torch.device("cpu")))
    assert refit["selection_test"] != result["test"]


def test_torch_distributor_backend_trains_two_ranks(pfd_run, capsys):
    """Same job, Spark's TorchDistributor with 2 gloo processes; its checkpoint loads locally."""
    from jobs import train_teacher
    from rec_models.training.loop import load_trained

    tmp, first = pfd_run
    result = _run_job(train_teacher, tmp, capsys, "run.name=td", "train.backend=torch_distributor",
                      "train.num_processes=2")
    assert result["metrics"]["teacher"]["auc"] > first["metrics"]["baseline"]["auc"]
    model, spec, cfg = load_trained(result["checkpoint"])
    assert cfg.train.backend == "torch_distributor" and type(model).__name__ == "TeacherOnly"


def test_embedding_job_reads_only_public_tower_inputs(pfd_run, monkeypatch):
    from orchestration import embeddings, pipeline
    from rec_models.config import load_config

    tmp, first = pfd_run
    cfg = load_config(overrides=[f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}", *SMALL])
    requested = []
    real_read = delta_io.read_table

    def spy(spark, uri, columns=None, partition_filters=None, version=None):
        requested.append(list(columns))
        return real_read(spark, uri, columns=columns, partition_filters=partition_filters, version=version)

    monkeypatch.setattr(embeddings.delta_io, "read_table", spy)
    tag = embeddings.ModelTag("spy", "v1", "r1")
    pipeline.write_embeddings(delta_io_spark(), cfg, first["bundle"], tag)
    read = {c for cols in requested for c in cols}
    assert read and not read & cfg.spec.privileged_names
    assert "label" not in read


def test_embedding_job_refuses_a_tower_that_reads_privileged_columns(pfd_run, monkeypatch):
    from orchestration import embeddings
    from rec_models.serving import export
    from rec_models.config import load_config
    from rec_models.spec import PrivilegedLeakError

    tmp, first = pfd_run
    cfg = load_config(overrides=[f"warehouse.root={tmp / 'wh'}", *SMALL])
    student, _, meta = export.load_student(first["bundle"])
    full_spec = cfg.spec
    monkeypatch.setattr(type(student), "user_input_names", property(lambda self: ["user_id", "ucat_ctr_7d"]))
    monkeypatch.setattr(export, "load_student", lambda path: (student, full_spec, meta))
    with pytest.raises(PrivilegedLeakError, match="ucat_ctr_7d"):
        embeddings.write_embeddings(delta_io_spark(), cfg, first["bundle"], embeddings.ModelTag("leak", "v1", "r"))
    assert not delta_io.read_arrow(first["tables"]["user_embeddings"], ["model_name"],
                                   [("model_name", "=", "leak")]).num_rows


def delta_io_spark():
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession()


def test_failed_rebuild_keeps_the_pinned_snapshot_readable(pfd_run, spark, monkeypatch):
    """The spec names the table versions it was built with: a rebuild that dies after
    rewriting some tables leaves the previous spec and its snapshot intact for training."""
    from etl import build
    from orchestration import pipeline
    from rec_models.config import load_config

    tmp, _ = pfd_run
    cfg = load_config(overrides=[f"warehouse.root={tmp / 'wh'}", *SMALL])
    spec = pipeline.load_spec(cfg)
    before = {s: sorted(f) for s, f in pipeline.training_files(cfg, spec).items()}
    real_write, calls = delta_io.write_table, []

    def fail_on_samples(df, uri, **kw):
        calls.append(uri)
        if uri.endswith("samples"):
            raise RuntimeError("executor lost")
        return real_write(df, uri, **kw)

    monkeypatch.setattr(build.delta_io, "write_table", fail_on_samples)
    with pytest.raises(RuntimeError, match="executor lost"):
        build.build_features(spark, cfg)
    assert len(calls) == 3                      # user and item features were rewritten
    still = pipeline.load_spec(cfg)
    assert still.table_versions == spec.table_versions
    assert {s: sorted(f) for s, f in pipeline.training_files(cfg, still).items()} == before

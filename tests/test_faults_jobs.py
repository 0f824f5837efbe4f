"""Faults a careful operator meets, through the jobs as they run (in-process ``run(argv)``):
for each bad input, the exit code, the message naming the key or file, and the state left
behind (no feature table built, no run folder written, no code run from a crafted file).
Then interrupted training: checkpoints under the run id, and ``train.resume=auto``.

Exit codes (README, "Errors"): 0 success; 2 a user error, one line naming the problem, no
traceback; 1 a bug, with its traceback.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from jobs import _common, distill, evaluate, train_teacher, write_embeddings

# tiny synthetic data: ETL in seconds, a training epoch in well under a second
TINY = [
    "data.source.synthetic.n_users=60", "data.source.synthetic.n_items=40",
    "data.source.synthetic.n_events=3000", "data.source.synthetic.partitions=2",
    "train.epochs=3", "train.batch_size=128", "train.num_threads=1", "train.log_every=1000",
    "model.embedding_dim=8", "model.tower_dims=[16]", "model.output_dim=8", "model.teacher_dims=[16]",
]


def _run(module, tmp: Path, *overrides, args=(), conf=()):
    """(exit code, stdout, stderr) of one job, with its warehouse and runs under ``tmp``."""
    argv = list(args)
    for f in conf:
        argv += ["--conf", str(f)]
    for item in [f"warehouse.root={tmp / 'wh'}", f"run.output_dir={tmp / 'runs'}", *TINY, *overrides]:
        argv += ["--set", item]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.run(module.__doc__, module.body, getattr(module, "options", None), argv=argv)
    return code, out.getvalue(), err.getvalue()


def _bad_yaml(tmp: Path) -> Path:
    path = tmp / "broken.yaml"
    path.write_text("train:\n  epochs: [1,\n bad: : x\n")
    return path


def _list_yaml(tmp: Path) -> Path:
    path = tmp / "a_list.yaml"
    path.write_text("- train.epochs=1\n")
    return path


# (case, job, overrides, extra args, --conf files (made from tmp), message fragments)
CONFIG_CASES = [
    ("malformed YAML file", distill, [], [], [_bad_yaml], ["broken.yaml", "line 3"]),
    ("YAML file that is a list", distill, [], [], [_list_yaml], ["a_list.yaml", "not a mapping"]),
    ("malformed override", distill, ["eval.k=[10,oops"], [], [], ["eval.k=[10,oops", "--set"]),
    ("run.name escapes the runs root", distill, ["run.name=../../escape"], [], [], ["run.name", "../../escape", "not a safe folder name"]),
    ("absolute run.name", distill, ["run.name={tmp}/escape_abs"], [], [], ["run.name", "escape_abs", "not a safe folder name"]),
    ("run.version with ..", train_teacher, ["run.version=v1/../../x"], [], [], ["run.version", "not a safe folder name"]),
    ("run.version '..'", evaluate, ["run.version=.."], [], [], ["run.version='..'", "not a safe folder name"]),
    ("unknown train.resume", distill, ["train.resume=maybe"], [], [], ["train.resume"]),
    ("typo in distill.params", distill, ["distill.method=kd", "distill.params.soft_wieght=0.3"], [], [],
     ["distill.params.soft_wieght", "unknown key", "'kd'"]),
    ("bad value in distill.params", distill, ["distill.method=kd", "distill.params.soft_weight=2"], [], [],
     ["distill.params.soft_weight"]),
    ("params given to a method that takes none", distill, ["distill.method=dssm", "distill.params.layers=2"], [], [],
     ["distill.params", "'dssm' takes no parameters"]),
    ("typo in distill.teacher_params", distill,
     ["distill.method=kd", "distill.teacher_params.cross_encoder.layrs=2"], [], [],
     ["distill.teacher_params.cross_encoder.layrs", "unknown key"]),
    ("teacher_params of an unknown method", distill, ["distill.teacher_params.cross_encodr.layers=2"], [], [],
     ["distill.teacher_params.cross_encodr", "unknown method"]),
    ("typo in the trained teacher's params", train_teacher, ["distill.teacher_params.cross_encoder.hedas=2"],
     ["--teacher", "cross_encoder"], [], ["distill.teacher_params.cross_encoder.hedas"]),
    ("unknown teacher", train_teacher, [], ["--teacher", "nope"], [], ["nope"]),
    ("missing teacher checkpoint", distill, ["distill.method=kd", "distill.teachers.cross_encoder=/nowhere/ce.pt"],
     [], [], ["distill.teachers.cross_encoder", "/nowhere/ce.pt"]),
    ("missing PFD teacher checkpoint", distill, ["distill.teacher_checkpoint=/nowhere/t.pt"], [], [],
     ["distill.teacher_checkpoint", "/nowhere/t.pt"]),
]


@pytest.mark.parametrize("case, job, overrides, args, conf, fragments", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_user_errors_stop_the_job_before_any_work(tmp_path, case, job, overrides, args, conf, fragments):
    """Exit 2, one message naming the key, file or override, no traceback, no result line;
    nothing written: no warehouse (so no feature table), no run folder, nothing outside."""
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    code, out, err = _run(job, tmp_path, *overrides, args=args, conf=[make(tmp_path) for make in conf])
    assert code == 2, err[-3000:]
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert out == ""
    assert not (tmp_path / "wh").exists() and not (tmp_path / "runs").exists()
    # runs/../../escape would be tmp_path.parent/escape
    assert not (tmp_path / "escape_abs").exists() and not (tmp_path.parent / "escape").exists()


def _good_checkpoint(tmp: Path) -> Path:
    """A real (tiny) checkpoint of this project, written by the training loop's save_checkpoint."""
    import torch

    from rec_models.config import load_config
    from rec_models.training.loop import TrainJob, _rng_state, build_model, save_checkpoint
    from tests.test_models import SIZES

    cfg = load_config(method="dssm", overrides=TINY)
    spec = cfg.spec.resolve(SIZES)
    model = build_model("dssm", spec, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    job = TrainJob(kind="dssm", config=cfg.model_dump(mode="json"), spec_json=spec.to_json(), files={},
                   out_dir=str(tmp), tags={"run_id": "r1", "name": "n", "version": "v"})
    path = tmp / "good.pt"
    save_checkpoint(str(path), model, opt, 0, 1, job,
                    extra={"loop": {"history": [{"epoch": 0, "valid_auc": 0.5}], "best_auc": -1.0, "since_best": 0,
                                    "best_epoch": None, "train_seconds": 0.1, "stopped": False},
                           "rng": _rng_state(torch.device("cpu"))})
    return path


class _RunsCode:
    """A pickled object that runs code when unpickled (what weights_only=False would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _empty(tmp):
    (tmp / "empty.pt").write_bytes(b"")
    return tmp / "empty.pt", "0 bytes"


def _truncated(tmp):
    good = _good_checkpoint(tmp).read_bytes()
    (tmp / "truncated.pt").write_bytes(good[: len(good) // 2])
    return tmp / "truncated.pt", "truncated"


def _crafted(tmp):
    import torch

    torch.save({"model": _RunsCode(str(tmp / "code_ran")), "kind": "dssm", "config": {}, "spec_json": "{}"},
               tmp / "crafted.pt")
    return tmp / "crafted.pt", "weights_only=True refused"


def _not_a_checkpoint(tmp):
    import torch

    torch.save({"weights": torch.zeros(2)}, tmp / "other.pt")
    return tmp / "other.pt", "missing model, kind, config, spec_json"


def _folder(tmp):
    (tmp / "ckpt_dir").mkdir()
    return tmp / "ckpt_dir", "is a folder"


CHECKPOINT_CASES = [("empty", _empty), ("truncated", _truncated), ("crafted pickle", _crafted),
                    ("not a checkpoint", _not_a_checkpoint), ("a folder", _folder)]


@pytest.mark.parametrize("case, make", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoints_are_named_user_errors(tmp_path, case, make):
    """evaluate --checkpoint FILE: exit 2 naming the file; a crafted file runs no code."""
    path, fragment = make(tmp_path)
    code, out, err = _run(evaluate, tmp_path, args=["--checkpoint", str(path)])
    assert code == 2, err[-3000:]
    assert str(path) in err and fragment in err and "Traceback" not in err, err
    assert out == "" and not (tmp_path / "code_ran").exists()
    assert not (tmp_path / "runs").exists()          # no evaluation.json, no report


def test_every_checkpoint_loads_with_weights_only(tmp_path):
    """Everything a checkpoint holds (conf, spec, tags, optimizer, loop and RNG state) is
    plain data: torch.load(weights_only=True) reads it, and the loop's loader uses it."""
    import torch

    from rec_models.training.loop import load_checkpoint

    path = _good_checkpoint(tmp_path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "config", "spec_json", "tags", "loop", "rng"} <= set(raw)
    assert load_checkpoint(str(path))["tags"]["run_id"] == "r1"
    # no torch.load of a checkpoint anywhere in the code with weights_only=False
    root = Path(__file__).resolve().parents[1]
    for folder in ("jobs", "orchestration", "rec_models", "etl", "benchmarks"):
        for file in (root / folder).rglob("*.py"):
            assert "weights_only=False" not in file.read_text(), file


def test_missing_bundle_and_corrupt_bundle_are_named(tmp_path):
    code, _, err = _run(write_embeddings, tmp_path, args=["--bundle", str(tmp_path / "none.pt")])
    assert code == 2 and "no student bundle" in err and "none.pt" in err
    (tmp_path / "bad.pt").write_bytes(b"not a bundle")
    code, _, err = _run(write_embeddings, tmp_path, args=["--bundle", str(tmp_path / "bad.pt")])
    assert code == 2 and str(tmp_path / "bad.pt") in err and "Traceback" not in err, err


# ---------------------------------------------------------------- user error or bug


def _raises(exc):
    def body(args, cfg):
        raise exc
    return body


@pytest.mark.parametrize("exc, code, traceback", [
    (__import__("rec_models.config", fromlist=["ConfigError"]).ConfigError("train.x: bad"), 2, False),
    (__import__("rec_models.config", fromlist=["BadInputError"]).BadInputError("file f: truncated"), 2, False),
    (__import__("rec_models.config", fromlist=["InputNotFoundError"]).InputNotFoundError("no file f"), 2, False),
    (ValueError("a bug deep in training"), 1, True),
    (KeyError("a bug"), 1, True),
    (FileNotFoundError("an internal file"), 1, True),
    (IndexError("index out of range"), 1, True),
])
def test_user_errors_exit_2_and_bugs_exit_1_with_their_traceback(exc, code, traceback):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        got = _common.run("test", _raises(exc), argv=[])
    assert got == code and out.getvalue() == ""
    assert ("Traceback" in err.getvalue()) is traceback
    assert str(exc).strip("'") in err.getvalue()


def test_input_errors_of_etl_are_user_errors():
    from etl.sources import InputError

    assert _common.is_user_error(InputError("events table: missing column(s) label"))
    assert not _common.is_user_error(ValueError("plain"))


def test_every_method_conf_validates_with_its_params_model():
    """The registry's params models accept what conf/method/<name>.yaml sets (so the early
    check refuses nothing the builders accept)."""
    from orchestration.pipeline import validate_params
    from rec_models.config import load_config
    from rec_models.methods import METHODS

    for name in METHODS:
        cfg = load_config(method=name)
        validate_params(cfg, name)


# ---------------------------------------------------------------- interrupted training


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def _kill_after_epoch(monkeypatch, epoch: int):
    """Training dies right after epoch ``epoch``'s checkpoint and run state are written."""
    from rec_models.training import loop

    real = loop.write_run_state

    def write_run_state(out_dir, state):
        real(out_dir, state)
        if not state["finished"] and state["last_complete_epoch"] == epoch:
            raise Killed(f"killed after epoch {epoch}")

    monkeypatch.setattr(loop, "write_run_state", write_run_state)


def _checkpoint_of(result: dict):
    from rec_models.training.loop import load_checkpoint

    return load_checkpoint(result["checkpoint"])


@pytest.fixture(scope="module")
def uninterrupted(spark, tmp_path_factory):
    """Features once (tiny), and the teacher trained 3 epochs without interruption."""
    tmp = tmp_path_factory.mktemp("faults")
    code, out, err = _run(train_teacher, tmp, "run.name=straight")
    assert code == 0, err[-3000:]
    return tmp, json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_model(uninterrupted, monkeypatch):
    """Killed after epoch 1 of 3, rerun with train.resume=auto: it continues the same run
    (same id, epochs 0 and 1 not retrained) and ends with the uninterrupted run's model."""
    import torch

    from rec_models.training import loop

    tmp, straight = uninterrupted
    _kill_after_epoch(monkeypatch, 1)
    with pytest.raises(Killed):
        _run(train_teacher, tmp, "run.name=killed", "train.resume=auto")
    folder = tmp / "runs" / "killed" / "v1" / "teachers" / "pfd_teacher"
    state = json.loads((folder / "run_state.json").read_text())
    run = json.loads((folder / "run.json").read_text())
    assert state["last_complete_epoch"] == 1 and not state["finished"] and state["run_id"] == run["run_id"]
    assert not run["finished"] and not (folder / "checkpoints" / "last.pt").exists()
    assert sorted(p.name for p in (folder / "checkpoints" / run["run_id"]).iterdir()) == ["epoch_0.pt", "epoch_1.pt"]
    monkeypatch.undo()

    epochs_trained = []
    real_set_epoch = None

    def spy(self, epoch):
        epochs_trained.append(epoch)
        return real_set_epoch(self, epoch)

    from rec_models.loaders.arrow import ArrowBatchLoader

    real_set_epoch = ArrowBatchLoader.set_epoch
    monkeypatch.setattr(ArrowBatchLoader, "set_epoch", spy)
    code, out, err = _run(train_teacher, tmp, "run.name=killed", "train.resume=auto")
    assert code == 0, err[-3000:]
    resumed = json.loads(out.strip().splitlines()[-1])
    assert resumed["run_id"] == run["run_id"] and epochs_trained == [2]
    assert resumed["checkpoint"] == str(folder / "checkpoints" / run["run_id"] / "last.pt")
    history = json.loads((folder / "checkpoints" / run["run_id"] / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]     # epochs 0-1 from the killed run's checkpoint
    a, b = _checkpoint_of(straight), _checkpoint_of(resumed)
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        assert torch.allclose(value, b["model"][name], atol=1e-6, rtol=0), name
    assert resumed["metrics"]["teacher"] == pytest.approx(straight["metrics"]["teacher"])
    assert json.loads((folder / "run.json").read_text())["finished"]
    # the finished run's model is where jobs/evaluate.py and the docs look for it
    published = loop.load_checkpoint(str(folder / "checkpoints" / "last.pt"))
    assert published["tags"]["run_id"] == run["run_id"]


@pytest.mark.slow
def test_without_resume_a_rerun_starts_a_new_run_and_never_mixes_checkpoints(uninterrupted, monkeypatch):
    """train.resume=never (the default): the rerun gets a new run id; each run's epoch
    checkpoints stay in its own folder; checkpoints/last.pt is the finished run's."""
    from rec_models.training import loop

    tmp, _ = uninterrupted
    _kill_after_epoch(monkeypatch, 0)
    with pytest.raises(Killed):
        _run(train_teacher, tmp, "run.name=rerun")
    monkeypatch.undo()
    folder = tmp / "runs" / "rerun" / "v1" / "teachers" / "pfd_teacher"
    killed_id = json.loads((folder / "run.json").read_text())["run_id"]
    code, out, err = _run(train_teacher, tmp, "run.name=rerun", "train.epochs=2")
    assert code == 0, err[-3000:]
    finished_id = json.loads(out.strip().splitlines()[-1])["run_id"]
    assert finished_id != killed_id
    ckpts = folder / "checkpoints"
    assert sorted(p.name for p in (ckpts / killed_id).iterdir()) == ["epoch_0.pt"]
    assert sorted(p.name for p in (ckpts / finished_id).iterdir()) == ["epoch_0.pt", "epoch_1.pt", "last.pt",
                                                                       "metrics.json", "result.json"]
    for path in (ckpts / finished_id).glob("*.pt"):
        assert loop.load_checkpoint(str(path))["tags"]["run_id"] == finished_id
    assert loop.load_checkpoint(str(ckpts / "last.pt"))["tags"]["run_id"] == finished_id


@pytest.mark.slow
def test_resume_refuses_a_run_trained_with_another_conf(uninterrupted, monkeypatch):
    """Same run folder, a changed conf (learning rate): auto does not continue the old
    epochs, it trains all of them."""
    from rec_models.loaders.arrow import ArrowBatchLoader

    tmp, _ = uninterrupted
    _kill_after_epoch(monkeypatch, 1)
    with pytest.raises(Killed):
        _run(train_teacher, tmp, "run.name=changed", "train.resume=auto")
    monkeypatch.undo()
    epochs = []
    real = ArrowBatchLoader.set_epoch
    monkeypatch.setattr(ArrowBatchLoader, "set_epoch", lambda self, e: (epochs.append(e), real(self, e))[1])
    code, _, err = _run(train_teacher, tmp, "run.name=changed", "train.resume=auto", "train.lr=0.01")
    assert code == 0, err[-3000:]
    assert epochs == [0, 1, 2]


@pytest.mark.slow
def test_a_params_typo_builds_no_feature_table(uninterrupted):
    """On a warehouse that has no features yet, a typo in distill.params stops the job
    before ETL: the warehouse stays empty (the first table case above, with the spark
    session up and everything else valid)."""
    tmp, _ = uninterrupted
    fresh = tmp / "fresh"
    code, _, err = _run(distill, fresh, "distill.method=kd", "distill.params.temprature=2")
    assert code == 2 and "distill.params.temprature" in err
    assert not (fresh / "wh").exists() and not (fresh / "runs").exists()

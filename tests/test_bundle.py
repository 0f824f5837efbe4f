"""The Databricks Asset Bundle (databricks.yml, resources/): the job resource checked
against databricks-bundles' typed job model (generated from the bundle schema; it refuses
unknown fields and bad values), the pipeline's task chain, targets and schedule, every
task's command line dry-run locally per target, and the wheel the tasks install."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ["build_features", "train_teacher", "distill", "write_embeddings", "evaluate"]


@pytest.fixture(scope="module")
def bundle():
    root = yaml.safe_load((ROOT / "databricks.yml").read_text())
    resources = {}
    for pattern in root["include"]:
        for path in sorted(ROOT.glob(pattern)):
            for kind, items in yaml.safe_load(path.read_text())["resources"].items():
                resources.setdefault(kind, {}).update(items)
    return root, resources


@pytest.fixture(scope="module")
def job(bundle):
    return bundle[1]["jobs"]["distill_two_tower"]


def test_the_job_resource_validates_against_the_bundle_job_model(job):
    from databricks.bundles.jobs import Job

    model = Job.from_dict(job)
    assert [t.task_key for t in model.tasks] == CHAIN
    with pytest.raises(ValueError, match="Unexpected field 'entrypoint'"):   # the model does refuse typos
        bad = dict(job["tasks"][0], python_wheel_task={**job["tasks"][0]["python_wheel_task"], "entrypoint": "x"})
        Job.from_dict({**job, "tasks": [bad]})


def test_tasks_chain_and_run_the_wheels_console_script(job):
    tasks = {t["task_key"]: t for t in job["tasks"]}
    for before, after in zip(CHAIN, CHAIN[1:]):
        assert tasks[after]["depends_on"] == [{"task_key": before}]
    for key, task in tasks.items():
        wheel = task["python_wheel_task"]
        assert (wheel["package_name"], wheel["entry_point"]) == ("distill_two_tower", "dtt")
        assert wheel["parameters"][0] == key
        assert task["libraries"] == [{"whl": "../dist/*.whl"}] and task["job_cluster_key"] == "pipeline"
    assert "--method" in tasks["distill"]["python_wheel_task"]["parameters"]
    schedule = job["schedule"]
    assert schedule["pause_status"] == "PAUSED" and len(schedule["quartz_cron_expression"].split()) == 6


def test_targets_have_their_catalog_schema_and_cluster(bundle):
    root, _ = bundle
    dev, prod = root["targets"]["dev"]["variables"], root["targets"]["prod"]["variables"]
    assert root["targets"]["dev"]["mode"] == "development" and root["targets"]["prod"]["mode"] == "production"
    assert dev["catalog"] != prod["catalog"] and dev["schema"] and prod["schema"]
    assert "-cpu-ml-" in dev["spark_version"] and "-gpu-ml-" in prod["spark_version"]
    assert prod["use_gpu"] == "true" and dev["use_gpu"] == "false"


def _variables(root, target):
    values = {k: v.get("default") for k, v in root["variables"].items()}
    values.update(root["targets"][target].get("variables", {}))
    return values


def _command(task, job, values, file_path="/Workspace/Users/someone/.bundle/distill_two_tower/dev/files"):
    params = {p["name"]: p["default"] for p in job["parameters"]}

    def substitute(text: str) -> str:
        text = re.sub(r"\{\{job\.parameters\.(\w+)\}\}", lambda m: str(params[m.group(1)]), text)
        text = text.replace("${workspace.file_path}", file_path)
        return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(values[m.group(1)]), text)

    return [substitute(p) for p in task["python_wheel_task"]["parameters"]]


def test_every_reference_is_declared(bundle, job):
    root, _ = bundle
    text = (ROOT / "resources" / "distill_job.yml").read_text()
    assert set(re.findall(r"\$\{var\.(\w+)\}", text)) <= set(root["variables"])
    assert set(re.findall(r"\{\{job\.parameters\.(\w+)\}\}", text)) <= {p["name"] for p in job["parameters"]}
    for target in ("dev", "prod"):
        missing = [k for k, v in _variables(root, target).items() if v is None]
        assert not missing, f"target {target} leaves variables {missing} without a value"


@pytest.mark.parametrize("target", ["dev", "prod"])
def test_every_task_dry_runs_locally(bundle, job, target, capsys):
    """Each task's command line, as the job runs it (variables and job parameters filled
    in), through the console script's function with --dry-run: the conf validates, the
    plan names the target's catalog tables, and nothing runs."""
    from jobs._common import cli

    root, _ = bundle
    values = _variables(root, target)
    for task in job["tasks"]:
        argv = _command(task, job, values)
        assert cli(argv + ["--dry-run"]) == 0, capsys.readouterr().err
        plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert plan["job"] == task["task_key"] and plan["dry_run"] and plan["profile"] == "databricks"
        tables = {**plan["reads"], **plan["writes"]}
        for key, entry in tables.items():
            if "uri" in entry:
                assert entry["catalog_name"] == f"{values['catalog']}.{values['schema']}.{key}"
                assert entry["uri"].startswith(values["warehouse_root"]) and entry["exists"] == "unknown"
        assert plan["tracking"]["uri"] == "databricks"
        assert plan["tracking"]["registered_model"] == f"{values['catalog']}.{values['schema']}.kd_student"
        assert plan["train"]["use_gpu"] == (values["use_gpu"] == "true")


def test_a_bad_job_parameter_fails_the_dry_run_naming_it(bundle, job, capsys):
    from jobs._common import cli

    root, _ = bundle
    argv = _command(job["tasks"][2], job, _variables(root, "dev")) + ["--set", "train.epochs=zero", "--dry-run"]
    assert cli(argv) == 2
    assert "train.epochs" in capsys.readouterr().err


@pytest.mark.slow
def test_the_wheel_installs_beside_pyspark_and_torch_without_replacing_them(tmp_path):
    """``python -m build`` makes the wheel; pip's resolver, asked to install it into a
    clean venv that already has this environment's pyspark and torch (as a Databricks
    runtime has its own), installs neither them nor mlflow or delta-spark."""
    dist = tmp_path / "dist"
    # --no-isolation: setuptools from this venv; an isolated build would fetch it from PyPI
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    wheel = next(dist.glob("distill_two_tower-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith("dist-info/METADATA"))).decode()
        entry = zf.read(next(n for n in zf.namelist() if n.endswith("dist-info/entry_points.txt"))).decode()
        names = zf.namelist()
    assert "dtt = jobs._common:cli" in entry
    assert any(n.startswith("orchestration/tracking.py") for n in names)
    base = [l.split(":", 1)[1].strip() for l in meta.splitlines() if l.startswith("Requires-Dist:") and "extra ==" not in l]
    assert not [r for r in base if re.match(r"(pyspark|torch|mlflow|delta-spark)\b", r)], base
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "runtime.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")   # the "runtime's" packages
    python = venv / "bin" / "python"
    have = subprocess.run([str(python), "-c", "import pyspark, torch; print(pyspark.__version__, torch.__version__)"],
                          capture_output=True, text=True, check=True).stdout.split()
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
                           "--report", str(report), str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    installs = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert "distill-two-tower" in installs
    replaced = {k: v for k, v in installs.items() if k in ("pyspark", "torch", "mlflow", "mlflow-skinny", "delta-spark")}
    assert not replaced, f"installing the wheel would replace {replaced} (installed: pyspark, torch {have})"

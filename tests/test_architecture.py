"""The layering of docs/architecture.md, checked on the source.

    jobs/ -> orchestration/ -> etl/ (Spark data work) and rec_models/ (torch only)

Every import statement counts, those inside functions too (a lazy import is still a
dependency). The checker itself is tested on small made-up trees, so a rule that could
never fail would show here.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "orchestration", "etl", "rec_models")
# what each layer may import from the project's other packages
ALLOWED = {
    "jobs": {"orchestration", "etl", "rec_models"},
    "orchestration": {"etl", "rec_models"},
    "etl": {"rec_models.spec", "rec_models.config"},   # the schema and the conf: a contract, not training code
    "rec_models": set(),
}
FORBIDDEN_THIRD_PARTY = {"rec_models": {"pyspark", "delta", "deltalake", "petastorm.spark", "horovod.spark"}}


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (a name that is a module's attribute maps
    to that module)."""
    files = {module_name(root, p): p for pkg in PACKAGES if (root / pkg).is_dir()
             for p in (root / pkg).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        deps = set()
        for name in imports_of(path, module):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        graph[module] = deps
    return graph


def layer_of(module: str) -> str:
    return module.split(".")[0]


def violations(root: Path) -> list[str]:
    problems = []
    graph = project_graph(root)
    for module, deps in sorted(graph.items()):
        layer = layer_of(module)
        for dep in sorted(deps):
            dep_layer = layer_of(dep)
            if dep_layer == layer:
                continue
            allowed = ALLOWED[layer]
            if dep_layer not in allowed and not any(dep == a or dep.startswith(a + ".") for a in allowed):
                problems.append(f"{module} imports {dep}: {layer}/ may import only {sorted(allowed) or 'itself'}")
        path = root / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = root / module.replace(".", "/") / "__init__.py"
        for name in imports_of(path, module):
            for banned in FORBIDDEN_THIRD_PARTY.get(layer, ()):
                if name == banned or name.startswith(banned + "."):
                    problems.append(f"{module} imports {name}: {layer}/ must not need {banned}")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component) + [sorted(component)[0]])

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# ---- the project -----------------------------------------------------------------------------
def test_the_project_keeps_its_layers():
    assert violations(ROOT) == []


def test_every_rec_models_module_imports_without_pyspark_or_the_spark_side():
    """rec_models/ runs in training workers and Arrow UDFs: it must import where pyspark,
    etl/ and orchestration/ cannot be imported at all."""
    modules = sorted(m for m in project_graph(ROOT) if layer_of(m) == "rec_models")
    script = textwrap.dedent(f"""
        import importlib, importlib.abc, sys
        BLOCKED = ("pyspark", "etl", "orchestration", "jobs", "delta", "deltalake")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked in this test: {{name}}")
        sys.meta_path.insert(0, Block())
        for name in {modules!r}:
            importlib.import_module(name)
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        print("imported", len({modules!r}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"imported {len(modules)}" in out.stdout
    assert len(modules) > 30


def test_the_methods_registry_is_the_one_map_of_names_to_builders():
    from rec_models.methods import METHODS

    for method in METHODS.values():
        module, _, fn = method.target.partition(":")
        assert layer_of(module) == "rec_models" and (ROOT / (module.replace(".", "/") + ".py")).exists(), method
        assert callable(getattr(__import__(module, fromlist=[fn]), fn))


# ---- the checker, on made-up trees -------------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


def test_checker_accepts_a_layered_tree(tmp_path):
    root = _tree(tmp_path, {
        "rec_models/spec.py": "import json\n",
        "rec_models/training/loop.py": "from rec_models import spec\n",
        "etl/build.py": "from rec_models.spec import FeatureSpec\n",
        "orchestration/pipeline.py": "def f():\n    from etl import build\n    from rec_models.training import loop\n",
        "jobs/run.py": "from orchestration import pipeline\n",
    })
    assert violations(root) == []


@pytest.mark.parametrize("files, expected", [
    ({"etl/build.py": "def f():\n    from rec_models.training.loop import train\n",
      "rec_models/training/loop.py": ""},
     "etl.build imports rec_models.training.loop"),
    ({"rec_models/loaders/conv.py": "from etl import delta_io\n", "etl/delta_io.py": ""},
     "rec_models.loaders.conv imports etl.delta_io"),
    ({"rec_models/launch.py": "def f():\n    from pyspark.ml.torch.distributor import TorchDistributor\n"},
     "rec_models.launch imports pyspark.ml.torch.distributor"),
    ({"orchestration/a.py": "from jobs import run\n", "jobs/run.py": ""}, "orchestration.a imports jobs.run"),
    ({"orchestration/a.py": "from orchestration import b\n", "orchestration/b.py": "def f():\n    from . import a\n"},
     "import cycle: orchestration.a -> orchestration.b -> orchestration.a"),
])
def test_checker_reports_a_broken_layering(tmp_path, files, expected):
    found = violations(_tree(tmp_path, files))
    assert any(expected in p for p in found), found

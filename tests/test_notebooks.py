"""The notebooks run top to bottom on a fresh kernel (the downstream-query notebook trains
its own small model in a temporary folder and checks Spark SQL, DuckDB and the library
agree on the top-K)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("DTT_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.delenv("DTT_WAREHOUSE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    # the kernel is this interpreter's (the project's venv), started in the repository root
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parents[1])}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if path.stem == "query_embeddings":
        assert "agree on the top 10" in outputs


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"

"""notebooks/quickstart.ipynb runs top to bottom (one epoch per run) and is committed
without outputs. Executing it needs nbclient and ipykernel (the dev extra) and an
installed bkd_jax (the notebook imports the configs as bkd_jax.configs)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def _texts(cell) -> list[str]:
    out = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            out.append(output["text"])
        elif "data" in output:
            out.append(output["data"].get("text/markdown", ""))
    return out


def test_quickstart_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    if importlib.util.find_spec("bkd_jax.configs") is None:
        pytest.skip("bkd_jax is not installed (pip install -e .): no bkd_jax.configs")
    monkeypatch.setenv("BKD_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("BKD_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()  # fmt: skip

    text = "".join(t for cell in notebook.cells for t in _texts(cell))
    for i, rest in ((1, "resnet56 blocks 2..3 and head"), (3, "resnet56's head")):
        assert f"N_{i}: resnet20 blocks 1..{i}, C_{i}, {rest} -> logits (4, 100)" in text
    assert "block outputs on 8x8 digits: [(8, 8, 16), (4, 4, 32), (2, 2, 64)]" in text
    # The trainer's console output shows in the notebook: progress and its INFO lines.
    assert "step 22/22 (100.0%)" in text  # the teacher's one epoch (1437 / 64 per step)
    assert "] Top-1: best " in text and "] Student top-1: best " in text
    assert "own model, Block-KD from the resnet8 teacher: test top-1 " in text
    assert "| own model (blockkd) |" in text and "| kd |" in text
    images = [
        o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) == 1
    for run in ("teacher", "ce", "kd", "blockkd"):
        assert (tmp_path / run / "results.json").is_file()


def _install_cell() -> str:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


@pytest.mark.parametrize("source", ["", "git+https://example.org/me/bkd_jax"])
def test_install_cell_outside_a_clone_uses_bkd_jax_source_or_says_to_set_it(
    tmp_path, monkeypatch, source
):
    """As on a fresh Colab: bkd_jax not installed, no clone around the notebook."""
    code = _install_cell()
    assert code.count('BKD_JAX_SOURCE = ""') == 1
    code = code.replace('BKD_JAX_SOURCE = ""', f"BKD_JAX_SOURCE = {source!r}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    installs = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: installs.append(command))
    if not source:
        with pytest.raises(SystemExit, match="set BKD_JAX_SOURCE in this cell"):
            exec(code, {})
        assert installs == []
    else:
        exec(code, {})
        assert installs == [[sys.executable, "-m", "pip", "install", "-q", source]]

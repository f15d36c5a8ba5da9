"""The Colab demo (experiments/colab_digits_grpo.ipynb) runs headless with nbclient on the tiny setting
(`RFTJAX_NOTEBOOK_TINY=1`: the smoke config, a few steps) and ends with its accuracy table; in git its outputs are
stripped. Needs the `[notebook]` extra (CI installs it)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_digits_grpo.ipynb")


def test_notebook_is_stripped_and_every_code_cell_is_explained():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert all(not nb.cells[i].outputs and nb.cells[i].execution_count is None for i in code)
    assert all(i > 0 and nb.cells[i - 1].cell_type == "markdown" for i in code)


def test_notebook_runs_headless_and_ends_with_the_accuracy_table(tmp_path, monkeypatch):
    monkeypatch.setenv("RFTJAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("RFTJAX_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    table = "".join(o.get("data", {}).get("text/markdown", "") for o in last.outputs)
    lines = table.splitlines()
    assert lines[0].startswith("| model | test accuracy | OOD accuracy | pass@1 | pass@2 |"), table
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| cold start", "| after RL"]
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4  # the two sample grids, the curves, pass@k
    assert os.path.exists(tmp_path / "runs" / "rl" / "summary.json")

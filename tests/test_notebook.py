"""The Colab notebooks run headless with nbclient and end with their tables; in git their outputs are stripped.
The digits demo (experiments/colab_digits_grpo.ipynb) on its tiny setting (`RFTJAX_NOTEBOOK_TINY=1`: the smoke
config, a few steps); the pretrained-VLM one (experiments/colab_qwen_grpo.ipynb) with its Hub downloads swapped for a
tiny random checkpoint and local parquet rows (`RFTJAX_NOTEBOOK_STANDIN`). Needs the `[notebook]` extra (CI
installs it)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_digits_grpo.ipynb")


def _executed(path: str):
    """The notebook at `path` after running every cell in a fresh kernel (the environment passes through)."""
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    return nb


def _last_table(nb) -> list[str]:
    """The lines of the Markdown the last code cell displays."""
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    return "".join(o.get("data", {}).get("text/markdown", "") for o in last.outputs).splitlines()


@pytest.mark.parametrize("name", ["colab_digits_grpo", "colab_qwen_grpo"])
def test_notebook_is_stripped_and_every_code_cell_is_explained(name):
    nb = nbformat.read(os.path.join(ROOT, "experiments", f"{name}.ipynb"), as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert all(not nb.cells[i].outputs and nb.cells[i].execution_count is None for i in code)
    assert all(i > 0 and nb.cells[i - 1].cell_type == "markdown" for i in code)


def test_notebook_runs_headless_and_ends_with_the_accuracy_table(tmp_path, monkeypatch):
    monkeypatch.setenv("RFTJAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("RFTJAX_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    nb = _executed(NOTEBOOK)
    lines = _last_table(nb)
    assert lines[0].startswith("| model | test accuracy | OOD accuracy | pass@1 | pass@2 |"), lines
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| cold start", "| after RL"]
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4  # the two sample grids, the curves, pass@k
    assert os.path.exists(tmp_path / "runs" / "rl" / "summary.json")


QWEN_NOTEBOOK = os.path.join(ROOT, "experiments", "colab_qwen_grpo.ipynb")


def _standin(root, checkpoint: str) -> str:
    """RFTJAX_NOTEBOOK_STANDIN's directory: `checkpoint/` (a link to a tiny random checkpoint) and Geometry3K-like
    parquet files named as on the Hub (16 training rows, 8 test rows; images as `{"bytes", "path"}` structs)."""
    import io
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import write_easyr1
    from PIL import Image

    os.makedirs(root / "data")
    os.symlink(checkpoint, root / "checkpoint")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 8)):
        path = write_easyr1(str(root / "rows" / f"{split}.jsonl"), n, rng)
        rows = [json.loads(line) for line in open(path)]
        for r in rows:
            png = io.BytesIO()
            Image.open(os.path.join(os.path.dirname(path), r["images"][0])).save(png, format="PNG")
            r["images"] = [{"bytes": png.getvalue(), "path": r["images"][0]}]
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    return str(root)


def test_qwen_notebook_runs_headless_on_a_tiny_standin(tmp_path, monkeypatch, qwen3_5_dir):
    """The Qwen notebook top to bottom with the Hub downloads swapped for a tiny random Qwen3.5 checkpoint and 24
    local parquet rows (`RFTJAX_NOTEBOOK_STANDIN`): it evaluates the held-out slice, trains 3 GRPO steps and ends
    with the before/after table."""
    monkeypatch.setenv("RFTJAX_NOTEBOOK_STANDIN", _standin(tmp_path / "standin", qwen3_5_dir[1]))
    monkeypatch.setenv("RFTJAX_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    nb = _executed(QWEN_NOTEBOOK)
    lines = _last_table(nb)
    assert lines[0] == "| model | held-out accuracy | problems | GRPO steps |", lines
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| qwen3_5_2b (base)", "| qwen3_5_2b + LoRA GRPO"]
    assert [line.split(" | ")[2:] for line in lines[2:]] == [["4", "0 |"], ["4", "3 |"]]
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4  # the curves, three problems
    text = "".join(o.get("text", "") for o in outputs)
    assert "of 12.0 GB: fits" in text  # the planner's figures before training
    assert "snapshot_download(colab_qwen.MODELS[MODEL]" in "".join(c.source for c in nb.cells)
    run = tmp_path / "runs" / "geo3k_qwen3_5_2b_cpu"
    assert os.path.exists(run / "summary.json") and os.path.exists(run / "checkpoints")


def test_colab_settings_follow_the_device_and_fit_with_margin():
    """`colab_qwen.runtime_for` picks the settings by platform and memory; each GPU/TPU setting of the default
    model plans under 60% of its device's memory (a margin for the GPUs' buffer assignment, measured on none:
    experiments/results/plan_colab.md has XLA's TPU figures); a bad argument names the choices."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import colab_qwen

    from rftjax import plan as plan_lib

    assert [colab_qwen.runtime_for(p, gb) for p, gb in
            (("gpu", 13.9), ("cuda", 20.7), ("gpu", 36.8), ("gpu", 73.6), ("gpu", 16.9), ("tpu", 16.9),
             ("cpu", 64.0))] == ["t4", "l4", "a100", "a100", "t4", "v5e-1", "cpu"]
    for runtime in ("t4", "l4", "a100", "v5e-1"):
        c = colab_qwen.get_config(runtime)
        p = plan_lib.plan(c)
        assert p.total < 0.6 * p.device_memory, (runtime, plan_lib.table(p))
        assert c.eval.batch_size == c.rl.prompts_per_step * c.rl.algo.group_size
        assert c.rl.prompts_per_step * c.rl.algo.group_size % c.rl.micro_batch_size == 0
    with pytest.raises(ValueError, match="RUNTIME in .*'t4'.*MODEL in .*'qwen2_5_vl_3b'"):
        colab_qwen.get_config("t5")

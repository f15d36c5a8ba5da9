"""Run a Colab notebook headless (nbclient) and time it: the measurement behind the notebooks' figures.

    python experiments/run_notebook.py [NOTEBOOK] [--out executed.ipynb] [--timeout 1800]

Runs NOTEBOOK (default experiments/colab_digits_grpo.ipynb; also experiments/colab_qwen_grpo.ipynb) top to bottom
in a fresh kernel (environment variables such as RFTJAX_NOTEBOOK_WORKDIR, RFTJAX_NOTEBOOK_TINY and
RFTJAX_NOTEBOOK_STANDIN pass through), prints each code cell's wall time and the total, the hardware line and the
final table, and saves the executed notebook (outputs included) to --out. Needs the `[notebook]` extra.
"""

import argparse
import os
import time

import nbclient
import nbformat

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "colab_digits_grpo.ipynb")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", default=NOTEBOOK)
    parser.add_argument("--out", default="", help="default: NOTEBOOK's name with .executed.ipynb, here")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args()
    notebook = os.path.abspath(args.notebook)
    out = args.out or os.path.basename(notebook).replace(".ipynb", ".executed.ipynb")
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(notebook)}})
    t_all = time.perf_counter()
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            t0 = time.perf_counter()
            client.execute_cell(cell, index)
            first = cell.source.strip().splitlines()[0][:70]
            print(f"cell {index:2d}: {time.perf_counter() - t0:7.1f} s  {first}", flush=True)
    print(f"whole notebook: {(time.perf_counter() - t_all) / 60:.1f} min")
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text = output.get("text", "") or output.get("data", {}).get("text/markdown", "")
            if "JAX " in text or "| model" in text:
                print(text.strip())
    nbformat.write(nb, out)


if __name__ == "__main__":
    main()

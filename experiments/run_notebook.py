"""Run the Colab demo notebook headless (nbclient) and time it: the measurement behind the notebook's figures.

    python experiments/run_notebook.py [--out executed.ipynb] [--timeout 1800]

Runs experiments/colab_digits_grpo.ipynb top to bottom in a fresh kernel (environment variables such as
RFTJAX_NOTEBOOK_WORKDIR and RFTJAX_NOTEBOOK_TINY pass through), prints each code cell's wall time and the total, the
hardware line and the final accuracy table, and saves the executed notebook (outputs included) to --out.
Needs the `[notebook]` extra.
"""

import argparse
import os
import time

import nbclient
import nbformat

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "colab_digits_grpo.ipynb")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="colab_digits_grpo.executed.ipynb")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
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
        for out in cell.get("outputs", []):
            text = out.get("text", "") or out.get("data", {}).get("text/markdown", "")
            if "JAX " in text or text.startswith("| model"):
                print(text.strip())
    nbformat.write(nb, args.out)


if __name__ == "__main__":
    main()

"""XLA:CPU's temporary bytes of the compiled RL update for Qwen3.5-2B at the Colab notebook's v5e-1 settings
(configs/colab_qwen.py: 1,024-token rows, LoRA, remat) with the decoder cut to 4 and 8 layers (2 vision blocks),
at micro-batches of 1 and 2 rows, beside the planner's activation term: how the update's temporaries grow per
layer and per micro-batch row. Compiles only (`rftjax.aot.run_programs` on the `cpu` topology); about a minute.

    python experiments/update_temp_probe.py     # prints the table, writes experiments/results/update_temp_probe.md
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import colab_qwen  # noqa: E402
import ml_collections  # noqa: E402

from rftjax import aot  # noqa: E402
from rftjax import plan as plan_lib  # noqa: E402

GB = 1e9


def main():
    lines = ["| decoder layers | micro-batch rows | XLA:CPU temp GB | planner activations GB |", "|---|---|---|---|"]
    for layers in (4, 8):
        for micro in (1, 2):
            c = colab_qwen.get_config("v5e-1")
            c.model.overrides.text = ml_collections.ConfigDict({"num_layers": layers})
            c.model.overrides.vision = ml_collections.ConfigDict({"depth": 2})
            c.rl.micro_batch_size = micro
            compiled = aot.compile_program(aot.run_programs(c, aot.topology_devices("cpu")[:1])["rl_update"])
            lines.append(f"| {layers} | {micro} | {compiled.temp / GB:.2f} | "
                         f"{plan_lib.plan(c).terms['activations'] / GB:.2f} |")
            print(lines[-1], flush=True)
    text = ("# Temporaries of the compiled RL update, Qwen3.5-2B widths, cut decoder\n\n"
            "`python experiments/update_temp_probe.py`\n\n" + "\n".join(lines) + "\n")
    with open(os.path.join(ROOT, "experiments", "results", "update_temp_probe.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()

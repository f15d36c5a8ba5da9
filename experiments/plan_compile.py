"""XLA's own figures for GRPO on Qwen2.5-VL 3B and 7B at EasyR1's Geometry3K shapes (configs/qwen2_5_vl_easyr1.py:
16 prompts x G = 5, prompts up to 1,024 tokens with up to 1,024 image tokens, completions up to 1,024 tokens, k3 KL
to a reference), FSDP over the slice, compiled ahead of time for TPU slices from this CPU host (`rftjax.aot`):
bytes per device of each program beside the analytic planner's total, and the largest micro-batch (rows per
device) whose RL update compiles within the chip's HBM.

    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python experiments/plan_compile.py [--only 3b:v5e-8:full ...]
    # needs libtpu: pip install "rftjax[aot]"; writes experiments/results/plan_compile.md

Settings: full-parameter (bf16 params, remat, scanned decoder) and LoRA rank 64 on the decoder (bf16 base).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import qwen2_5_vl_easyr1  # noqa: E402

from rftjax import aot, configs  # noqa: E402
from rftjax import plan as plan_lib  # noqa: E402
from rftjax.plan import GB, _with  # noqa: E402

BASE = {"model.overrides.param_dtype": "bfloat16", "model.overrides.remat": True,
        "model.overrides.scan_layers": True}
SETTINGS = {"full": {}, "lora": {"model.lora.rank": 64, "model.lora.alpha": 128.0}}
MODELS = {"3b": "qwen2_5_vl_3b", "7b": "qwen2_5_vl_7b"}
TOPOLOGIES = ("v5e-8", "v6e-8", "v5p-8")


def measure(model: str, topology: str, setting: str) -> dict:
    """One row: each program's XLA total (GB per device), the planner's total, the largest micro-batch."""
    devices = aot.topology_devices(topology)
    c = qwen2_5_vl_easyr1.get_config()
    c = _with(c, {"model.preset": MODELS[model], "plan.num_devices": len(devices), "mesh.data": 1,
                  "mesh.fsdp": len(devices), **BASE, **SETTINGS[setting]})
    memory = aot.TOPOLOGIES[topology][3]
    t0 = time.time()
    best, tried = aot.largest_micro_batch(c, devices, memory)
    rows = max(best, 1)
    c = _with(c, {"rl.micro_batch_size": rows * len(devices)})
    programs = {name: aot.compile_program(p) for name, p in aot.run_programs(c, devices).items()}
    tokens = rows * (c.data.max_prompt_len + c.rl.max_new_tokens)
    update = tried.get(rows) or programs["rl_update"]
    algo = configs.algorithm(c)
    return {"model": model, "topology": topology, "setting": setting, "hbm": memory / GB,
            "sampler": programs["sampler"], "rl_update": update, "planner": plan_lib.plan(c).total / GB,
            "best": best, "tried": tried, "tokens": tokens, "temp_per_token": update.temp / tokens,
            "rows_per_device": (c.rl.prompts_per_step * algo.group_size) // len(devices),
            "seconds": time.time() - t0}


def line(r: dict) -> str:
    def gb(x):
        return f"{x.total / GB:.2f}" if x.fits else f"over ({x.temp / GB:.1f} asked)"

    tried = ", ".join(f"{k}: {gb(v)}" for k, v in r["tried"].items())
    return (f"| {r['model']} | {r['setting']} | {r['topology']} ({r['hbm']:.1f} GB) | {gb(r['sampler'])} | "
            f"{gb(r['rl_update'])} | {r['planner']:.2f} | {r['best']} of {r['rows_per_device']} ({tried}) | "
            f"{r['best'] * 2048} | {r['temp_per_token'] / 1e6:.2f} | {r['seconds']:.0f} |")


HEADER = ["| model | setting | topology (HBM/device) | sampler GB/device | RL update GB/device (at the largest "
          "micro-batch) | planner GB/device | largest micro-batch: rows/device that compile (GB per size tried) | "
          "tokens/device/micro-batch | update temp MB/token | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None, help="model:topology:setting, e.g. 3b:v5e-8:full")
    args = parser.parse_args()
    cases = [tuple(s.split(":")) for s in args.only] if args.only else [
        (m, t, s) for m in MODELS for s in SETTINGS for t in TOPOLOGIES]
    out = os.path.join(ROOT, "experiments", "results", "plan_compile.md")
    lines = list(HEADER)
    for case in cases:
        lines.append(line(measure(*case)))
        print(lines[-1], flush=True)
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

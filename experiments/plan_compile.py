"""XLA's own figures for GRPO on Qwen2.5-VL 3B and 7B at EasyR1's Geometry3K shapes (configs/qwen2_5_vl_easyr1.py:
16 prompts x G = 5, prompts up to 1,024 tokens with up to 1,024 image tokens, completions up to 1,024 tokens, k3 KL
to a reference), FSDP over the slice, compiled ahead of time for TPU slices from this CPU host (`rftjax.aot`):
bytes per device of each program beside the analytic planner's total, and the largest micro-batch (rows per
device) whose RL update compiles within the chip's HBM.

    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python experiments/plan_compile.py [--only 3b:v5e-8:full ...]
    # needs libtpu: pip install "rftjax[aot]"; writes experiments/results/plan_compile.md

Settings: full-parameter (bf16 params, remat, scanned decoder), the same with the vision tower frozen (EasyR1's
`freeze_vision_tower`), and LoRA rank 64 on the decoder (bf16 base).
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
SETTINGS = {"full": {}, "full_vit_frozen": {"optim.freeze": "visual/.*"},
            "lora": {"model.lora.rank": 64, "model.lora.alpha": 128.0}}
MODELS = {"3b": "qwen2_5_vl_3b", "7b": "qwen2_5_vl_7b"}
TOPOLOGIES = ("v5e-8", "v6e-8", "v5p-8")


def case_config(model: str, topology: str, setting: str, rows: int | None = None):
    """The run config of one case, FSDP over `topology`'s chips, with micro-batches of `rows` rows per device (None:
    the config's)."""
    n = len(aot.topology_devices(topology))
    c = _with(qwen2_5_vl_easyr1.get_config(), {"model.preset": MODELS[model], "plan.num_devices": n, "mesh.data": 1,
                                               "mesh.fsdp": n, **BASE, **SETTINGS[setting]})
    return c if rows is None else _with(c, {"rl.micro_batch_size": rows * c.plan.num_devices})


def measure(model: str, topology: str, setting: str, candidates: tuple[int, ...] | None = None) -> dict:
    """One row: each program's XLA total (GB per device), the planner's total, the largest micro-batch among
    `candidates` rows per device (default all divisors of the rows per device)."""
    devices = aot.topology_devices(topology)
    c = case_config(model, topology, setting)
    memory = aot.TOPOLOGIES[topology][3]
    t0 = time.time()
    best, tried = aot.largest_micro_batch(c, devices, memory, candidates)
    rows = max(best, 1)
    c = case_config(model, topology, setting, rows)
    programs = {name: aot.compile_program(p) for name, p in aot.run_programs(c, devices).items()
                if name != "rl_update" or rows not in tried}
    tokens = rows * (c.data.max_prompt_len + c.rl.max_new_tokens)
    update = tried.get(rows) or programs["rl_update"]
    algo = configs.algorithm(c)
    return {"model": model, "topology": topology, "setting": setting, "hbm": memory / GB,
            "sampler": programs["sampler"], "rl_update": update, "planner": plan_lib.plan(c).total / GB,
            "best": best, "tried": tried, "tokens": tokens, "temp_per_token": update.temp / tokens,
            "rows_per_device": (c.rl.prompts_per_step * algo.group_size) // len(devices),
            "seconds": time.time() - t0}


def logprob_gradient(model: str, topology: str, rows: tuple[int, ...] = (1, 2)) -> str:
    """XLA temp bytes of the gradient of the completion log-probs alone (`steps.completion_logprobs`, summed) with
    respect to the params, at `rows` rows per device of 1,024 prompt (512 image) + 1,024 completion tokens: the
    issue's measurement of today's 11.4-11.6 GB per row (5.5 MB per token) before chunked log-probs."""
    import jax

    from rftjax import steps
    from rftjax.build import model_config_of
    from rftjax.models.common import rows_over
    from rftjax.sharding import shardings_of

    devices = aot.topology_devices(topology)
    c = _with(qwen2_5_vl_easyr1.get_config(), {"model.preset": MODELS[model], "plan.num_devices": len(devices),
                                               "mesh.data": 1, "mesh.fsdp": len(devices), **BASE,
                                               "model.overrides.max_image_tokens": 512})
    mc = model_config_of(c)
    out = []
    for r in rows:
        c = _with(c, {"rl.prompts_per_step": r * len(devices) // 2, "rl.algo.group_size": 2,
                      "rl.micro_batch_size": r * len(devices)})
        program = aot.run_programs(c, devices)["rl_update"]
        params = aot.combine_params(program)
        seq = program.args[4].seq
        shardings = shardings_of(params)
        mesh = jax.tree.leaves(shardings)[0].mesh

        def loss(p, s):
            with rows_over(mesh):  # activations' rows over the devices, as in the RL update
                return steps.completion_logprobs(p, mc, s)[0].sum()

        fn = jax.jit(jax.grad(loss), out_shardings=shardings)  # the gradient laid out as the params are
        result = aot.compile_program(aot.Program(fn, (params, seq)))
        tokens = r * (c.data.max_prompt_len + c.rl.max_new_tokens)
        out.append(f"{r} row(s)/device: temp {result.temp / GB:.2f} GB ({result.temp / tokens / 1e6:.2f} MB/token)")
    return f"{model} on {topology}, gradient of the completion log-probs: " + "; ".join(out)


def line(r: dict) -> str:
    def gb(x):
        return f"{x.total / GB:.2f}" if x.fits else f"over ({x.temp / GB:.1f} asked)"

    tried = ", ".join(f"{k}: {gb(v)}" for k, v in r["tried"].items())
    return (f"| {r['model']} | {r['setting']} | {r['topology']} ({r['hbm']:.1f} GB) | {gb(r['sampler'])} | "
            f"{gb(r['rl_update'])} | {r['planner']:.2f} | {ratio(r['planner'], r['rl_update'].total / GB)} | "
            f"{r['best']} of {r['rows_per_device']} ({tried}) | "
            f"{r['best'] * 2048} | {r['temp_per_token'] / 1e6:.2f} | {r['seconds']:.0f} |")


def ratio(planner: float, xla: float) -> str:
    """The planner's total against XLA's for the RL update, as a signed percentage."""
    return f"{100 * (planner / xla - 1):+.1f}%"


def replan(row: str) -> str:
    """`row` with its planner cells recomputed by today's planner at the row's largest micro-batch (no compile)."""
    cells = row.split(" | ")
    model, setting, topology = cells[0].lstrip("| "), cells[1], cells[2].split(" ")[0]
    best = int(cells[7].split(" of ")[0])
    planner = plan_lib.plan(case_config(model, topology, setting, max(best, 1))).total / GB
    return " | ".join([*cells[:5], f"{planner:.2f}", ratio(planner, float(cells[4])), *cells[7:]])


HEADER = ["| model | setting | topology (HBM/device) | sampler GB/device | RL update GB/device (at the largest "
          "micro-batch) | planner GB/device | planner vs XLA | largest micro-batch: rows/device that compile (GB per "
          "size tried) | tokens/device/micro-batch | update temp MB/token | compile s |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None,
                        help="model:topology:setting[:rows,rows,...] (micro-batch rows per device to try), e.g. "
                             "3b:v5e-8:full:1,5")
    parser.add_argument("--logprob-gradient", default="",
                        help="model:topology[:rows,rows,...] (rows per device, default 1,2), e.g. 3b:v6e-8:1,2,5")
    parser.add_argument("--replan", action="store_true",
                        help="recompute the planner's cells of the rows already in the table (no compile)")
    args = parser.parse_args()
    cases = [(*s.split(":")[:3], tuple(int(r) for r in s.split(":")[3].split(",")) if s.count(":") == 3 else None)
             for s in args.only] if args.only else [(m, t, s, None) for m in MODELS for s in SETTINGS for t in TOPOLOGIES]
    if args.logprob_gradient:
        model, topology, *sizes = args.logprob_gradient.split(":")
        text = logprob_gradient(model, topology, *(tuple(int(r) for r in s.split(",")) for s in sizes))
        print(text, flush=True)
        with open(os.path.join(ROOT, "experiments", "results", "plan_compile_logprob_grad.md"), "a") as f:
            f.write(text + "\n")
        return
    out = os.path.join(ROOT, "experiments", "results", "plan_compile.md")
    rows = _table_rows(out)
    if args.replan:
        rows = {key: replan(row) for key, row in rows.items()}
        cases = []
        with open(out, "w") as f:
            f.write("\n".join([*HEADER, *rows.values()]) + "\n")
    for case in cases:
        row = line(measure(*case))
        print(row, flush=True)
        rows[_key(row)] = row
        with open(out, "w") as f:
            f.write("\n".join([*HEADER, *rows.values()]) + "\n")
    print(f"wrote {out}")


def _key(row: str) -> tuple[str, ...]:
    """A table row's (model, setting, topology) cells."""
    return tuple(cell.strip() for cell in row.split("|")[1:4])


def _table_rows(path: str) -> dict[tuple[str, ...], str]:
    """The rows already measured in `path` (a rerun of the same case replaces its row; other cases are kept)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [r.rstrip("\n") for r in f if r.startswith("| ") and not r.startswith(HEADER[0][:20])]
    return {_key(r): r for r in rows}


if __name__ == "__main__":
    main()

"""Estimated seconds per GRPO step of the Colab notebook (experiments/colab_qwen_grpo.ipynb) on each runtime its
config supports, from the step's FLOPs and bytes and the chips' datasheet peaks: an estimate, not a measurement
(no GPU or TPU was lent to the session that wrote it; replace it with measured step times when one is).

    python experiments/colab_estimate.py     # prints the table, writes experiments/results/colab_estimate.md

Per step, at the config's budgets (prompts of `data.max_prompt_len` tokens with a `max_image_tokens` image,
completions of `rl.max_new_tokens`: an upper bound, as if every completion ran to the budget):
  rollout     prefill once per prompt (`forward_flops`), then `max_new_tokens` decode steps, each the larger of
              reading the params (bf16) at the memory bandwidth and the rows' matmuls at the matmul rate;
  log-probs   one forward pass over every row (the old log-probs; no KL term, so no reference pass);
  update      3 forward passes' FLOPs per row (forward, the recomputation of remat, the backward through the
              frozen base weights: input gradients only; the LoRA adapters' own gradients are negligible).
Achieved rates assumed: 40% of the matmul peak (the CPU benchmark's update reached 60%: experiments/README.md),
60% of the memory bandwidth. A T4 has no bfloat16 matmul units: XLA computes bf16 matmuls in float32 there, so
its float32 peak is used. Compilation (a few minutes on the first step) and evaluation are not included.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import colab_qwen  # noqa: E402

from rftjax import configs  # noqa: E402
from rftjax import plan as plan_lib  # noqa: E402
from rftjax.build import model_config_of  # noqa: E402
from rftjax.models.family import forward_flops  # noqa: E402

CHIPS = {  # runtime: (chip, matmul peak FLOP/s at the compute dtype, memory bandwidth bytes/s), from datasheets
    "t4": ("NVIDIA T4 16 GB (float32 peak)", 8.1e12, 320e9),
    "l4": ("NVIDIA L4 24 GB", 121e12, 300e9),
    "a100": ("NVIDIA A100 40 GB", 312e12, 1555e9),
    "v5e-1": ("TPU v5e (1 chip)", 197e12, 819e9),
}
MATMUL_EFFICIENCY, BANDWIDTH_EFFICIENCY = 0.4, 0.6


def estimate(runtime: str, model: str) -> dict:
    """One row: the step's FLOPs and the estimated seconds of each phase on `runtime`'s chip."""
    c = colab_qwen.get_config(f"{runtime},{model}")
    mc = model_config_of(c)
    chip, peak, bandwidth = CHIPS[runtime]
    rate, bytes_rate = peak * MATMUL_EFFICIENCY, bandwidth * BANDWIDTH_EFFICIENCY
    prompts, group = c.rl.prompts_per_step, configs.algorithm(c).group_size
    rows, p, n = prompts * group, c.data.max_prompt_len, c.rl.max_new_tokens
    image_tokens = mc.max_image_tokens
    prefill = prompts * forward_flops(mc, p, 1, image_tokens)
    decode_flops = rows * (forward_flops(mc, p + n, 0) - forward_flops(mc, p, 0))
    param_bytes = plan_lib.plan(c).terms["params"]
    decode_s = n * max(param_bytes / bytes_rate, decode_flops / n / rate)
    row = forward_flops(mc, p + n, 1, image_tokens)
    logprob_flops, update_flops = rows * row, 3 * rows * row
    rollout_s = prefill / rate + decode_s
    step_s = rollout_s + (logprob_flops + update_flops) / rate
    steps = min(c.rl.steps, int(c.rl.max_seconds // step_s))  # rl.steps or the rl.max_seconds budget
    return {"runtime": runtime, "chip": chip, "model": model, "rows": f"{prompts} x {group}",
            "tokens": f"{p} + {n}", "step TFLOP": (prefill + decode_flops + logprob_flops + update_flops) / 1e12,
            "rollout s": rollout_s, "step s": step_s, f"steps (of {c.rl.steps}, {c.rl.max_seconds / 60:.0f} min)": steps,
            "GRPO min": steps * step_s / 60}


def main():
    rows = [estimate(r, m) for m in colab_qwen.MODELS for r in CHIPS]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    text = ("# Estimated GRPO step time of experiments/colab_qwen_grpo.ipynb (not measured)\n\n"
            f"`python experiments/colab_estimate.py`: {MATMUL_EFFICIENCY:.0%} of the matmul peak, "
            f"{BANDWIDTH_EFFICIENCY:.0%} of the memory bandwidth, completions at the full budget; see the "
            "script's docstring.\n\n" + "\n".join(lines) + "\n")
    print(text)
    with open(os.path.join(ROOT, "experiments", "results", "colab_estimate.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()

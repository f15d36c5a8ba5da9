"""Memory per device of GRPO on Qwen2.5-VL 3B and 7B (configs/qwen2_5_vl_easyr1.py: 16 prompts x G=5, 1024-token
prompts and completions, k3 KL to a reference), FSDP over 8 devices, from `rftjax.plan` (nothing allocated):
against a TPU v5e-8 (16 GB per chip) and 8 x 80 GB GPUs.

    python experiments/plan_qwen_vl.py      # prints the table, writes experiments/results/plan_qwen_vl.md
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import qwen2_5_vl_easyr1  # noqa: E402

from rftjax import plan as plan_lib  # noqa: E402
from rftjax.plan import GB, _with  # noqa: E402

SETTINGS = {
    "full, f32 params": {},
    "full, f32 params, remat": {"model.overrides.remat": True},
    "full, bf16 params, remat": {"model.overrides.param_dtype": "bfloat16", "model.overrides.remat": True},
    "full, bf16 params, remat, 1 row/device micro-batches": {
        "model.overrides.param_dtype": "bfloat16", "model.overrides.remat": True, "rl.micro_batch_size": 8},
    "full, bf16, remat, 1 row/device, ViT frozen": {
        "model.overrides.param_dtype": "bfloat16", "model.overrides.remat": True, "rl.micro_batch_size": 8,
        "optim.freeze": "visual/.*"},
    "LoRA r64 decoder, bf16 base, remat, 1 row/device": {
        "model.overrides.param_dtype": "bfloat16", "model.overrides.remat": True, "rl.micro_batch_size": 8,
        "model.lora.rank": 64, "model.lora.alpha": 128.0},
}


def main():
    base = qwen2_5_vl_easyr1.get_config()
    base.plan.num_devices, base.mesh.data, base.mesh.fsdp = 8, 1, 8
    base.rl.micro_batch_size = 0  # the whole minibatch per pass unless a setting says otherwise
    terms = ["params", "optimizer", "gradients", "reference", "sampling copy", "decode state", "activations"]
    lines = ["| model | setting | " + " | ".join(terms) + " | total GB/device | v5e-8 (16 GB) | 8x80 GB |",
             "|---|---|" + "---|" * (len(terms) + 3)]
    for preset in ("qwen2_5_vl_3b", "qwen2_5_vl_7b"):
        for name, settings in SETTINGS.items():
            c = _with(base, {"model.preset": preset, **settings})
            p = plan_lib.plan(c)
            row = [f"{p.terms[t] / GB:.2f}" for t in terms]
            total = p.total / GB
            lines.append(f"| {preset} | {name} | " + " | ".join(row) + f" | {total:.1f} | "
                         f"{'fits' if total <= 16 else 'no'} | {'fits' if total <= 80 else 'no'} |")
            print(lines[-1], flush=True)
    out = os.path.join(ROOT, "experiments", "results", "plan_qwen_vl.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""LoRA GRPO on a small pretrained VLM within one free (or cheap) Colab runtime: the settings of
experiments/colab_qwen_grpo.ipynb, one set per runtime, chosen with the planner (`python -m rftjax.plan`).

    python -m rftjax.plan --config configs/colab_qwen.py:t4              # the planner's figures for a T4
    python -m rftjax.plan --config configs/colab_qwen.py:v5e-1 --compile --topology v5e-1   # and XLA's, for TPU
    python -m rftjax.train --config configs/colab_qwen.py:l4,qwen2_5_vl_3b --workdir runs/colab \\
        --config.model.checkpoint=/path/to/Qwen2.5-VL-3B-Instruct \\
        --config.data.train=easyr1:/data/geometry3k/train.parquet --config.data.test=easyr1:/data/test_slice.parquet

The argument is `RUNTIME[,MODEL]`: RUNTIME one of `RUNTIMES` (t4, l4, a100, v5e-1, cpu), MODEL one of `MODELS`
(default qwen3_5_2b). Every runtime: LoRA rank 64 on the decoder (the base weights frozen, stored in bfloat16,
no reference copy), remat, images at most 256 tokens (Geometry3K's diagrams need fewer), prompts up to 512 tokens,
Qwen3.5's thinking switched off (`data.chat_template_kwargs`: its thinking traces run to thousands of tokens), no
KL term (as DAPO and Dr.GRPO; it saves the reference forward pass), answers in `\\boxed{}`. What differs is the
batch (prompts x group size), the micro-batch and the completion budget, sized to the runtime's memory.
`model.preset` is the model's preset, so the planner works without the checkpoint; training needs
`model.checkpoint` (the notebook downloads it).
"""

import ml_collections

from rftjax.configs import easyr1_checkpoint_config

MODELS = {"qwen3_5_2b": "Qwen/Qwen3.5-2B", "qwen2_5_vl_3b": "Qwen/Qwen2.5-VL-3B-Instruct"}
"""Preset name -> its checkpoint on the Hugging Face Hub."""

RUNTIMES = {
    # name: memory per device (GB, as the planner's plan.device_memory_gb), prompts per step, group size,
    # rows per micro-batch, completion tokens, held-out problems evaluated before and after
    "t4": dict(memory_gb=15.0, prompts=4, group_size=4, micro=2, new_tokens=384, eval_examples=48),
    "l4": dict(memory_gb=22.0, prompts=8, group_size=8, micro=4, new_tokens=512, eval_examples=64),
    "a100": dict(memory_gb=40.0, prompts=16, group_size=8, micro=8, new_tokens=768, eval_examples=128),
    "v5e-1": dict(memory_gb=16.0, prompts=8, group_size=8, micro=4, new_tokens=512, eval_examples=64),
    "cpu": dict(memory_gb=12.0, prompts=2, group_size=2, micro=2, new_tokens=16, eval_examples=4),
}
"""Per-runtime settings; `cpu` is for the tiny stand-in checkpoint only (the notebook's headless test)."""


def runtime_for(platform: str, memory_gb: float) -> str:
    """The `RUNTIMES` entry for a device: `platform` as `jax.Device.platform` ("gpu", "tpu", "cpu"; "cuda" and
    "rocm" count as gpu) and the memory JAX may use on it, in GB (`memory_stats()["bytes_limit"]`: on a GPU the
    `XLA_PYTHON_CLIENT_MEM_FRACTION` share of the card, 0.92 in the notebook, 0.75 by default). TPUs get v5e-1's
    settings (Colab's TPU runtime; a v6e chip has more memory); GPUs by memory: under 18 GB a T4's (13.9 GB of a
    T4 at 0.92), under 30 GB an L4's (20.7 GB), else an A100 40 GB's. A smaller share than 0.92 only picks smaller
    settings."""
    if platform == "tpu":
        return "v5e-1"
    if platform == "cpu":
        return "cpu"
    return "t4" if memory_gb < 18 else "l4" if memory_gb < 30 else "a100"


def get_config(arg: str = "t4") -> ml_collections.ConfigDict:
    runtime, _, model = arg.partition(",")
    model = model or "qwen3_5_2b"
    if runtime not in RUNTIMES or model not in MODELS:
        raise ValueError(f"configs/colab_qwen.py:{arg}: want RUNTIME[,MODEL] with RUNTIME in {sorted(RUNTIMES)} "
                         f"and MODEL in {sorted(MODELS)}")
    r = RUNTIMES[runtime]
    c = easyr1_checkpoint_config()
    c.model.preset = model
    c.model.lora.update(rank=64, alpha=128.0, targets="decoder")
    c.model.overrides.update(param_dtype="bfloat16", remat=True, max_image_tokens=256)
    c.data.max_prompt_len = 512
    c.data.chat_template_kwargs = ml_collections.ConfigDict({"enable_thinking": False})
    c.rl.prompts_per_step, c.rl.algo.group_size, c.rl.micro_batch_size = r["prompts"], r["group_size"], r["micro"]
    c.rl.max_new_tokens = r["new_tokens"]
    c.rl.algo.kl_coef = 0.0
    c.rl.lr, c.rl.warmup_steps, c.rl.steps = 2e-5, 3, 60
    c.rl.max_seconds = 2700.0                   # 45 minutes of GRPO at most: a Colab session's share
    c.eval.batch_size = r["prompts"] * r["group_size"]
    c.eval.every = 10_000                       # evaluations before and after only (the notebook's)
    c.plan.num_devices, c.plan.device_memory_gb = 1, r["memory_gb"]
    c.mesh.num_devices = 1
    c.checkpoint.every = 10
    c.log.samples_every = 5
    return c

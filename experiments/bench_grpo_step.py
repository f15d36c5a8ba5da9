"""One full GRPO step at Qwen2.5-VL-3B shapes with random weights: rollout (the sampler: prefill + decode of G
completions per prompt), the reference log-prob pass and the micro-batched update (`make_rl_update`, GRPO with a
k3 KL as EasyR1's Geometry3K recipe), timed apart; tokens/s per device and MFU against this machine's matmul peak
measured in the same run.

    python experiments/bench_grpo_step.py                 # CPU: 3B widths at reduced depth (--layers 2 --vision-depth 2)
    python experiments/bench_grpo_step.py --layers 36 --vision-depth 32 --prompts 16 --prompt-len 1024 \\
        --image-tokens 512 --new-tokens 1024 --micro 8     # the real 3B on an accelerator

Prints a table and writes experiments/results/bench_grpo_step{_gpu}.md. Needs only jax/flax/optax (no grain/TFDS).
EasyR1's published 3B figure for comparison: 1,800 tokens/s/GPU, 8.1% actor MFU (8xH100).

Tokens/s per device = (rows x (prompt + completion tokens)) / step seconds / devices (verl/EasyR1's convention:
every token of every sequence, prompt included). MFU = the update's model FLOPs (3x the forward of
`rftjax.models.forward_flops`, plus the reference pass's 1x) / update seconds / the peak of the compute dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rftjax import batches, optim, rl, sampling
from rftjax.models import QwenImages, forward_flops, get_preset, init_params, param_count
from rftjax.rl_update import UpdateSettings, make_rl_update
from roofline import describe, matmul_rate

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def config_for(args):
    """Qwen2.5-VL-3B's widths, vocabulary and vision tower at `args.layers` decoder layers and `args.vision_depth`
    vision blocks (the last one full attention, the others windowed, as in the 3B's pattern)."""
    base = get_preset("qwen2_5_vl_3b")
    vision = dataclasses.replace(base.vision, depth=args.vision_depth, fullatt_block_indexes=(args.vision_depth - 1,))
    text = dataclasses.replace(base.text, num_layers=args.layers)
    return base.replace(vision=vision, text=text, dtype=args.dtype, param_dtype="bfloat16", remat=True,
                        scan_layers=True, max_image_tokens=args.image_tokens)


def inputs(config, args, rng: np.random.Generator):
    """B prompts of `prompt_len` tokens (left: text, an image of `image_tokens` tokens as a side x side grid, text)."""
    v = config.vision
    side = int(np.sqrt(args.image_tokens)) * v.spatial_merge_size
    patches = np.zeros((args.prompts, args.image_tokens * v.merge_unit, v.patch_dim), np.float32)
    patches[:, :side * side] = rng.standard_normal((args.prompts, side * side, v.patch_dim)) * 0.5
    grid = np.tile([[1, side, side]], (args.prompts, 1)).astype(np.int32)
    n_img = side * side // v.merge_unit
    text = args.prompt_len - n_img
    ids = np.concatenate([rng.integers(10, 1000, (args.prompts, text // 2)),
                          np.full((args.prompts, n_img), config.image_token_id),
                          rng.integers(10, 1000, (args.prompts, text - text // 2))], 1).astype(np.int32)
    return QwenImages(jnp.asarray(patches), jnp.asarray(grid)), jnp.asarray(ids), jnp.ones(ids.shape, bool)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=320)
    ap.add_argument("--image-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--micro", type=int, default=5, help="rows per forward/backward pass")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    config = config_for(args)
    devices = jax.device_count()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    peak = matmul_rate(4096, 4096, 4096, dtype)
    print(describe(), f"peak {peak / 1e12:.3f} TFLOP/s ({args.dtype})", flush=True)
    params = init_params(config, jax.random.key(0))
    ref = jax.tree.map(jnp.copy, params)
    algo = rl.get_algorithm("grpo", group_size=args.group_size, kl_coef=1e-2)
    state = optim.TrainState.create(params, optim.make_optimizer(optim.make_schedule(1e-6, 100)))
    update = make_rl_update(UpdateSettings(config, algo, micro_batch_size=args.micro))
    media, ids, mask = inputs(config, args, np.random.default_rng(0))
    n = args.prompts * args.group_size

    def step(state, key):
        t0 = time.perf_counter()
        out = sampling.generate(state.params, config, media, ids, mask, key,
            sampling.SamplingParams(group_size=args.group_size,
                                max_new_tokens=args.new_tokens, eos_ids=(), suppress_ids=()))
        jax.block_until_ready(out)
        t1 = time.perf_counter()
        seq = batches.SequenceBatch(pixel_values=media, prompt_ids=jnp.repeat(ids, args.group_size, 0),
                                  prompt_mask=jnp.repeat(mask, args.group_size, 0), completion_ids=out.completion_ids,
                                  completion_mask=out.completion_mask,
                                  prompt_index=jnp.repeat(jnp.arange(args.prompts, dtype=jnp.int32), args.group_size))
        rewards = jnp.asarray(np.random.default_rng(1).random(n), jnp.float32)
        batch = batches.RolloutBatch(seq=seq, rewards=rewards, sampler_logprobs=out.model_logprobs)
        state, _, (metrics, _) = update(state, None, ref, {}, batch, key)
        jax.block_until_ready(metrics)
        return state, t1 - t0, time.perf_counter() - t1

    t0 = time.perf_counter()
    state, _, _ = step(state, jax.random.key(1))  # compiles
    compile_s = time.perf_counter() - t0
    state, rollout_s, update_s = step(state, jax.random.key(2))
    seq_len = args.prompt_len + args.new_tokens
    tokens = n * seq_len
    update_flops = 4 * n * forward_flops(config, seq_len, 1, args.image_tokens)  # reference 1x + fwd/bwd 3x
    step_s = rollout_s + update_s
    row = {"device": jax.devices()[0].device_kind, "decoder layers": f"{args.layers} of 36",
           "vision blocks": f"{args.vision_depth} of 32", "params": f"{param_count(config) / 1e9:.2f}B",
           "rows x (prompt + completion)": f"{n} x ({args.prompt_len} + {args.new_tokens})",
           "micro-batch rows": args.micro, "first step s (compiles)": f"{compile_s:.1f}",
           "rollout s": f"{rollout_s:.2f}", "ref log-probs + update s": f"{update_s:.2f}",
           "step s": f"{step_s:.2f}", "tokens/s per device": f"{tokens / step_s / devices:.0f}",
           "update MFU": f"{100 * update_flops / update_s / peak / devices:.1f}%",
           "peak TFLOP/s (4096^3, this run)": f"{peak / 1e12:.3f}"}
    lines = [f"# One GRPO step at Qwen2.5-VL-3B widths, random weights ({describe()})", "",
             "`python experiments/bench_grpo_step.py " + " ".join(
                 f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()) + "`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in row.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    suffix = "" if jax.devices()[0].platform == "cpu" else "_" + jax.devices()[0].platform
    with open(os.path.join(RESULTS, f"bench_grpo_step{suffix}.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()

"""Update-step time and model FLOPs utilisation (MFU) against this machine's matmul peak, and against its roofline
at the step's own matmul shapes (float32 and bf16 rates, measured in the same run; CPU model and flags printed).

The update step is the trainer's `rftjax.rl_update.make_rl_update` (GRPO, on-policy, no KL: group advantages
from the rewards, then one `apply_gradients` of the policy loss) over a `RolloutBatch` of prompt + completion
sequences already on the device: one forward and one backward pass (~3x the forward FLOPs of
`rftjax.models.forward_flops`, the PaLM/MaxText convention; attention counted causally). The peak is a
4096^3 matmul in float32 and in bfloat16 with float32 accumulation; MFU is reported against the peak of
the step's compute dtype.

    python experiments/bench_update.py [--presets default large] [--batch 16] [--repeats 5]
    python experiments/bench_update.py --presets main_job --batch 64 --completion-len 48 --text-len 32 \
        --out bench_update_main_job

("main_job" is the main job's model; the last line is the shape of its RL updates: 8 groups x G=8, prompts of 48
tokens, completions trimmed to 48.)

Prints a table and writes experiments/results/bench_update{_gpu}.{md,json} (or `--out` NAME{_gpu}.{md,json}). Needs only jax/flax/optax.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rftjax import batches, optim, rl
from rftjax.models import forward_flops, get_preset, init_params, param_count
from rftjax.rl_update import UpdateSettings, make_rl_update
from rftjax.batches import RolloutBatch
from roofline import decode_matmuls, describe, matmul_rate, shape_rates, train_roofline

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def model_config(preset: str, dtype: str):
    """The preset's `VLMConfig` in `dtype`; "main_job" is the main job's model (`configs/digits_grpo.py`: the
    default preset with 16 px patches and a 4-layer decoder; needs ml_collections)."""
    if preset != "main_job":
        return get_preset(preset, dtype=dtype)
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs.digits_grpo import get_config
    c = get_config()
    return get_preset(c.model.preset, **{**c.model.overrides.to_dict(), "dtype": dtype})


def bench(preset: str, dtype: str, batch: int, prompt_len: int, completion_len: int, repeats: int) -> dict:
    config = model_config(preset, dtype)
    params = init_params(config, jax.random.key(0))
    algo = rl.get_algorithm("grpo", kl_coef=0.0, group_size=4)
    sched = optim.make_schedule(1e-5, 1000)
    state = optim.TrainState.create(params, optim.make_optimizer(sched))
    rl_update = make_rl_update(UpdateSettings(config, algo))
    key = jax.random.key(1)

    def update(state, batch):
        state, _, (metrics, _) = rl_update(state, None, None, {}, batch, key)
        return state, metrics

    rng = np.random.default_rng(0)
    p = config.num_image_tokens
    prompt = np.concatenate([np.full((batch, p), config.image_token_id),
                             rng.integers(10, config.text.vocab_size, (batch, prompt_len - p))], 1).astype(np.int32)
    v = config.vision
    batch_arrays = RolloutBatch(seq=batches.SequenceBatch(
        pixel_values=jnp.asarray(rng.standard_normal((batch, v.image_size, v.image_size, 3)), jnp.float32),
        prompt_ids=jnp.asarray(prompt), prompt_mask=jnp.ones((batch, prompt_len), bool),
        completion_ids=jnp.asarray(rng.integers(10, config.text.vocab_size, (batch, completion_len)), jnp.int32),
        completion_mask=jnp.ones((batch, completion_len), bool)),
        rewards=jnp.asarray(rng.standard_normal(batch), jnp.float32),
        sampler_logprobs=jnp.zeros((batch, completion_len), jnp.float32))
    t0 = time.perf_counter()
    state, m = update(state, batch_arrays)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = update(state, batch_arrays)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = 3 * batch * forward_flops(config, prompt_len + completion_len, 1)
    return dict(preset=preset, params_m=param_count(config) / 1e6, dtype=dtype, batch=batch,
                seq_len=prompt_len + completion_len, compile_s=compile_s, step_s=step_s,
                tflops_per_s=flops / step_s / 1e12, step_tflop=flops / 1e12)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["default", "large"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--text-len", type=int, default=32, help="prompt text tokens after the image tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench_update", help="results file name under experiments/results/")
    args = ap.parse_args()
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    print(describe(), flush=True)
    peaks = {name: matmul_rate(4096, 4096, 4096, dtype) for name, dtype in dtypes.items()}
    print({k: f"{v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()}, flush=True)
    rows, shape_text = [], []
    for preset in args.presets:
        config = model_config(preset, "float32")
        p = config.num_image_tokens + args.text_len
        tokens = args.batch * (p + args.completion_len)
        for dtype in args.dtypes:
            rates = shape_rates(decode_matmuls(config, tokens), dtypes[dtype])
            shape_text.append(f"{preset} {dtype}: " + ", ".join(
                f"[{m}x{k}]@[{k}x{n}] {r / 1e9:.0f}" for (m, k, n), r in sorted(rates.items())))
            r = bench(preset, dtype, args.batch, p, args.completion_len, args.repeats)
            r["mfu"] = r["tflops_per_s"] * 1e12 / peaks[dtype]
            r["roofline_s"] = train_roofline(config, tokens, rates)
            r["frac_roofline"] = r["roofline_s"] / r["step_s"]
            rows.append(r)
            print(r, flush=True)
    device = jax.devices()[0]
    meta = (f"{describe()}; matmul peak (4096^3) fp32 {peaks['float32'] / 1e12:.3f}, bf16 (fp32 accumulation) "
            f"{peaks['bfloat16'] / 1e12:.3f} TFLOP/s; GFLOP/s at the step's own matmul shapes: "
            f"{'; '.join(shape_text)}. GRPO update (forward + backward + AdamW), median of {args.repeats}. "
            f"MFU: model FLOPs / step time / the 4096^3 peak of the step's dtype; roofline: the step's decoder and "
            f"LM-head matmuls (x3 for the backward) at their shapes' measured rates, the rest counted free.")
    lines = ["| preset | params | dtype | batch x seq | compile s | step s | TFLOP/s | MFU | roofline s | % roofline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['params_m']:.1f}M | {r['dtype']} | {r['batch']} x {r['seq_len']} | "
              f"{r['compile_s']:.1f} | {r['step_s']:.3f} | {r['tflops_per_s']:.3f} | {100 * r['mfu']:.1f}% | "
              f"{r['roofline_s']:.3f} | {100 * r['frac_roofline']:.0f}% |" for r in rows]
    table = meta + "\n\n" + "\n".join(lines)
    print("\n" + table)
    os.makedirs(RESULTS, exist_ok=True)
    suffix = "" if device.platform == "cpu" else "_" + device.platform
    with open(os.path.join(RESULTS, f"{args.out}{suffix}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(RESULTS, f"{args.out}{suffix}.json"), "w") as f:
        json.dump({"meta": meta, "peaks": peaks, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

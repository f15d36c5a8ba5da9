"""Rollout throughput: rftjax `sampling.generate` vs transformers' `generate` on the same weights.

Both sample 128 new tokens per row at temperature 1 (no top-k/top-p, no EOS: every row runs the whole
budget) from the same random `default` preset (~20M params) exported with `save_llava`, for batches of
16 and 64 prompts (64 image tokens + 16 text tokens each). rftjax's compile time is measured separately
(ahead-of-time `lower().compile()`); run times are the median of `--repeats` runs after a warm-up.
"Where the time goes" splits rftjax's run into prefill (a 1-token generate) and per-token decode.

    python experiments/bench_sampling.py [--batches 16 64] [--new-tokens 128] [--repeats 3] [--no-hf]

Prints a table and writes experiments/results/bench_sampling.{md,json}. Needs torch + transformers (the
test extra) for the HF rows; importable without grain/TFDS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from rftjax import sampling
from rftjax.models import get_preset, init_params, param_count
from rftjax.models import hf as rhf

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_batch(config, batch: int, text_len: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.full((batch, config.num_image_tokens), config.image_token_id),
                          rng.integers(10, config.text.vocab_size, (batch, text_len))], axis=1).astype(np.int32)
    v = config.vision
    pixels = rng.standard_normal((batch, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    return pixels, ids, np.ones_like(ids, bool)


def time_runs(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_rftjax(config, params, pixels, ids, mask, new_tokens: int, repeats: int, group_size: int = 1):
    kw = dict(config=config, group_size=group_size, max_new_tokens=new_tokens, temperature=1.0, top_k=0, top_p=1.0,
              eos_ids=(), greedy=False, pad_id=0, suppress_ids=(config.image_token_id,))
    args = (params, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    t0 = time.perf_counter()
    compiled = sampling._generate.lower(*args, **kw).compile()
    compile_s = time.perf_counter() - t0
    run = statistics.median(time_runs(lambda: jax.block_until_ready(compiled(*args)), repeats))
    prefill_compiled = sampling._generate.lower(*args, **{**kw, "max_new_tokens": 1}).compile()
    prefill = statistics.median(time_runs(lambda: jax.block_until_ready(prefill_compiled(*args)), repeats))
    out = compiled(*args)
    assert int(out.completion_mask.sum()) == ids.shape[0] * group_size * new_tokens
    return compile_s, run, prefill


def bench_hf(path, pixels, ids, mask, new_tokens: int, repeats: int, dtype: str = "float32"):
    import torch
    from transformers import LlavaForConditionalGeneration

    torch_dtype = getattr(torch, dtype)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                  pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2).contiguous().to(torch_dtype))

    def run():
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        assert out.shape[1] - ids.shape[1] == new_tokens, out.shape
    return statistics.median(time_runs(run, repeats)), torch.get_num_threads()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (no torch installed)")
    args = ap.parse_args()

    config = get_preset(args.preset)
    params = init_params(config, jax.random.key(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rhf.save_llava(tmp, config, params)
        for batch in args.batches:
            pixels, ids, mask = make_batch(config, batch)
            tokens = batch * args.new_tokens
            bf16 = config.replace(dtype="bfloat16")
            variants = [("rftjax float32", config, 1, batch), ("rftjax bf16 compute", bf16, 1, batch)]
            if batch % 8 == 0:  # the RL workload: B/8 prompts, 8 samples each, one prefill per prompt
                variants += [(f"rftjax float32, {batch // 8} prompts x G=8", config, 8, batch // 8),
                             (f"rftjax bf16 compute, {batch // 8} prompts x G=8", bf16, 8, batch // 8)]
            for name, cfg, g, b in variants:
                c, run, prefill = bench_rftjax(cfg, params, pixels[:b], ids[:b], mask[:b], args.new_tokens,
                                               args.repeats, g)
                rows.append(dict(impl=name, batch=batch, compile_s=c, run_s=run, tokens_per_s=tokens / run,
                                 prefill_s=prefill, decode_ms_per_step=1e3 * (run - prefill) / (args.new_tokens - 1)))
                print(rows[-1], flush=True)
            for dtype in ([] if args.no_hf else ["float32", "bfloat16"]):
                run, threads = bench_hf(tmp, pixels, ids, mask, args.new_tokens, args.repeats, dtype)
                rows.append(dict(impl=f"transformers generate {dtype} (torch, {threads} threads)", batch=batch,
                                 compile_s=None, run_s=run, tokens_per_s=tokens / run, prefill_s=None,
                                 decode_ms_per_step=None))
                print(rows[-1], flush=True)
    for batch in args.batches:
        # Ratios are against transformers in float32, the default of both libraries.
        hf = [r for r in rows if r["batch"] == batch and r["impl"].startswith("transformers generate float32")]
        for r in rows:
            if r["batch"] == batch:
                r["speedup_vs_hf"] = r["tokens_per_s"] / hf[0]["tokens_per_s"] if hf else None

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    header = ("| implementation | batch | compile s | run s | tokens/s | x transformers fp32 | prefill s | "
              "decode ms/step |\n|---|---|---|---|---|---|---|---|")
    lines = [header] + [
        f"| {r['impl']} | {r['batch']} | {fmt(r['compile_s'], '.2f')} | {r['run_s']:.3f} | {r['tokens_per_s']:.0f} | "
        f"{fmt(r['speedup_vs_hf'], '.2f')} | {fmt(r['prefill_s'], '.3f')} | {fmt(r['decode_ms_per_step'], '.2f')} |"
        for r in rows]
    meta = (f"preset `{args.preset}` ({param_count(config) / 1e6:.1f}M params), prompt {ids.shape[1]} tokens "
            f"({config.num_image_tokens} image), {args.new_tokens} new tokens, temperature 1, median of "
            f"{args.repeats}; jax {jax.__version__} on {jax.devices()[0].platform} "
            f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    table = meta + "\n\n" + "\n".join(lines)
    print("\n" + table)
    os.makedirs(RESULTS, exist_ok=True)
    suffix = "" if jax.devices()[0].platform == "cpu" else "_" + jax.devices()[0].platform
    with open(os.path.join(RESULTS, f"bench_sampling{suffix}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(RESULTS, f"bench_sampling{suffix}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""Rollout throughput: rftjax `sampling.generate` vs transformers' `generate` on the same weights, against this
machine's roofline measured in the same run, with a decode-step breakdown and the effect of dropping finished
rows.

1. Throughput: both sample 128 new tokens per row at temperature 1 (no top-k/top-p, no EOS: every row runs the
   whole budget) from the same random `default` preset (~20M params) exported with `save_llava`, for batches of
   16 and 64 prompts (64 image tokens + 16 text tokens each). rftjax's compile time is measured separately
   (ahead-of-time `lower().compile()`); run times are the median of `--repeats` runs after a warm-up. Prefill is
   a 1-token generate; decode ms/step is the rest over the other tokens.
2. Roofline: the CPU model and flags; float32 and bf16 matmul rates measured at every shape one decode step uses
   and the memory bandwidth (`roofline.py`); "% roofline" = the roofline's time for the step / the measured
   time (every matmul at its shape's measured rate + the KV cache read at the bandwidth; the rest counted free).
3. Decode-step breakdown (batch 64, both dtypes): the parts of one step timed on their own at the step's shapes,
   over all layers: q/k/v/o projections, attention over the cache (mean context), the cache update, the MLP,
   the LM head with sampling; "other" is the measured step minus their sum (norms, RoPE, loop overhead, fusion
   differences). Not yet trustworthy: in its first run the isolated attention and bf16 cache update each took
   longer than the whole measured step (they slice a stacked cache and do not update in place as the step does).
4. Finished rows: an RL-shaped batch (8 prompts x G = 8) whose rows end with an EOS at a rate that gives the
   main job's completion lengths (mean ~25-30 of a 64 budget), decoded with `compact=True` (finished rows leave the
   batch, the default) vs `compact=False`; the outputs are equal.

    python experiments/bench_sampling.py [--batches 16 64] [--new-tokens 128] [--repeats 3] [--no-hf]

Prints the tables and writes experiments/results/bench_sampling.{md,json}. Needs torch + transformers (the
test extra) for the HF rows; importable without grain/TFDS.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from rftjax import sampling
from rftjax.models import get_preset, init_params, param_count
from rftjax.models import hf as rhf
from rftjax.models.common import dot_product_attention
from roofline import decode_matmuls, decode_roofline, describe, median_time, memory_bandwidth, shape_rates

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_batch(config, batch: int, text_len: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.full((batch, config.num_image_tokens), config.image_token_id),
                          rng.integers(10, config.text.vocab_size, (batch, text_len))], axis=1).astype(np.int32)
    v = config.vision
    pixels = rng.standard_normal((batch, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    return pixels, ids, np.ones_like(ids, bool)


def bench_rftjax(config, params, pixels, ids, mask, new_tokens: int, repeats: int, group_size: int = 1):
    kw = dict(config=config, group_size=group_size, max_new_tokens=new_tokens, temperature=1.0, top_k=0, top_p=1.0,
              eos_ids=(), greedy=False, pad_id=0, suppress_ids=(config.image_token_id,), compact=True)
    args = (params, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    t0 = time.perf_counter()
    compiled = sampling._generate.lower(*args, **kw).compile()
    compile_s = time.perf_counter() - t0
    run = median_time(lambda: jax.block_until_ready(compiled(*args)), repeats)
    prefill_compiled = sampling._generate.lower(*args, **{**kw, "max_new_tokens": 1}).compile()
    prefill = median_time(lambda: jax.block_until_ready(prefill_compiled(*args)), repeats)
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
    return median_time(run, repeats), torch.get_num_threads()


def decode_breakdown(config, batch: int, context: int, repeats: int) -> dict[str, float]:
    """Milliseconds of the parts of one decode step of `batch` rows over all layers, each jitted on its own at the
    step's shapes in `config.dtype`: projections (q, k, v, o), attention over a `context`-slot cache, the cache
    update (k and v written at one slot), the MLP (gate, up, down), the LM head with sampling (filter, Gumbel
    noise, argmax, log-softmax)."""
    t, dt = config.text, config.compute_dtype
    d, h, kvh, hd, i, v = (t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size,
                           t.vocab_size)
    slots = context + 8
    rng = np.random.default_rng(0)

    def arr(*shape, dtype=dt):
        return jnp.asarray(rng.standard_normal(shape) * 0.05, dtype)

    x = arr(batch, d)
    w = {name: arr(t.num_layers, *shape) for name, shape in dict(
        q=(d, h * hd), k=(d, kvh * hd), v=(d, kvh * hd), o=(h * hd, d), gate=(d, i), up=(d, i), down=(i, d)).items()}
    cache = arr(t.num_layers, 2, batch, kvh, slots, hd)
    mask = jnp.asarray(np.arange(slots)[None, None, :] < context).repeat(batch, 0)
    head = arr(d, v)

    def projections(x, a, w):
        return sum((x @ w["q"][n]).sum() + (x @ w["k"][n]).sum() + (x @ w["v"][n]).sum() + (a @ w["o"][n]).sum()
                   for n in range(t.num_layers))

    def attention(q, cache):
        return sum(dot_product_attention(q, cache[n, 0], cache[n, 1], mask).sum() for n in range(t.num_layers))

    def cache_update(cache, kv):
        for n in range(t.num_layers):
            cache = jax.lax.dynamic_update_slice(cache, kv[None], (n, 0, 0, 0, context, 0))
        return cache

    def mlp(x, w):
        return sum((jax.nn.silu(x @ w["gate"][n]) * (x @ w["up"][n])) @ w["down"][n] for n in range(t.num_layers))

    def logits_and_sample(x, head, key):
        logits = (x @ head).astype(jnp.float32)
        return sampling.sample_tokens(key, logits, temperature=1.0, top_k=0, top_p=1.0, greedy=False,
                                      suppress_ids=(config.image_token_id,))

    q = arr(batch, 1, h, hd)
    kv = arr(2, batch, kvh, 1, hd)
    parts = {"q/k/v/o projections": (jax.jit(projections), (x, arr(batch, h * hd), w)),
             "attention over the cache": (jax.jit(attention), (q, cache)),
             "cache update": (jax.jit(cache_update, donate_argnums=0), None),
             "MLP": (jax.jit(mlp), (x, w)),
             "LM head + sampling": (jax.jit(logits_and_sample), (x, head, jax.random.key(0)))}
    out = {}
    for name, (fn, args) in parts.items():
        if args is None:  # the cache is donated (updated in place, as in the decode loop): a fresh one per call
            state = {"cache": cache + 0}

            def run(fn=fn):
                state["cache"] = jax.block_until_ready(fn(state["cache"], kv))
            out[name] = 1e3 * median_time(run, repeats * 3)
        else:
            out[name] = 1e3 * median_time(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)), repeats * 3)
    return out


def bench_compaction(config, params, prompts: int, group: int, new_tokens: int, repeats: int) -> list[dict]:
    """`generate` with and without dropping finished rows, on `prompts` x `group` rows that end with an EOS id at a
    rate giving a mean completion of ~25 tokens (a random model: every 30th token id ends a row)."""
    pixels, ids, mask = make_batch(config, prompts, seed=2)
    args = (params, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    eos = tuple(range(10, config.text.vocab_size, 30))
    rows, outs = [], {}
    for compact in (False, True):
        kw = dict(config=config, group_size=group, max_new_tokens=new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                  eos_ids=eos, greedy=False, pad_id=0, suppress_ids=(config.image_token_id,), compact=compact)
        compiled = sampling._generate.lower(*args, **kw).compile()
        run = median_time(lambda: jax.block_until_ready(compiled(*args)), repeats)
        outs[compact] = out = compiled(*args)
        lengths = np.asarray(out.lengths)
        rows.append(dict(compact=compact, rows=prompts * group, run_s=run, mean_len=float(lengths.mean()),
                         max_len=int(lengths.max()), tokens_per_s=float(lengths.sum()) / run))
        print(rows[-1], flush=True)
    assert np.array_equal(outs[False].completion_ids, outs[True].completion_ids)
    rows[1]["speedup"] = rows[0]["run_s"] / rows[1]["run_s"]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--breakdown-batch", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (no torch installed)")
    args = ap.parse_args()

    config = get_preset(args.preset)
    params = init_params(config, jax.random.key(0))
    dtypes = {"float32": config, "bfloat16": config.replace(dtype="bfloat16")}
    print(describe(), flush=True)
    bandwidth = memory_bandwidth()
    shapes = [s for b in set(args.batches) | {args.breakdown_batch} for s in decode_matmuls(config, b)]
    rates = {name: shape_rates(shapes, cfg.compute_dtype) for name, cfg in dtypes.items()}
    prompt_len = make_batch(config, 1)[1].shape[1]

    def roofline_ms(dtype: str, batch: int) -> float:
        """The roofline's ms for one decode step at the mean context of the benchmark's decode."""
        cache_bytes = 2 if dtype == "bfloat16" else 4
        return 1e3 * decode_roofline(config, batch, prompt_len + args.new_tokens / 2, rates[dtype], bandwidth,
                                     cache_bytes)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rhf.save_llava(tmp, config, params)
        for batch in args.batches:
            pixels, ids, mask = make_batch(config, batch)
            tokens = batch * args.new_tokens
            variants = [(f"rftjax {name}", name, 1, batch) for name in dtypes]
            if batch % 8 == 0:  # the RL workload: B/8 prompts, 8 samples each, one prefill per prompt
                variants += [(f"rftjax {name}, {batch // 8} prompts x G=8", name, 8, batch // 8) for name in dtypes]
            for name, dtype, g, b in variants:
                c, run, prefill = bench_rftjax(dtypes[dtype], params, pixels[:b], ids[:b], mask[:b], args.new_tokens,
                                               args.repeats, g)
                step_ms = 1e3 * (run - prefill) / (args.new_tokens - 1)
                rows.append(dict(impl=name, batch=batch, compile_s=c, run_s=run, tokens_per_s=tokens / run,
                                 prefill_s=prefill, decode_ms_per_step=step_ms,
                                 roofline_ms_per_step=roofline_ms(dtype, batch),
                                 frac_roofline=roofline_ms(dtype, batch) / step_ms))
                print(rows[-1], flush=True)
            for dtype in ([] if args.no_hf else ["float32", "bfloat16"]):
                run, threads = bench_hf(tmp, pixels, ids, mask, args.new_tokens, args.repeats, dtype)
                rows.append(dict(impl=f"transformers generate {dtype} (torch, {threads} threads)", batch=batch,
                                 compile_s=None, run_s=run, tokens_per_s=tokens / run, prefill_s=None,
                                 decode_ms_per_step=None, roofline_ms_per_step=roofline_ms(dtype, batch),
                                 frac_roofline=None))
                print(rows[-1], flush=True)
    for batch in args.batches:
        # Ratios are against transformers in float32, the default of both libraries.
        hf = [r for r in rows if r["batch"] == batch and r["impl"].startswith("transformers generate float32")]
        for r in rows:
            if r["batch"] == batch:
                r["speedup_vs_hf"] = r["tokens_per_s"] / hf[0]["tokens_per_s"] if hf else None

    breakdown = {}
    for name, cfg in dtypes.items():
        parts = decode_breakdown(cfg, args.breakdown_batch, prompt_len + args.new_tokens // 2, args.repeats)
        step = next(r["decode_ms_per_step"] for r in rows if r["impl"] == f"rftjax {name}"
                    and r["batch"] == args.breakdown_batch)
        breakdown[name] = {**parts, "other (norms, RoPE, loop, fusion)": step - sum(parts.values()),
                           "measured decode step": step}
        print(name, breakdown[name], flush=True)
    compaction = bench_compaction(dtypes["float32"], params, 8, 8, 64, args.repeats)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    header = ("| implementation | batch | compile s | run s | tokens/s | x transformers fp32 | prefill s | "
              "decode ms/step | roofline ms/step | % roofline |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [header] + [
        f"| {r['impl']} | {r['batch']} | {fmt(r['compile_s'], '.2f')} | {r['run_s']:.3f} | {r['tokens_per_s']:.0f} | "
        f"{fmt(r['speedup_vs_hf'], '.2f')} | {fmt(r['prefill_s'], '.3f')} | {fmt(r['decode_ms_per_step'], '.2f')} | "
        f"{r['roofline_ms_per_step']:.2f} | {fmt(r['frac_roofline'] and 100 * r['frac_roofline'], '.0f')} |"
        for r in rows]
    rate_text = "; ".join(f"{name}: " + ", ".join(f"[{m}x{k}]@[{k}x{n}] {r / 1e9:.0f}"
                                                  for (m, k, n), r in sorted(rates[name].items()))
                          for name in dtypes)
    meta = (f"{describe()}; memory bandwidth {bandwidth / 1e9:.1f} GB/s; matmul GFLOP/s at the decode shapes: "
            f"{rate_text}.\n\nPreset `{args.preset}` ({param_count(config) / 1e6:.1f}M params), prompt {prompt_len} "
            f"tokens ({config.num_image_tokens} image), {args.new_tokens} new tokens, temperature 1, median of "
            f"{args.repeats}.")
    steps_header = "| part of one decode step (batch {}) | " .format(args.breakdown_batch) + " | ".join(
        f"{n} ms | {n} %" for n in dtypes) + " |\n|---|" + "---|---|" * len(dtypes)
    def share(n, part):
        return f"{breakdown[n][part]:.2f} | {100 * breakdown[n][part] / breakdown[n]['measured decode step']:.0f}%"

    steps_lines = [steps_header] + [f"| {part} | " + " | ".join(share(n, part) for n in dtypes) + " |"
                                    for part in breakdown["float32"]]
    comp_lines = ["| decode | rows | run s | mean / max length | tokens/s | speed-up |", "|---|---|---|---|---|---|"] + [
        f"| {'finished rows dropped (compact=True)' if r['compact'] else 'every row to the end (compact=False)'} | "
        f"{r['rows']} | {r['run_s']:.3f} | {r['mean_len']:.1f} / {r['max_len']} | {r['tokens_per_s']:.0f} | "
        f"{fmt(r.get('speedup'), '.2f')} |" for r in compaction]
    table = "\n\n".join([meta, "\n".join(lines), "Decode-step breakdown (each part jitted alone at the step's "
                          "shapes, all layers; other = measured step - parts):", "\n".join(steps_lines),
                          "Finished rows (8 prompts x G=8, float32, 64-token budget, EOS = every 30th id of a random "
                          "model; outputs equal):", "\n".join(comp_lines)])
    print("\n" + table)
    os.makedirs(RESULTS, exist_ok=True)
    suffix = "" if jax.devices()[0].platform == "cpu" else "_" + jax.devices()[0].platform
    with open(os.path.join(RESULTS, f"bench_sampling{suffix}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(RESULTS, f"bench_sampling{suffix}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "breakdown": breakdown, "compaction": compaction,
                   "rates": {n: {str(k): v for k, v in r.items()} for n, r in rates.items()},
                   "bandwidth": bandwidth}, f, indent=2)


if __name__ == "__main__":
    main()

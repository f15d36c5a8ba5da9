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
3. Decode-step breakdown (batch 64, both dtypes, mean context; `decode_breakdown`): the matmuls (q/k/v/o
   projections, MLP, LM head) timed alone at the step's shapes; attention over the cache, the cache write and
   sampling as the real jitted step (model forward over the per-layer cache, donated) minus that step without
   the part, so fusion and in-place writes count as in the loop; the rest of that step (norms, RoPE,
   embedding, masks); and the decode loop's own cost (the measured step in `generate` minus the jitted step).
   Read the parts as rough shares: in the first run of this version (issue 18) the leave-one-out differences
   added up to more than the step (removing one part also changes how XLA fuses and buffers the rest), and the
   step jitted alone was slower than inside the loop in float32. (A first version timed attention and the
   cache write alone on a stacked cache: they took longer than the whole step.)
4. Finished rows: an RL-shaped batch (8 prompts x G = 8) whose rows end with an EOS at a rate that gives the
   main job's completion lengths (mean ~25-30 of a 64 budget), decoded with `compact=True` (finished rows leave the
   batch, the default) vs `compact=False`; the outputs are equal.

    python experiments/bench_sampling.py [--batches 16 64] [--new-tokens 128] [--repeats 3] [--no-hf]

Prints the tables and writes experiments/results/bench_sampling.{md,json}. Needs torch + transformers (the
test extra) for the HF rows; importable without grain/TFDS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from rftjax import sampling
from rftjax.models import cast_for_compute, get_preset, init_params, model_for, param_count
from rftjax.models import hf as rhf
from rftjax.models import llm
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
    params_of = lambda t: sampling.SamplingParams(group_size=group_size, max_new_tokens=t,  # noqa: E731
                                                  suppress_ids=(config.image_token_id,), compact=True)
    kw = dict(config=config, params=params_of(new_tokens))
    args = (params, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    t0 = time.perf_counter()
    compiled = sampling._generate.lower(*args, **kw).compile()
    compile_s = time.perf_counter() - t0
    run = median_time(lambda: jax.block_until_ready(compiled(*args)), repeats)
    prefill_compiled = sampling._generate.lower(*args, **{**kw, "params": params_of(1)}).compile()
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


def _without(part: str):
    """A context manager: while tracing, the decoder without one part: "attention" (`dot_product_attention`
    returns its queries) or "cache write" (the per-layer k/v `dynamic_update_slice` returns the cache unchanged)."""
    if part == "attention":
        return mock.patch.object(llm, "dot_product_attention", lambda q, k, v, mask: q)
    dus = jax.lax.dynamic_update_slice
    return mock.patch.object(jax.lax, "dynamic_update_slice",
                             lambda x, update, start: x if x.ndim == 4 else dus(x, update, start))


def decode_breakdown(config, params, batch: int, context: int, repeats: int) -> dict[str, float]:
    """Milliseconds of the parts of one decode step of `batch` rows at a `context`-token cache, in `config.dtype`.

    The real step (sample a token from the last logits, then the model's one-token forward over the per-layer
    KV cache, the cache donated so it is written in place, as in `sampling.generate`) is jitted and timed whole,
    then without one part at a time: attention over the cache, the cache write, sampling (argmax instead); a
    part's time is the whole step's minus the step's without it, so fusion and in-place updates count as they
    do in the loop. The matmuls (q/k/v/o projections, MLP, LM head) are plain dots, timed on their own at the
    step's shapes. Returns those parts and "single step" (the whole jitted step)."""
    t, dt = config.text, config.compute_dtype
    model = model_for(config)
    variables = {"params": cast_for_compute(params, config)}
    slots = context + 64
    live = jnp.ones((batch, 1), bool)
    sample = sampling.SamplingParams(suppress_ids=(config.image_token_id,))

    def cache_at_context():
        cache = model.init_state(batch, slots)
        return cache.replace(mask=jnp.broadcast_to(jnp.arange(slots) < context, (batch, slots)),
                             next_pos=jnp.full((batch,), context, jnp.int32), index=jnp.asarray(context, jnp.int32))

    def timed(without: str | None) -> float:
        def step(variables, cache, logits, key):
            if without == "sampling":
                token = jnp.argmax(logits, -1).astype(jnp.int32)
            else:
                token = sampling.sample_tokens(key, logits, sample)[0]
            out = model.apply(variables, None, token[:, None], live, state=cache)
            return out.logits[:, 0], out.state

        fn = jax.jit(step, donate_argnums=1)
        state = {"cache": cache_at_context(), "logits": jnp.zeros((batch, t.vocab_size), jnp.float32)}
        key = jax.random.key(0)

        def run():
            state["logits"], state["cache"] = jax.block_until_ready(fn(variables, state["cache"], state["logits"], key))
        with contextlib.nullcontext() if without in (None, "sampling") else _without(without):
            run()  # traced and compiled here, with the part removed
        return 1e3 * median_time(run, repeats * 5)

    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape) * 0.05, dt)

    d, h, kvh, hd, i = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size
    x, a = arr(batch, d), arr(batch, h * hd)
    layers = [{name: arr(*shape) for name, shape in dict(q=(d, h * hd), k=(d, kvh * hd), v=(d, kvh * hd),
                                                          o=(h * hd, d), gate=(d, i), up=(d, i), down=(i, d)).items()}
              for _ in range(t.num_layers)]
    head = arr(d, t.vocab_size)

    def projections(x, a, layers):
        return sum((x @ w["q"]).sum() + (x @ w["k"]).sum() + (x @ w["v"]).sum() + (a @ w["o"]).sum() for w in layers)

    def mlp(x, layers):
        return sum(((jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]).sum() for w in layers)

    def lm_head(x, head):
        return (x @ head).astype(jnp.float32).sum()

    out = {name: 1e3 * median_time(lambda fn=jax.jit(fn), args=args: jax.block_until_ready(fn(*args)), repeats * 5)
           for name, fn, args in [("q/k/v/o projections", projections, (x, a, layers)), ("MLP", mlp, (x, layers)),
                                  ("LM head", lm_head, (x, head))]}
    whole = timed(None)
    for part, name in [("attention", "attention over the cache"), ("cache write", "cache update (k, v writes)"),
                       ("sampling", "sampling (filter, noise, argmax, log-softmax)")]:
        out[name] = whole - timed(part)
    out["single step"] = whole
    return out


def bench_compaction(config, params, prompts: int, group: int, new_tokens: int, repeats: int) -> list[dict]:
    """`generate` with and without dropping finished rows, on `prompts` x `group` rows that end with an EOS id at a
    rate giving a mean completion of ~25 tokens (a random model: every 30th token id ends a row)."""
    pixels, ids, mask = make_batch(config, prompts, seed=2)
    args = (params, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
    eos = tuple(range(10, config.text.vocab_size, 30))
    rows, outs = [], {}
    for compact in (False, True):
        kw = dict(config=config, params=sampling.SamplingParams(group_size=group, max_new_tokens=new_tokens, eos_ids=eos,
                                                                suppress_ids=(config.image_token_id,), compact=compact))
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
        parts = decode_breakdown(cfg, params, args.breakdown_batch, prompt_len + args.new_tokens // 2, args.repeats)
        step = next(r["decode_ms_per_step"] for r in rows if r["impl"] == f"rftjax {name}"
                    and r["batch"] == args.breakdown_batch)
        single = parts.pop("single step")
        breakdown[name] = {**parts, "rest of the step (norms, RoPE, embedding, masks)": single - sum(parts.values()),
                           "decode loop (state updates, while_loop)": step - single, "measured decode step": step}
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
    table = "\n\n".join([meta, "\n".join(lines), "Decode-step breakdown (all layers; matmuls timed alone at the "
                          "step's shapes, the other parts as the real jitted step minus that step without them):", "\n".join(steps_lines),
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

"""Qwen2.5-VL / Qwen3.5 prefill and decode throughput: rftjax vs transformers on the same weights, with this
machine's roofline measured in the same run.

Models (`--family`): a Qwen2.5-VL with a 4-layer 256-wide decoder (4 heads, 2 kv heads, vocab 8192, M-RoPE) and a
4-block 256-wide vision tower (blocks 0-2 windowed, block 3 full attention); or a Qwen3.5 with a 4-layer 256-wide
decoder (3 Gated DeltaNet layers of 2 key / 4 value heads of 64, then 1 gated-attention layer of 4 heads / 2 kv
heads of 64, partial rotary, interleaved M-RoPE, vocab 8192) and a 4-block 256-wide Qwen3-VL tower (patch 16).
Random weights written by transformers and loaded by `rftjax.models.hf.load_pretrained`. Prompts: 16 text
tokens, an image, 16 text tokens; the rows alternate two image sizes of 64 and 72 image tokens, left-padded to
one length. transformers runs Qwen3.5's delta rule and convolution with its pure-torch fallbacks on CPU (the
`flash-linear-attention` / `causal-conv1d` kernels are CUDA-only).

- prefill: a 1-token greedy generate (image encoding + the prompt's forward pass), prompt tokens/s.
- decode: greedy generate of `--new-tokens` (no EOS) minus the 1-token run, generated tokens/s.
- roofline of one decode step: every matmul of the step at the FLOP rate measured for its own shape in this
  run, plus the KV cache read at the measured bandwidth (mean context); "x roofline" = measured / roofline.

    python experiments/bench_qwen_vl.py [--family qwen2_5_vl|qwen3_5] [--decode-batch 32] [--prefill-batch 8]
        [--new-tokens 64] [--no-hf]

Prints a table and writes experiments/results/bench_{family}.{md,json} (bench_qwen_vl.* for Qwen2.5-VL). Needs
torch + transformers (the test extra) for the transformers rows and to write the weights; importable without
grain/TFDS.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rftjax import sampling
from rftjax.data.qwen_image import QwenImageProcessor, pad_images
from rftjax.models import QwenImages, param_count
from rftjax.models import hf as rhf
from rftjax.models.config import QwenVisionConfig, QwenVLConfig, TextConfig
from roofline import decode_matmuls, decode_roofline, describe, matmul_rate, median_time, memory_bandwidth

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IDS = dict(image_token_id=8000, video_token_id=8001, vision_start_token_id=8002, vision_end_token_id=8003)
SIZES = {"qwen2_5_vl": ((224, 224), (168, 336)), "qwen3_5": ((256, 256), (192, 384))}  # 64 and 72 image tokens
HF_CLASSES = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
              "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration")}


def bench_config(family: str = "qwen2_5_vl") -> QwenVLConfig:
    if family == "qwen3_5":
        vision = QwenVisionConfig(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=256,
                                  patch_size=16, window_size=None, fullatt_block_indexes=(), norm="layer",
                                  gated_mlp=False, hidden_act="gelu_tanh", patch_bias=True,
                                  num_position_embeddings=256)
        text = TextConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                          num_kv_heads=2, head_dim=64, rope_theta=1e7, tie_word_embeddings=False,
                          mrope_section=(3, 3, 2), mrope_interleaved=True, qk_norm=True,
                          layer_pattern=("gated_delta_net",) * 3 + ("attention",), zero_centered_norm=True,
                          attn_output_gate=True, partial_rotary_factor=0.25, linear_key_head_dim=64,
                          linear_value_head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4)
        return QwenVLConfig(vision=vision, text=text, model_type="qwen3_5", max_image_tokens=80, **IDS)
    vision = QwenVisionConfig(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=256,
                              window_size=112, fullatt_block_indexes=(3,))
    text = TextConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                      num_kv_heads=2, qkv_bias=True, rope_theta=1e6, tie_word_embeddings=False,
                      mrope_section=(8, 12, 12))
    return QwenVLConfig(vision=vision, text=text, max_image_tokens=80, **IDS)


def write_hf_model(config: QwenVLConfig, path: str):
    import torch
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in HF_CLASSES[config.model_type])
    hf = rhf.qwen_config_to_hf(config)
    hf.pop("architectures"), hf.pop("model_type")
    torch.manual_seed(0)
    model = model_cls(config_cls(**hf)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(path)


def make_batch(config: QwenVLConfig, batch: int, text: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    proc = QwenImageProcessor.for_model(config)
    sizes = SIZES[config.model_type]
    images = [proc(Image.fromarray(rng.integers(0, 256, (*sizes[b % 2], 3), dtype=np.uint8))) for b in range(batch)]
    rows = [np.concatenate([rng.integers(10, 7900, text), [config.vision_start_token_id],
                            np.full(int(g.prod()) // 4, config.image_token_id), [config.vision_end_token_id],
                            rng.integers(10, 7900, text)]) for _, g in images]
    length = max(len(r) for r in rows)
    ids = np.zeros((batch, length), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, length - len(r):], mask[b, length - len(r):] = r, 1
    padded = pad_images(images, config.buckets)
    return {"ids": ids, "mask": mask, "patches": padded["patches"], "grid": padded["grid_thw"],
            "hf_pixels": np.concatenate([p for p, _ in images]), "hf_grid": np.stack([g for _, g in images])}


def rftjax_generate_time(config, params, b, new_tokens: int, repeats: int) -> float:
    images = QwenImages(jnp.asarray(b["patches"]), jnp.asarray(b["grid"]))
    ids, mask = jnp.asarray(b["ids"], jnp.int32), jnp.asarray(b["mask"], bool)

    def run():
        out = sampling.generate(params, config, images, ids, mask, jax.random.key(0),
            sampling.SamplingParams(max_new_tokens=new_tokens,
                                greedy=True))
        jax.block_until_ready(out.completion_ids)
    return median_time(run, repeats)


def hf_generate_time(model, b, new_tokens: int, repeats: int) -> float:
    import torch

    inputs = dict(input_ids=torch.tensor(b["ids"]), attention_mask=torch.tensor(b["mask"]),
                  pixel_values=torch.tensor(b["hf_pixels"]), image_grid_thw=torch.tensor(b["hf_grid"]),
                  mm_token_type_ids=torch.tensor((b["ids"] == IDS["image_token_id"]) * 1))

    def run():
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           suppress_tokens=[IDS["image_token_id"], IDS["video_token_id"]], pad_token_id=0,
                           eos_token_id=None)
    return median_time(run, repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=sorted(SIZES), default="qwen2_5_vl")
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true",
                    help="skip the transformers rows (torch is still used to write the weights)")
    args = ap.parse_args()

    config = bench_config(args.family)
    t = config.text
    bandwidth = memory_bandwidth()
    rates = {shape: matmul_rate(*shape) for shape in set(decode_matmuls(config, args.decode_batch))}
    prefill = make_batch(config, args.prefill_batch)
    rate_prefill = matmul_rate(prefill["ids"].size, t.hidden_size, t.intermediate_size)
    rate_text = ", ".join(f"[{m}x{k}]@[{k}x{n}] {r / 1e9:.0f}" for (m, k, n), r in sorted(rates.items()))
    print(describe(), flush=True)
    print(f"roofline: bandwidth {bandwidth / 1e9:.1f} GB/s; fp32 matmul GFLOP/s at the decode shapes: {rate_text}; "
          f"{rate_prefill / 1e9:.0f} at the prefill MLP shape", flush=True)

    import torch
    import transformers

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_model(config, tmp)
        loaded, params = rhf.load_pretrained(tmp, max_image_tokens=config.max_image_tokens)
        assert loaded == config, (loaded, config)
        hf_cls = getattr(transformers, HF_CLASSES[args.family][1])
        hf_model = None if args.no_hf else hf_cls.from_pretrained(tmp).eval()
        decode = make_batch(config, args.decode_batch, seed=1)
        n = args.new_tokens
        impls = [("rftjax (jit, float32)", lambda b, k: rftjax_generate_time(config, params, b, k, args.repeats))]
        if hf_model is not None:
            impls.append((f"transformers (torch {torch.__version__}, {torch.get_num_threads()} threads, float32)",
                          lambda b, k: hf_generate_time(hf_model, b, k, args.repeats)))
        context = decode["mask"].sum(1).mean() + n / 2
        roof = decode_roofline(config, args.decode_batch, context, rates, bandwidth)
        for name, timer in impls:
            t_prefill = timer(prefill, 1)
            t1, tn = timer(decode, 1), timer(decode, n)
            step = (tn - t1) / (n - 1)
            rows.append(dict(impl=name, prefill_batch=args.prefill_batch, prefill_tokens=int(prefill["ids"].size),
                             prefill_s=t_prefill, prefill_tokens_per_s=prefill["ids"].size / t_prefill,
                             decode_batch=args.decode_batch, decode_ms_per_step=1e3 * step,
                             decode_tokens_per_s=args.decode_batch / step, roofline_ms_per_step=1e3 * roof,
                             x_roofline=step / roof))
            print(rows[-1], flush=True)
    if len(rows) == 2:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            rows[0][key.replace("tokens_per_s", "x_transformers")] = rows[0][key] / rows[1][key]

    meta = (f"{describe()}; memory bandwidth {bandwidth / 1e9:.1f} GB/s; fp32 matmul GFLOP/s at the decode shapes: "
            f"{rate_text}; {rate_prefill / 1e9:.0f} at the prefill MLP shape. Model: "
            f"{param_count(config) / 1e6:.1f}M params ({args.family}: 4-layer 256-wide decoder "
            f"{'/'.join(t.layer_pattern)}, 4-block vision tower); prompts "
            f"of {prefill['ids'].shape[1]} tokens with 64- and 72-token images; {n} new tokens, greedy.")
    header = ("| implementation | prefill tokens/s (batch {pb}) | decode tokens/s (batch {db}) | decode ms/step | "
              "roofline ms/step | x roofline |\n|---|---|---|---|---|---|").format(pb=args.prefill_batch,
                                                                               db=args.decode_batch)
    lines = [header] + [f"| {r['impl']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} | "
                        f"{r['decode_ms_per_step']:.2f} | {r['roofline_ms_per_step']:.2f} | {r['x_roofline']:.2f} |"
                        for r in rows]
    if "decode_x_transformers" in rows[0]:
        lines.append(f"\nrftjax / transformers: prefill {rows[0]['prefill_x_transformers']:.2f}x, decode "
                     f"{rows[0]['decode_x_transformers']:.2f}x.")
    text = "\n".join([meta, "", *lines])
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    name = "bench_qwen_vl" if args.family == "qwen2_5_vl" else f"bench_{args.family}"
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(f"# {args.family} prefill/decode: rftjax vs transformers\n\n`python experiments/bench_qwen_vl.py "
                f"--family {args.family}`\n\n{text}\n")
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

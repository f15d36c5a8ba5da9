"""Media once per prompt: XLA's FLOP count of the compiled RL update when each prompt's image is stored once and
its features gathered into its G rows (`SequenceBatch.prompt_index`), against the same update with the image
repeated in every row, and the losses of both.

    python experiments/media_once.py        # prints the table, saves experiments/results/media_once.md

It also times both compiled updates side by side (median of 5) and reports each one's achieved FLOP/s as a
fraction of this machine's float32 matmul rate measured in the same run (`experiments/roofline.py`): tiny models,
so the fraction is low and the time ratio says more than the FLOP ratio about dispatch-bound programs.

For each model (the tiny LLaVA and Qwen2.5-VL presets), B = 2 prompts x G = 8 rows, GRPO on-policy (one
minibatch) with a KL term (so the reference's forward pass runs too). The vision share is XLA's count of the
vision tower's own work in the per-row update: the forward of `encode_images` on N images for the reference
log-probs plus its forward and backward for the policy loss (`jax.vjp`). Storing the media once should remove
(G - 1) / G = 7/8 of that share.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from rftjax import optim, rl
from rftjax.batches import RolloutBatch, SequenceBatch
from rftjax.models import QwenImages, get_preset, init_params, model_for
from rftjax.rl_update import UpdateSettings, make_rl_update
from roofline import describe, matmul_rate, median_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, G = 2, 8


def batches(config, rng: np.random.Generator, b: int = B, g: int = G):
    """`(per_prompt, per_row)` RolloutBatches of the same b x g rows: media once with `prompt_index`, or
    repeated in every row (LLaVA: random images; Qwen-VL: images of 4 and 8 tokens, alternating)."""
    B, G = b, g  # noqa: N806
    n, t = B * G, 6
    if hasattr(config, "num_image_tokens"):
        v = config.vision
        media = jnp.asarray(rng.standard_normal((B, v.image_size, v.image_size, v.num_channels)), jnp.float32)
        image_tokens = np.full(B, config.num_image_tokens)
    else:
        v = config.vision
        grid = np.asarray([[1, 4, 4], [1, 4, 8]] * B, np.int32)[:B]  # 4 and 8 image tokens
        patches = np.zeros((B, 32, v.patch_dim), np.float32)
        for i, g in enumerate(grid):
            patches[i, :g.prod()] = rng.standard_normal((g.prod(), v.patch_dim))
        media = QwenImages(jnp.asarray(patches), jnp.asarray(grid))
        image_tokens = grid.prod(1) // v.merge_unit
    width = int(image_tokens.max()) + 3
    prompt = np.zeros((B, width), np.int32)
    prompt_mask = np.zeros((B, width), bool)
    for i, k in enumerate(image_tokens):  # left-padded: [pad][image x k][3 text tokens]
        prompt[i, width - k - 3:] = np.concatenate([np.full(k, config.image_token_id), rng.integers(4, 40, 3)])
        prompt_mask[i, width - k - 3:] = True
    completion_mask = np.arange(t)[None] < rng.integers(1, t + 1, n)[:, None]
    common = dict(prompt_ids=jnp.asarray(np.repeat(prompt, G, 0)),
                  prompt_mask=jnp.asarray(np.repeat(prompt_mask, G, 0)),
                  completion_ids=jnp.asarray(np.where(completion_mask, rng.integers(4, 40, (n, t)), 0), jnp.int32),
                  completion_mask=jnp.asarray(completion_mask))
    once = SequenceBatch(pixel_values=media, prompt_index=jnp.repeat(jnp.arange(B, dtype=jnp.int32), G),
                               **common)
    per_row = SequenceBatch(pixel_values=jax.tree.map(lambda x: jnp.repeat(x, G, 0), media), **common)
    rewards = jnp.asarray(rng.random(n), jnp.float32)
    sampler = jnp.zeros((n, t), jnp.float32)
    return (RolloutBatch(seq=once, rewards=rewards, sampler_logprobs=sampler),
            RolloutBatch(seq=per_row, rewards=rewards, sampler_logprobs=sampler))


def vision_flops(config, params, media) -> float:
    """XLA FLOPs of the vision tower's work in the per-row update: one forward (reference log-probs) plus a forward
    and backward (the policy loss) of `encode_images` on the N repeated images."""
    model = model_for(config)

    def encode(p):
        return jax.tree.leaves(model.apply({"params": p}, media, method="encode_images"))[0]

    def fwd_bwd(p):
        out, vjp = jax.vjp(encode, p)
        return vjp(jnp.ones_like(out))

    cost = lambda f: float(jax.jit(f).lower(params).compile().cost_analysis()["flops"])  # noqa: E731
    return cost(encode) + cost(fwd_bwd)


def measure(preset: str, repeats: int = 0) -> dict:
    """FLOPs (and with `repeats`, median seconds) of the compiled update both ways, the vision share, and how far
    the two updates' losses and params are apart."""
    config = get_preset(preset)
    algo = rl.get_algorithm("grpo", group_size=G, kl_coef=0.05)
    params, ref = init_params(config, jax.random.key(0)), init_params(config, jax.random.key(1))
    tx = optim.make_optimizer(optim.make_schedule(1e-3, 10))
    once, per_row = batches(config, np.random.default_rng(0))
    update = make_rl_update(UpdateSettings(config, algo))
    out = {}
    for name, batch in (("once", once), ("per_row", per_row)):
        state = optim.TrainState.create(jax.tree.map(jnp.copy, params), tx)
        compiled = update.lower(state, None, ref, {}, batch, jax.random.key(2)).compile()
        policy, _, (metrics, _) = compiled(state, None, ref, {}, batch, jax.random.key(2))
        out[name] = dict(flops=float(compiled.cost_analysis()["flops"]), loss=float(metrics["loss"][0]),
                         params=policy.params, seconds=float("nan"))
        if repeats:  # the update donates its state: a fresh copy per call, made before the clock starts
            states = [optim.TrainState.create(jax.tree.map(jnp.copy, params), tx) for _ in range(repeats + 1)]
            out[name]["seconds"] = median_time(lambda: jax.block_until_ready(
                compiled(states.pop(), None, ref, {}, batch, jax.random.key(2))), repeats=repeats)
    vision = vision_flops(config, params, per_row.seq.pixel_values)
    param_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out["once"]["params"]),
                                                                      jax.tree.leaves(out["per_row"]["params"])))
    saved = out["per_row"]["flops"] - out["once"]["flops"]
    return dict(preset=preset, per_row=out["per_row"]["flops"], once=out["once"]["flops"], vision=vision,
                per_row_s=out["per_row"]["seconds"], once_s=out["once"]["seconds"],
                saved=saved, saved_of_vision=saved / vision, expected=(G - 1) / G,
                loss_diff=abs(out["once"]["loss"] - out["per_row"]["loss"]), param_diff=param_diff)


def main() -> None:
    rows = [measure(p, repeats=5) for p in ("tiny", "qwen_vl_tiny")]
    peak = matmul_rate(512, 512, 512)
    lines = [f"B = {B} prompts x G = {G} rows, GRPO on-policy with a KL term, one compiled update (XLA "
             f"`cost_analysis()` FLOPs). `python experiments/media_once.py`", "", describe(),
             f"float32 matmul rate at 512^3 in this run: {peak / 1e9:.1f} GFLOP/s", "",
             "| model | update FLOPs, media per row | media once per prompt | saved | vision share (per row) | "
             "saved / vision share | expected (G-1)/G | loss diff | max param diff |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['per_row'] / 1e6:.2f} M | {r['once'] / 1e6:.2f} M | "
                     f"{r['saved'] / 1e6:.2f} M ({r['saved'] / r['per_row']:.1%}) | {r['vision'] / 1e6:.2f} M | "
                     f"{r['saved_of_vision']:.3f} | {r['expected']:.3f} | {r['loss_diff']:.1e} | "
                     f"{r['param_diff']:.1e} |")
    lines += ["", "| model | ms per update, media per row | media once | speed-up | per row: FLOP/s / matmul rate | "
              "once: FLOP/s / matmul rate |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['per_row_s'] * 1e3:.1f} | {r['once_s'] * 1e3:.1f} | "
                     f"{r['per_row_s'] / r['once_s']:.2f}x | {r['per_row'] / r['per_row_s'] / peak:.3f} | "
                     f"{r['once'] / r['once_s'] / peak:.3f} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(ROOT, "experiments", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "experiments", "results", "media_once.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

"""Memory planner: whether a run fits its devices, per device, before anything is allocated.

    python -m rftjax.plan --config configs/qwen2_5_vl_easyr1.py --config.model.preset=qwen2_5_vl_7b \\
        --config.plan.num_devices=8 --config.mesh.fsdp=8 --config.plan.device_memory_gb=16
    ... --compile --topology v5e-8      # the plan for that slice's chips, and XLA's own bytes per device for
                                        # each program (rftjax.aot)

Every figure is bytes per device for the run's mesh (`mesh.data x mesh.fsdp x mesh.tensor`, `plan.num_devices`
devices; the mesh need not exist here), from abstract shapes (`jax.eval_shape`: no array is allocated) and the
logical-axis shardings `rftjax.sharding` gives each param:

  params        every param (base + LoRA adapters), in `param_dtype`, sharded by its logical axes.
  trainable     the part that trains (`rftjax.trainable`): all params, LoRA adapters only, minus `optim.freeze`.
  optimizer     AdamW's state for the trainable params (`optax` `init` on their shapes: two moments, plus the
                gradient accumulator of `optim.grad_accum > 1`).
  gradients     the gradient of the trainable params and the optimizer's update made from it (param-sized,
                before it is applied), alive during the update; with `rl.micro_batch_size` a micro-batch's
                gradient, their running sum and the update.
  reference     the reference policy's trainable params (the frozen ones are shared), when the algorithm has a KL.
  critic        PPO: the critic's trainable backbone copy + value head, its optimizer state and gradients.
  sampling copy the compute-dtype copy of the kernels the sampler makes (`cast_for_compute`) when `dtype` differs
                from `param_dtype`.
  reward model  a `reward.model`'s params without the LM head (`rftjax.rewards.models`), sharded as the policy's;
  judge         a `reward.judge`'s params, likewise (its decode state and activations are not counted: it runs
                after the rollout's state is freed, with at most the rollout's rows).
  decode state  the rollout's decode state (the model's `init_state`, shapes by `jax.eval_shape`; a KV cache for
                attention layers): `(gen_prompts_per_round or prompts_per_step) x group_size` rows (and the
                evaluation batch, whichever is larger) x (max_prompt_len + max_new_tokens) slots x layers x 2
                x kv heads x head dim, compute dtype, rows over data x fsdp, kv heads over tensor; a Gated DeltaNet
                layer's conv window and float32 recurrent state instead (no growth with length).
  activations   an estimate for one update minibatch (rows over data x fsdp): what the backward pass keeps per
                decoder layer and token (Korthikanti et al. 2022 sec. 4, for SwiGLU/GQA: the norm, projection and
                MLP intermediates, the attention probabilities in float32; a Gated DeltaNet layer's projections,
                float32 q/k/v and its chunk's [C, C] matrices per head), for every layer without remat, the
                layer inputs with `remat` (policy `full`; `dots` keeps the matmul outputs too); the vision
                tower's likewise per image when it trains (each prompt's media once per micro-batch); plus the
                largest of what is live one at a time: the decoder layer being recomputed (one block of attention
                scores), one vision block, or one chunk of float32 logits (`steps.LOGPROB_CHUNK_BYTES`) with its
                probabilities and gradient. Rows: `rl.micro_batch_size` (else the minibatch).

Media: prompts are padded to `max_prompt_len`, which holds a row's image and video tokens (at most the model's
`max_image_tokens`), and the vision tower's activations are counted for `max_image_tokens` patches per prompt;
for models that read videos the report adds the largest video `data.video` allows (`video_budget`: its frames,
temporal patches and tokens, under the per-frame budget) and whether it fits the row.

When the total exceeds `plan.device_memory_gb` the planner says which settings bring it under, each alone, with
its figure: bf16 params, LoRA, FSDP over all devices, remat, smaller minibatches, a frozen vision tower.
The total is the peak of the run: the persistent terms plus the larger of the rollout's (sampling copy, decode
state) and the update's (gradients, activations), which are never live together.
The persistent terms are exact (tests/test_plan.py compares them with a live run's arrays); the activation term
is an estimate (the same test reports it beside XLA's own temp-buffer figure for the update).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec

from rftjax import configs, optim, steps, trainable
from rftjax.build import media_input_of, model_config_of
from rftjax.models import dummy_inputs, model_for
from rftjax.models.family import abstract_state, family_of
from rftjax.models.llm import layer_kind
from rftjax.models.common import FULL_ATTENTION_BLOCK
from rftjax.sharding import logical_specs, mesh_shape

GB = 1e9
ROLLOUT_TERMS = ("sampling copy", "decode state")
"""Terms live only while the sampler runs."""
UPDATE_TERMS = ("gradients", "activations")
"""Terms live only while the update runs (never at the same time as `ROLLOUT_TERMS`)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device of each term (`TERMS`), the total, the device memory and the mesh (`{axis: size}`)."""

    terms: dict[str, float]
    device_memory: float
    mesh: dict[str, int]

    @property
    def total(self) -> float:
        """The peak: the persistent terms plus the larger of the rollout's (`ROLLOUT_TERMS`, live while sampling)
        and the update's (`UPDATE_TERMS`, live while updating)."""
        persistent = sum(v for k, v in self.terms.items() if k not in ROLLOUT_TERMS + UPDATE_TERMS)
        return float(persistent + max(sum(self.terms.get(k, 0.0) for k in ROLLOUT_TERMS),
                                      sum(self.terms.get(k, 0.0) for k in UPDATE_TERMS)))

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory


def mesh_sizes(c: ml_collections.ConfigDict) -> dict[str, int]:
    """`{data, fsdp, tensor}` sizes of the run's mesh over `plan.num_devices` (0: this machine's device count).

    Raises:
      ValueError: sizes that do not multiply to the device count.
    """
    return mesh_shape(c.plan.num_devices or len(jax.devices()), c.mesh.data, c.mesh.fsdp, c.mesh.tensor)


def _per_device(boxed, sizes: dict[str, int]) -> dict[tuple[str, ...], float]:
    """Bytes per device of each leaf of an abstract boxed param tree, sharded as `rftjax.sharding` shards it
    (`logical_specs` on a mesh of `sizes`)."""
    from flax import traverse_util

    def shard_bytes(spec, x):
        axes = tuple(spec) + (None,) * (len(x.shape) - len(spec))
        shard = [d // math.prod(sizes[a] for a in ((ax,) if isinstance(ax, str) else ax)) if ax else d
                 for d, ax in zip(x.shape, axes)]
        return float(math.prod(shard) * jnp.dtype(x.dtype).itemsize)

    per_leaf = jax.tree.map(shard_bytes, logical_specs(boxed, sizes), nn.unbox(boxed),
                            is_leaf=lambda x: isinstance(x, PartitionSpec))
    return traverse_util.flatten_dict(per_leaf)


def _activations(mc, rows: float, seq: int, completion: int, media_rows: float, vision_trains: bool = True) -> float:
    """The activation estimate of one update minibatch of `rows` rows using `media_rows` prompts' media (see the
    module docstring), bytes per device. `vision_trains`: some vision param gets a gradient (else the tower runs
    forward only: one block at a time, no block inputs kept)."""
    e = jnp.dtype(mc.compute_dtype).itemsize
    t = mc.text
    terms = [layer_kind(name).activations(t, seq, e) for name in t.layer_kinds]  # (per token, matmul outputs)
    layer = max(rows * seq * per_token for per_token, _ in terms)  # the one layer being recomputed
    if not mc.remat:
        text = sum(rows * seq * per_token for per_token, _ in terms) - layer
    else:
        text = rows * seq * sum(e * t.hidden_size + (saved if mc.remat_policy != "full" else 0) for _, saved in terms)
    patches, dv, depth, heads, mv, vision_remat = family_of(mc).vision_dims(mc)
    block = min(patches, FULL_ATTENTION_BLOCK)  # one block of queries' float32 scores and probs at a time
    vision_layer = media_rows * patches * (e * (10 * dv + 4 * mv) + heads * block * (4 + e))
    if not vision_trains:
        vision = 0.0
    elif mc.remat and vision_remat:
        vision = depth * media_rows * patches * e * dv
    else:
        vision = (depth - 1) * vision_layer
    # one chunk of float32 logits at a time (steps.token_logprobs): logits, probabilities and their gradient
    logits = 3.0 * min(steps.LOGPROB_CHUNK_BYTES, 4.0 * t.vocab_size * rows * completion)
    return text + vision + max(layer, vision_layer, logits)  # what is kept + the one transient part at a time


def _checkpoint_bytes(path: str, policy_config, sizes: dict[str, int], with_head: bool) -> float:
    """Bytes per device of the params of the checkpoint at `path` (read as `rftjax.rewards.models` loads it,
    without the LM head unless `with_head`); 0 for no path."""
    if not path:
        return 0.0
    from rftjax.models import hf
    from rftjax.rewards.models import load_overrides

    config = hf.load_config(path, **load_overrides(policy_config))
    boxed = jax.eval_shape(lambda: model_for(config).init(jax.random.key(0), *dummy_inputs(config))["params"])
    return float(sum(v for p, v in _per_device(boxed, sizes).items() if with_head or "lm_head" not in p))


def plan(c: ml_collections.ConfigDict) -> Plan:
    """The `Plan` of run config `c` (nothing is allocated; `c.plan.num_devices` devices need not exist).

    Raises:
      ValueError: a bad model, LoRA, freeze or mesh setting.
    """
    mc = model_config_of(c)
    algo = configs.algorithm(c)
    sizes = mesh_sizes(c)
    n_data = sizes["data"] * sizes["fsdp"]
    boxed = jax.eval_shape(lambda: model_for(mc).init(jax.random.key(0), *dummy_inputs(mc))["params"])
    per_device = _per_device(boxed, sizes)
    shapes = nn.unbox(boxed)
    paths = trainable.trainable_paths(shapes, mc, c.optim.freeze)
    train_bytes = sum(v for p, v in per_device.items() if p in paths)
    train_shapes = trainable.split(shapes, paths)[0]
    tx = optim.make_optimizer(1e-3, grad_accum=c.optim.grad_accum)  # state shapes only
    opt = jax.eval_shape(tx.init, train_shapes)
    opt_elems = sum(x.size for x in jax.tree.leaves(opt) if x.ndim)
    train_elems = sum(x.size for x in jax.tree.leaves(train_shapes))
    optimizer = train_bytes * opt_elems / max(train_elems, 1)

    minibatch = c.rl.minibatch_size or c.rl.prompts_per_step * algo.group_size
    micro_batched = 0 < c.rl.micro_batch_size < minibatch
    terms = {"params": sum(per_device.values()), "optimizer": optimizer,
             "gradients": train_bytes * (3 if micro_batched else 2),  # + the update (+ the running sum)
             "reference": train_bytes if algo.uses_reference else 0.0,
             "critic": 4.0 * train_bytes if algo.uses_critic else 0.0}
    terms["reward model"] = _checkpoint_bytes(c.reward.model, mc, sizes, with_head=False)
    terms["judge"] = _checkpoint_bytes(c.reward.judge, mc, sizes, with_head=True)
    kernels = sum(v for p, v in per_device.items() if p[-1] in ("kernel", "embed_tokens"))
    terms["sampling copy"] = 0.0 if mc.dtype == mc.param_dtype else kernels * (
        jnp.dtype(mc.compute_dtype).itemsize / jnp.dtype(mc.params_dtype).itemsize)
    t = mc.text
    slots = c.data.max_prompt_len + c.rl.max_new_tokens
    gen_rows = (configs.schedule(c)["gen_prompts_per_round"] or c.rl.prompts_per_step) * algo.group_size
    rows = max(gen_rows, c.eval.batch_size) / n_data
    per_row = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state(mc, 1, slots).layers))
    heads_split = sizes["tensor"] if t.num_kv_heads % sizes["tensor"] == 0 else 1  # kv heads over tensor
    terms["decode state"] = float(rows * per_row / heads_split)
    mb_rows = (c.rl.micro_batch_size or c.rl.minibatch_size or c.rl.prompts_per_step * algo.group_size) / n_data
    media_rows = min(mb_rows, c.rl.prompts_per_step / n_data)  # each prompt's media is encoded once per micro-batch
    vision = family_of(mc).vision_modules
    vision_trains = any(p[0] in vision for p in paths)
    terms["activations"] = _activations(mc, mb_rows, slots, c.rl.max_new_tokens, media_rows, vision_trains)
    memory = c.plan.device_memory_gb * GB if c.plan.device_memory_gb else _local_memory()
    return Plan(terms, memory, sizes)


def _local_memory() -> float:
    """This machine's first device's memory (bytes): its `bytes_limit`, else 16 GB (a TPU v5e chip)."""
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("bytes_limit", 16 * GB))


def levers(c: ml_collections.ConfigDict) -> list[tuple[str, dict]]:
    """Settings that lower a run's memory, each as `(description, {config key: value})`."""
    n = c.plan.num_devices or len(jax.devices())
    out = []
    if c.model.overrides.get("param_dtype", "float32") != "bfloat16":
        out.append(("bf16 params", {"model.overrides.param_dtype": "bfloat16"}))
    if not c.model.lora.rank:
        out.append(("LoRA rank 64 on the decoder", {"model.lora.rank": 64, "model.lora.alpha": 128.0}))
    if c.mesh.fsdp != n:
        out.append((f"FSDP over all {n} devices", {"mesh.fsdp": n, "mesh.data": 1, "mesh.tensor": 1}))
    if not c.model.overrides.get("remat", False):
        out.append(("remat", {"model.overrides.remat": True}))
    if not c.optim.freeze and not c.model.lora.rank:
        vision = family_of(model_config_of(c)).vision_modules
        out.append(("frozen vision tower", {"optim.freeze": f"({'|'.join(vision)})/.*"}))
    algo, sizes = configs.algorithm(c), mesh_sizes(c)
    rows, n_data = c.rl.prompts_per_step * algo.group_size, sizes["data"] * sizes["fsdp"]
    if (c.rl.micro_batch_size or c.rl.minibatch_size or rows) > n_data and rows % n_data == 0:
        out.append(("1 row per device per micro-batch (same updates)", {"rl.micro_batch_size": n_data}))
    return out


def _with(c: ml_collections.ConfigDict, settings: dict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(c.to_dict())
    for key, value in settings.items():
        configs.set_field(c, key, value)
    return c


def table(p: Plan) -> str:
    """The plan as a text table, GB per device."""
    lines = [f"{'term':<16}{'GB/device':>11}"]
    lines += [f"{k:<16}{v / GB:>11.2f}" for k, v in p.terms.items()]
    lines.append(f"{'total (peak)':<16}{p.total / GB:>11.2f}   of {p.device_memory / GB:.1f} GB: "
                 f"{'fits' if p.fits else 'DOES NOT FIT'}  (mesh {p.mesh})")
    return "\n".join(lines)


def video_budget(c: ml_collections.ConfigDict) -> dict | None:
    """The largest video `data.video` lets a row hold (`max_frames` frames of `frame_max_tokens` tokens) as the run's
    model reads it: `{"frames", "temporal_patches", "tokens_per_patch", "tokens", "max_image_tokens", "fits"}`
    (`fits`: the row's token and grid-row budgets hold it; else such rows are dropped and counted), or None for a
    model that reads no videos."""
    from rftjax.data.video import VideoMeta

    media = media_input_of(c, model_config_of(c))
    if not hasattr(media, "video"):
        return None
    side = int(math.isqrt(media.video.frame_max_tokens)) * media.processor.factor  # a square frame at the budget
    meta = VideoMeta(media.video.max_frames, media.video.fps, side, side)
    try:
        span, fits = media.spans([meta])[0], True
    except ValueError:
        span, fits = dataclasses.replace(media, max_items=10 ** 6, max_image_tokens=10 ** 9).spans([meta])[0], False
    patches = max(len(span.timestamps), -(-media.video.max_frames // media.processor.temporal_patch_size))
    return {"frames": media.video.max_frames, "temporal_patches": patches, "tokens_per_patch": span.total_tokens //
            patches, "tokens": span.total_tokens, "max_image_tokens": media.max_image_tokens, "fits": fits}


def report(c: ml_collections.ConfigDict) -> str:
    """`table(plan(c))` (with `video_budget`'s line for video models), and when it does not fit, each lever's total
    and whether it fits alone."""
    p = plan(c)
    out = [table(p)]
    video = video_budget(c)
    if video is not None:
        out.append(f"video rows (data.video): {video['frames']} frames -> {video['temporal_patches']} temporal "
                   f"patches x {video['tokens_per_patch']} tokens = {video['tokens']} tokens per video, of "
                   f"max_image_tokens={video['max_image_tokens']} per row: " + (
                       "fits" if video["fits"] else "over it: such video rows are dropped (lower data.video.max_frames "
                       "or frame_max_tokens, or raise model.max_image_tokens; rows of images alone are unaffected)"))
    if not p.fits:
        out.append("over by %.2f GB per device; settings that lower it (each alone):" % ((p.total - p.device_memory) / GB))
        every = {}
        for name, settings in levers(c) + [("all of these together", every)]:
            every.update(settings)
            q = plan(_with(c, settings))
            flags = " ".join(f"--config.{k}={v}" for k, v in settings.items())
            out.append(f"  {name:<48} total {q.total / GB:8.2f} GB {'fits' if q.fits else '    '}  {flags}")
    return "\n".join(out)


def main(config, workdir=None, topology: str | None = None, search: bool = True):
    """Print the plan; with `topology`, the plan for its devices and XLA's own figures for the run's programs
    compiled for it (`rftjax.aot.report`; `search`: the largest micro-batch that compiles)."""
    if not topology:
        print(report(config))
        return
    from rftjax import aot

    print(report(aot.on_topology(config, topology)))
    print(aot.report(config, topology, search))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/NAME.py)")
    flags.DEFINE_bool("compile", False, "also compile the run's programs ahead of time (rftjax.aot)")
    flags.DEFINE_string("topology", "cpu", "with --compile: cpu, v5e-1, v5e-8, v6e-8, v5p-8 or v4-8")
    flags.DEFINE_bool("search", True, "with --compile: search the largest RL micro-batch that compiles")
    flags.mark_flags_as_required(["config"])
    app.run(lambda argv: main(flags.FLAGS.config, topology=flags.FLAGS.topology if flags.FLAGS.compile else None,
                              search=flags.FLAGS.search))

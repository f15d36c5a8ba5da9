"""Ahead-of-time compilation of a run's programs for a device topology, from any host: what XLA itself says about
per-device memory before any hardware is rented.

    python -m rftjax.plan --config configs/qwen2_5_vl_easyr1.py --config.model.preset=qwen2_5_vl_7b \\
        --config.mesh.fsdp=8 --compile --topology v6e-8

The programs are the run's own jitted functions at the config's shapes (`run_programs`): the sampler (prefill and
the decode loop, `rftjax.sampling._generate`), the RL update (`rftjax.rl_update.make_rl_update`: the old /
reference log-prob passes and the micro-batched updates) and the SFT update when the run has a cold start. Each
is lowered with abstract inputs (`jax.ShapeDtypeStruct` with the run's `NamedSharding`s on a mesh of the
topology's devices) and compiled; `memory_analysis()` gives bytes per device. TPU topologies come from
`jax.experimental.topologies.get_topology_desc` (compile-only devices: `pip install "rftjax[aot]"`, which installs
libtpu; no TPU needed, set `JAX_PLATFORMS=cpu`); `cpu` compiles for this host's devices. A program over a TPU
chip's HBM fails to compile with RESOURCE_EXHAUSTED: `compile_program` reports it as not fitting, with the bytes
XLA asked for. Source of the method: MaxText's `train_compile.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from rftjax import batches, configs, optim, sampling, steps, trainable
from rftjax.build import model_config_of
from rftjax.models import dummy_inputs, model_for
from rftjax.models.family import family_of
from rftjax.rl_update import UpdateSettings, make_rl_update
from rftjax.sharding import batch_sharding, logical_shardings, make_mesh, mesh_shape, shardings_of

GB = 1e9

# name: (topology_name, chip_config_name, chips_per_host_bounds, HBM bytes per device as compiled)
TOPOLOGIES: dict[str, tuple[str, str, tuple[int, int, int], float]] = {
    "v5e-1": ("v5e:1x1", "default", (1, 1, 1), 15.75 * 2 ** 30),
    "v5e-8": ("v5e:2x4", "default", (2, 2, 1), 15.75 * 2 ** 30),
    "v6e-8": ("v6e:2x4", "default", (2, 2, 1), 31.25 * 2 ** 30),
    "v5p-8": ("v5:2x2x1", "megacore", (2, 2, 1), 95.74 * 2 ** 30),
    "v4-8": ("v4:2x2x1", "megacore", (2, 2, 1), 32.0 * 2 ** 30),
}


def on_topology(c: ml_collections.ConfigDict, topology: str) -> ml_collections.ConfigDict:
    """A copy of run config `c` whose planner figures (`plan.num_devices`, `plan.device_memory_gb`) are those of
    `topology` (`TOPOLOGIES`; `cpu`: `c` as it is)."""
    if topology not in TOPOLOGIES:
        return c
    name, _, _, memory = TOPOLOGIES[topology]
    out = c.copy_and_resolve_references()
    out.plan.num_devices = math.prod(int(n) for n in name.split(":")[1].split("x"))  # one device per chip
    out.plan.device_memory_gb = memory / 1e9
    return out


def topology_devices(name: str) -> list:
    """The devices of topology `name` (`TOPOLOGIES` or `cpu`: this host's CPU devices).

    Raises:
      ValueError: an unknown name, or a TPU topology without libtpu (with the install command).
    """
    if name == "cpu":
        return jax.devices("cpu")
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; choose cpu or one of {sorted(TOPOLOGIES)}")
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to share, no lockfile
    topology, chip, bounds, _ = TOPOLOGIES[name]
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip,
                                                 chips_per_host_bounds=bounds, num_slices=1).devices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or too old: say how to get it
        raise ValueError(f"cannot build compile-only {name} devices ({type(e).__name__}: {e}); install the TPU "
                         f"compiler with `pip install \"rftjax[aot]\"` and set JAX_PLATFORMS=cpu") from None


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _rows(mesh, shape, dtype):
    """Rows over the data axes (replicated when they do not divide: a few prompts' media on many devices)."""
    split = shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
    sharding = batch_sharding(mesh, len(shape)) if split else NamedSharding(mesh, PartitionSpec())
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _sequences(c, mc, mesh, rows: int, prompts: int | None) -> batches.SequenceBatch:
    """An abstract `SequenceBatch` of `rows` rows at the config's lengths, with media per prompt (`prompts` items and
    a `prompt_index`) or per row (`prompts=None`)."""
    p, t = c.data.max_prompt_len, c.rl.max_new_tokens if prompts is not None else c.data.max_completion_len
    shapes = family_of(mc).media_shapes
    if shapes is None:
        raise ValueError(f"the {family_of(mc).name} family has no media_shapes: it cannot be compiled ahead of time")
    media = jax.tree.map(lambda x: _rows(mesh, x.shape, x.dtype), shapes(mc, prompts or rows))
    return batches.SequenceBatch(
        pixel_values=media, prompt_ids=_rows(mesh, (rows, p), jnp.int32), prompt_mask=_rows(mesh, (rows, p), bool),
        completion_ids=_rows(mesh, (rows, t), jnp.int32), completion_mask=_rows(mesh, (rows, t), bool),
        prompt_index=None if prompts is None else _rows(mesh, (rows,), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function and the abstract arguments to lower it with."""

    fn: Callable
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)


def run_programs(c: ml_collections.ConfigDict, devices: list) -> dict[str, Program]:
    """The run's programs (`sampler`, `rl_update`, and `sft_update` with a cold start) for config `c` on `devices`
    (the config's mesh over them), with abstract, sharded arguments. Nothing is allocated.

    Raises:
      ValueError: a mesh that does not fit the device count, a family without `media_shapes`.
    """
    mc, algo = model_config_of(c), configs.algorithm(c)
    sizes = mesh_shape(len(devices), c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    mesh = make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)
    replicated = NamedSharding(mesh, PartitionSpec())
    boxed = jax.eval_shape(lambda: model_for(mc).init(jax.random.key(0), *dummy_inputs(mc))["params"])
    params = _abstract(nn.unbox(boxed), logical_shardings(boxed, mesh))
    train, frozen = trainable.split(params, trainable.trainable_paths(params, mc, c.optim.freeze))
    o = c.optim
    tx = optim.make_optimizer(1e-6, c.rl.weight_decay, o.b1, o.b2, o.grad_clip, o.grad_accum)

    def train_state(p):
        create = functools.partial(optim.TrainState.create, tx=tx)
        abstract = jax.eval_shape(create, p)
        return _abstract(abstract, optim.state_shardings(abstract, shardings_of(p), mesh))

    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    prompts = (configs.schedule(c)["gen_prompts_per_round"] or c.rl.prompts_per_step)
    sampled = sampling.SamplingParams(group_size=algo.group_size, max_new_tokens=c.rl.max_new_tokens,
                                      temperature=float(c.rl.temperature), eos_ids=(0,), suppress_ids=(),
                                      compact=False)
    out = {"sampler": Program(sampling._generate, (params, _sequences(c, mc, mesh, prompts, prompts).pixel_values,
                                                _rows(mesh, (prompts, c.data.max_prompt_len), jnp.int32),
                                                _rows(mesh, (prompts, c.data.max_prompt_len), bool), key),
                              dict(config=mc, params=sampled))}
    policy = train_state(train)
    critic = train_state(steps.init_critic(train, mc)) if algo.uses_critic else None
    update = make_rl_update(UpdateSettings.of(c, mc, algo), shardings_of(policy), shardings_of(critic))
    n = c.rl.prompts_per_step * algo.group_size
    batch = batches.RolloutBatch(seq=_sequences(c, mc, mesh, n, c.rl.prompts_per_step),
                               rewards=_rows(mesh, (n,), jnp.float32),
                               sampler_logprobs=_rows(mesh, (n, c.rl.max_new_tokens), jnp.float32))
    out["rl_update"] = Program(update, (policy, critic, train if algo.uses_reference else None, frozen, batch, key))
    if c.sft.enabled:
        sft = optim.make_update(functools.partial(steps.sft_loss, config=mc), shardings_of(policy), c.seed)
        out["sft_update"] = Program(sft, (policy, _sequences(c, mc, mesh, c.sft.batch_size, None), frozen))
    return out


def combine_params(program: Program):
    """The full abstract params (trainable and frozen combined) of an `rl_update` `Program`."""
    policy, frozen = program.args[0], program.args[3]
    return trainable.combine(policy.params, frozen)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One program's per-device bytes as XLA compiled it (or the bytes it asked for when it did not fit).

    Attributes:
      arguments, outputs, aliased, temp: `memory_analysis()` figures (bytes per device); total = arguments +
        outputs - aliased + temp. fits: it compiled; error: XLA's message when it did not.
      flops: `cost_analysis()` FLOPs per device (0 when unknown).
    """

    arguments: float = 0.0
    outputs: float = 0.0
    aliased: float = 0.0
    temp: float = 0.0
    fits: bool = True
    error: str = ""
    flops: float = 0.0

    @property
    def total(self) -> float:
        return self.arguments + self.outputs - self.aliased + self.temp


def compile_program(program: Program) -> Compiled:
    """Lower and compile `program`; its `Compiled` figures. A RESOURCE_EXHAUSTED compile error (a TPU program over
    HBM) is a `Compiled(fits=False)` with the required bytes as its temp figure; other errors are raised."""
    try:
        compiled = program.fn.lower(*program.args, **program.kwargs).compile()
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError is not importable under one name across jax versions
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        found = re.search(r"total memory required[^\d]*([\d.]+)([GMK])", text)
        need = float(found.group(1)) * {"G": 2 ** 30, "M": 2 ** 20, "K": 2 ** 10}[found.group(2)] if found else 0.0
        return Compiled(temp=need, fits=False, error=text.splitlines()[0][:300])
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Compiled(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                    aliased=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
                    flops=float((cost or {}).get("flops", 0.0)))


def largest_micro_batch(c: ml_collections.ConfigDict, devices: list, memory: float,
                        candidates: tuple[int, ...] | None = None) -> tuple[int, dict[int, Any]]:
    """The largest rows per device per micro-batch among `candidates` (default: every divisor of the minibatch's
    rows per device) whose RL update compiles within `memory` bytes per device; returns it (0 when none does) and
    `{rows per device: Compiled}` of those tried.

    XLA's bytes are not monotonic in the micro-batch (its schedule changes with the shapes: Qwen2.5-VL-7B's update
    on v6e-8 takes 23.8 GB at 1 row per device, 27.8 at 2 and 25.2 at 10; 3B's on v5e-8 18.9 GB at 2 rows and 17.6
    at 5), so a size over `memory` says nothing about the larger ones: the candidates are tried from the largest
    down and the first that fits is the answer.
    """
    algo = configs.algorithm(c)
    n_data = len(devices) // (c.mesh.tensor or 1)
    per_device = (c.rl.minibatch_size or c.rl.prompts_per_step * algo.group_size) // n_data
    divisors = [r for r in range(1, per_device + 1) if per_device % r == 0]
    tried = {}
    for r in sorted(divisors if candidates is None else set(candidates) & set(divisors), reverse=True):
        trial = ml_collections.ConfigDict(c.to_dict())
        trial.rl.micro_batch_size = r * n_data
        tried[r] = compile_program(run_programs(trial, devices)["rl_update"])
        if tried[r].fits and tried[r].total <= memory:
            return r, tried
    return 0, tried


def report(c: ml_collections.ConfigDict, topology: str, search: bool = True) -> str:
    """XLA's per-device bytes of each of the run's programs on `topology`, beside the analytic planner's total; with
    `search`, the largest micro-batch (rows per device) whose RL update compiles."""
    from rftjax import plan

    devices = topology_devices(topology)
    memory = TOPOLOGIES[topology][3] if topology in TOPOLOGIES else plan._local_memory()
    planned = plan.plan(on_topology(c, topology)).total
    lines = [f"{topology}: {len(devices)} devices, {memory / GB:.2f} GB each; the planner's total {planned / GB:.2f} GB"
             f" per device", f"{'program':<12}{'args GB':>9}{'out GB':>9}{'alias GB':>10}{'temp GB':>9}{'total GB':>10}"
             f"{'TFLOP':>9}  fits"]
    for name, program in run_programs(c, devices).items():
        r = compile_program(program)
        lines.append(f"{name:<12}{r.arguments / GB:>9.2f}{r.outputs / GB:>9.2f}{r.aliased / GB:>10.2f}"
                     f"{r.temp / GB:>9.2f}{r.total / GB:>10.2f}{r.flops / 1e12:>9.1f}  "
                     f"{'yes' if r.fits and r.total <= memory else 'NO ' + r.error}")
    if search:
        best, tried = largest_micro_batch(c, devices, memory)
        figures = ", ".join(f"{k}: {v.total / GB:.2f} GB{'' if v.fits else ' (over)'}" for k, v in tried.items())
        lines.append(f"largest RL micro-batch that compiles within memory: {best} rows per device ({figures})")
    return "\n".join(lines)

"""Device mesh, logical axis rules, and shardings of params and batches.

The mesh has three axes, the MaxText/big_vision convention:
  - `data`: pure data parallelism (params replicated);
  - `fsdp`: data parallelism with params, gradients and optimizer state sharded (ZeRO-3);
  - `tensor`: Megatron-style tensor parallelism of heads and MLP width.
Params carry logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`, ...)
from `nn.with_logical_partitioning`; `LOGICAL_RULES` maps them to mesh axes. A mesh axis that does not
divide a dimension is dropped for that dimension (the dimension is replicated instead of failing), so e.g.
2 kv heads on a tensor axis of 4 still works.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("patches", None),
    ("length", None),
)


def mesh_shape(num_devices: int, data: int = 1, fsdp: int = 1, tensor: int = 1) -> dict[str, int]:
    """`{data, fsdp, tensor}` sizes of a mesh over `num_devices` devices. One size may be -1: it takes all remaining
    devices (no device needs to exist: the memory planner lays out meshes of other machines).

    Raises:
      ValueError: the sizes do not multiply to `num_devices` (says how many there are).
    """
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        if num_devices % rest:
            raise ValueError(f"{num_devices} devices cannot be split into mesh axes {sizes}")
        sizes[sizes.index(-1)] = num_devices // rest
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                         f"{int(np.prod(sizes))} devices but {num_devices} are available; set the sizes so "
                         f"their product is {num_devices} (one of them may be -1)")
    return dict(zip(MESH_AXES, sizes))


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh. One size may be -1: it takes all remaining devices.

    Raises:
      ValueError: the sizes do not multiply to the number of devices (says how many there are).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(len(devices), data, fsdp, tensor)
    return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], axis_sizes) -> PartitionSpec:
    """`spec` for an array of `shape` without the mesh axes that do not divide their dimension (`axis_sizes`:
    `{axis name: size}`, e.g. `mesh.shape`)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        kept, size = [], 1
        for a in axes_t:
            if dim % (size * axis_sizes[a]) == 0:
                kept.append(a)
                size *= axis_sizes[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def logical_specs(boxed_tree, axis_sizes, rules=LOGICAL_RULES):
    """The `PartitionSpec` of every leaf of a pytree of `nn.Partitioned` boxes (or their abstract shapes), from
    their logical axis names, with the mesh axes that do not divide a dimension dropped (`fit_spec`; `axis_sizes`:
    `{axis name: size}`, e.g. `mesh.shape`); unboxed leaves get `PartitionSpec()` (replicated)."""
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), rules)
    return jax.tree.map(lambda spec, x: fit_spec(spec, tuple(x.shape), axis_sizes), mesh_specs,
                        nn.unbox(boxed_tree), is_leaf=lambda x: isinstance(x, PartitionSpec))


def logical_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a pytree of `nn.Partitioned` boxes (or their `jax.ShapeDtypeStruct` shapes from
    `jax.eval_shape(model.init, ...)`), from their logical axis names (`logical_specs`); unboxed leaves are
    replicated."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), logical_specs(boxed_tree, mesh.shape, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(model: nn.Module, *init_args, mesh: Mesh, rules=LOGICAL_RULES):
    """The `NamedSharding` of every param of `model` (a pytree like its unboxed params), from the logical axes
    of an abstract `model.init(key, *init_args)` (`jax.eval_shape`: nothing is allocated)."""
    return logical_shardings(jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args)["params"]), mesh, rules)


def init_sharded_params(model: nn.Module, rng: jax.Array, *init_args, mesh: Mesh, rules=LOGICAL_RULES):
    """`model.init(rng, *init_args)['params']`, unboxed, with every leaf created directly in its sharding
    (nothing is materialised on one device first). Returns `(params, shardings)`."""
    shardings = param_shardings(model, *init_args, mesh=mesh, rules=rules)
    params = jax.jit(lambda: nn.unbox(model.init(rng, *init_args)["params"]), out_shardings=shardings)()
    return params, shardings


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array `[B, ...]`: B over the `data` and `fsdp` axes, other dims replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))

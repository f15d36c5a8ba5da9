"""Device mesh, logical axis rules, and shardings of params and batches.

The mesh has three axes, the MaxText/big_vision convention:
  - `data`: pure data parallelism (params replicated);
  - `fsdp`: data parallelism with params, gradients and optimizer state sharded (ZeRO-3);
  - `tensor`: Megatron-style tensor parallelism of heads and MLP width.
Params carry logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`, ...)
from `nn.with_logical_partitioning`; `LOGICAL_RULES` maps them to mesh axes. A mesh axis that does not
divide a dimension is dropped for that dimension (the dimension is replicated instead of failing), so e.g.
2 kv heads on a tensor axis of 4 still works.

Several processes (a TPU pod: one per host) run the same program on one mesh over all their devices
(`initialize_distributed`); each reads its own rows of every batch, and `Placement` moves them between the
hosts and the global arrays.
"""

from __future__ import annotations

import dataclasses
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


def shardings_of(tree):
    """The `.sharding` of every array (or `jax.ShapeDtypeStruct`) of `tree`; None for None."""
    return None if tree is None else jax.tree.map(lambda x: x.sharding, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array `[B, ...]`: B over the `data` and `fsdp` axes, other dims replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """`jax.distributed.initialize`, before any other JAX call: one process per host joins the mesh over all hosts'
    devices. Unset arguments ("", 0, -1) are detected from the environment (Cloud TPU VMs, SLURM, Open MPI;
    `JAX_COORDINATOR_ADDRESS`); set all three for processes that share one machine (tests: a coordinator on
    127.0.0.1). CPU collectives use gloo, so the same program runs across local CPU processes.

    Raises:
      ValueError / RuntimeError from JAX: no cluster detected and no coordinator given, or the coordinator
        cannot be reached within JAX's timeout.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU client uses it
    kwargs = {"coordinator_address": coordinator_address or None, "num_processes": num_processes or None,
              "process_id": None if process_id < 0 else process_id}
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})


def process_block(n: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """The rows `[p * n / P, (p + 1) * n / P)` of a batch of `n` rows that process p holds.

    Raises:
      ValueError: `n` does not split evenly over the processes.
    """
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if n % count:
        raise ValueError(f"a batch of {n} rows does not split over {count} processes")
    return slice(p * n // count, (p + 1) * n // count)


def process_share(batch_size: int) -> dict:
    """`make_dataset` arguments for this process's block of global batches of `batch_size` rows: the per-process
    `batch_size` and the `shard` `(process_index, process_count)` (`rftjax.data.pipeline.make_dataset`). The config
    checks make global batch sizes multiples of the data-parallel devices, hence of the processes."""
    return {"batch_size": batch_size // jax.process_count(), "shard": (jax.process_index(), jax.process_count())}


@dataclasses.dataclass(frozen=True)
class Placement:
    """Moves batches between the hosts and global arrays on `mesh` (None: no devices, everything stays numpy).

    Every process holds a contiguous block of each batch's rows (`process_block`), the same rows whatever the
    number of processes: with the pipeline's block sharding (`rftjax.data.pipeline.make_dataset`) a run over P
    processes sees the global batches of a one-process run, in the same order.
    """

    mesh: Mesh | None = None

    def put(self, tree):
        """This process's rows (numpy `[b, ...]`) -> global arrays `[P * b, ...]` sharded over the mesh's data
        axes, in one transfer. With several processes, arrays whose trailing dims differ between processes
        (Qwen-VL patch buckets) are zero-padded to the largest first (padding past an image's grid is ignored)."""
        tree = jax.tree.map(np.asarray, tree)
        if self.mesh is None:
            return tree
        specs = jax.tree.map(lambda x: batch_sharding(self.mesh, x.ndim), tree)
        if jax.process_count() == 1:
            return jax.device_put(tree, specs)
        from jax.experimental import multihost_utils

        return multihost_utils.host_local_array_to_global_array(_pad_to_common_shapes(tree), self.mesh, jax.tree.map(
            lambda s: s.spec, specs))

    def gather(self, tree):
        """Every process's rows (numpy `[b, ...]`) -> the whole batch `[P * b, ...]` in process order, on every
        process (identity with one process)."""
        tree = jax.tree.map(np.asarray, tree)
        if jax.process_count() == 1:
            return tree
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

    def local(self, tree):
        """Global batch arrays `[N, ...]` -> this process's rows, numpy `[N / P, ...]` (all of them with one
        process)."""
        if jax.process_count() == 1:
            return jax.tree.map(np.asarray, tree)
        from jax.experimental import multihost_utils

        whole = multihost_utils.process_allgather(tree, tiled=True)
        return jax.tree.map(lambda x: np.asarray(x)[process_block(x.shape[0])], whole)

    def agree(self, flags: Sequence[bool]) -> np.ndarray:
        """`flags` of process 0, the same on every process (decisions that stop loops must agree, or the
        processes would wait for each other in different collectives)."""
        flags = np.asarray(flags, bool)
        if jax.process_count() == 1:
            return flags
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(flags), bool)


HOST = Placement()
"""No devices: host arrays in, numpy out (tests and helpers that call jitted functions on numpy)."""


def _pad_to_common_shapes(tree):
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    shapes = np.asarray(multihost_utils.process_allgather(
        np.asarray([d for x in leaves for d in x.shape], np.int64)))  # [processes, sum of ndims]
    largest, out, i = shapes.max(0), [], 0
    for x in leaves:
        target = largest[i:i + x.ndim]
        i += x.ndim
        out.append(np.pad(x, [(0, 0)] + [(0, int(t) - d) for t, d in zip(target[1:], x.shape[1:])]))
    return jax.tree.unflatten(treedef, out)

"""The optimizer and the gradient step: `TrainState`, the learning-rate schedule, AdamW with per-module learning-rate
scales and non-finite skipping (optax), `apply_gradients` (micro-batches' gradients summed) and `make_update`, the
jitted update `update(state, batch) -> (state, metrics)` that XLA compiles once per shape.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from rftjax.batches import MicroBatching, UpdateBatch
from rftjax.models.common import mesh_of, rows_over
from rftjax.trainable import combine

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """`step` (int32 [], optimizer updates applied), `params` (the trainable params: all of them, or the
    `rftjax.trainable.split` part that trains), `opt_state` (of those only); `tx` is static."""

    step: Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "cosine", start_step: int = 0):
    """Linear warm-up to `lr`, then cosine decay to `0.1 * lr` at `total_steps` (or constant): an optax schedule,
    update count -> learning rate. `start_step` > 0 continues such a schedule from that step (count 0 gets its
    value at `start_step`): the SFT control's `rl.control_schedule=continue`."""
    if start_step:
        schedule = make_schedule(lr, total_steps, warmup_steps, decay)
        return lambda count: schedule(count + start_step)
    if decay == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
                                    [max(warmup_steps, 1)]) if warmup_steps else optax.constant_schedule(lr)
    if decay != "cosine":
        raise ValueError(f"unknown lr decay {decay!r}; choose cosine or constant")
    return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else lr, lr, warmup_steps,
                                              max(total_steps, warmup_steps + 1), end_value=0.1 * lr)


def _decay_mask(params):
    """Weight decay on matrices and embedding tables (leaves of rank >= 2), not on norms and biases."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def _lr_scale(scales: dict[str, float]) -> optax.GradientTransformation:
    """Multiply the updates of the params under each top-level module in `scales` by its factor
    (`{"vision_tower": 0.1}`); other params are untouched. A factor of 0 freezes the module."""
    scales = {k: float(v) for k, v in scales.items() if float(v) != 1.0}
    if not scales:
        return optax.identity()

    def label(params):
        missing = sorted(set(scales) - set(params))
        if missing:
            raise ValueError(f"lr scales for {missing}: no such top-level modules (have {sorted(params)})")
        return {k: jax.tree.map(lambda _, k=k: k if k in scales else "rest", v) for k, v in params.items()}

    transforms = {k: optax.scale(v) for k, v in scales.items()}
    return optax.multi_transform({**transforms, "rest": optax.identity()}, label)


def make_optimizer(schedule, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   grad_clip: float = 1.0, grad_accum: int = 1,
                   lr_scales: dict[str, float] | None = None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; updates whose gradients are not finite are skipped and counted
    (`optax.apply_if_finite`, see `skipped_updates`); `grad_accum > 1` averages that many micro-batches per
    update (`optax.MultiSteps`). `lr_scales` multiplies the learning rate (and decay) of top-level modules,
    e.g. `{"vision_tower": 0.1}` for the lower ViT learning rate of Qwen2-VL / LLaVA-OneVision training;
    unknown module names raise ValueError when the optimizer is initialised."""
    tx = optax.chain(optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity(),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=_decay_mask),
                     _lr_scale(lr_scales or {}))
    tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
    return optax.MultiSteps(tx, every_k_schedule=grad_accum) if grad_accum > 1 else tx


def state_shardings(abstract: TrainState, param_shardings, mesh) -> TrainState:
    """The shardings of a `TrainState` whose params have `param_shardings`: every optimizer-state leaf that mirrors a
    param (Adam's moments, a gradient accumulator: a leaf whose key path ends with the param's path and has its
    shape) sharded like that param, everything else (counters) replicated. Without it, XLA may lay the freshly
    created moments out replicated, and FSDP would shard the params but not the optimizer state."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    keys = lambda path: tuple(getattr(k, "key", None) for k in path)  # noqa: E731 - dict keys; None otherwise
    params = {keys(p): (x.shape, sh) for (p, x), sh in zip(jax.tree_util.tree_flatten_with_path(abstract.params)[0],
                                                           jax.tree.leaves(param_shardings))}

    def sharding_of(path, x):
        k = keys(path)
        for i in range(len(k)):
            shape, sh = params.get(k[i:], (None, None))
            if shape == x.shape:
                return sh
        return replicated

    opt = jax.tree_util.tree_map_with_path(sharding_of, abstract.opt_state)
    return abstract.replace(step=replicated, params=param_shardings, opt_state=opt)


def skipped_updates(opt_state) -> Array:
    """How many updates `apply_if_finite` skipped for non-finite gradients (int32 [])."""
    found = [s.total_notfinite for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
        s, optax.ApplyIfFiniteState)) if isinstance(s, optax.ApplyIfFiniteState)]
    return found[0] if found else jnp.zeros((), jnp.int32)


def _completion_mask(batch) -> Array:
    return (batch.seq if isinstance(batch, UpdateBatch) else batch).completion_mask


def merge_micro_metrics(metrics: dict[str, Array], tokens: Array) -> dict[str, Array]:
    """One update's metrics from its micro-batches' (each `[K]`, K micro-batches with `tokens` `[K]` completion
    tokens): `*_max` the max, `*_min` the min, `tokens` and `*_loss`/`loss` terms (already over the whole batch's
    denominator) the sum, every other metric the token-weighted mean (exact for the masked means over tokens;
    for per-sequence statistics such as `adv_std` the micro-batches' mean)."""
    w = tokens / jnp.maximum(tokens.sum(), 1.0)

    def merge(key, x):
        if key.endswith("_max"):
            return x.max()
        if key.endswith("_min"):
            return x.min()
        if key == "tokens" or key == "loss" or key.endswith("_loss"):
            return x.sum()
        return (x * w).sum()

    return {k: merge(k, v) for k, v in metrics.items()}


def apply_gradients(loss_fn: Callable[..., tuple[Array, dict]], state: TrainState, batch, frozen: dict | None = None,
                    key: Array | None = None, micro: MicroBatching = MicroBatching()) -> tuple[TrainState, dict]:
    """One optimizer update (pure): gradients of `loss_fn(params, batch, rng=...) -> (loss, metrics)` with respect
    to the trainable `state.params` only (`params` = them combined with `frozen`, which gets no gradient), the
    optimizer step, and the metrics plus `loss`, `grad_norm` and `skipped_updates` (float32 / int32 scalars).
    `rng` is `fold_in(key, state.step)` (None without a key): the training forward pass's dropout.

    `micro` with K > 1 micro-batches (dividing the batch's N rows: `MicroBatching`) runs them one after the other
    (a `lax.scan`: one micro-batch's activations live at a time) and sums their gradients; each is called as
    `loss_fn(params, part, rng=..., whole_mask=[N, T] completion mask of the batch)` so that its loss uses the
    whole batch's denominator and the sum is the batch's loss (verl's micro-batches with a global token count).
    Metrics: `merge_micro_metrics`.
    """
    rng = None if key is None else jax.random.fold_in(key, state.step)

    def grads_of(part, rng, whole_mask=None):
        def loss_of(trainable):
            kw = {} if whole_mask is None else {"whole_mask": whole_mask}
            return loss_fn(combine(trainable, frozen or {}), part, rng=rng, **kw)

        return jax.value_and_grad(loss_of, has_aux=True)(state.params)

    if micro.count == 1:
        (loss, metrics), grads = grads_of(batch, rng)
    else:
        whole_mask = _completion_mask(batch)

        def one(acc, i):
            part = micro.part(batch, i, whole_mask.shape[0])
            (loss, metrics), grads = grads_of(part, None if rng is None else jax.random.fold_in(rng, i), whole_mask)
            return jax.tree.map(jnp.add, acc, grads), (metrics, loss, _completion_mask(part).sum())

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (metrics, losses, tokens) = jax.lax.scan(one, zeros, jnp.arange(micro.count))
        loss, metrics = losses.sum(), merge_micro_metrics(metrics, tokens.astype(jnp.float32))
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "skipped_updates": skipped_updates(opt_state)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_update(loss_fn: Callable[..., tuple[Array, dict]], state_shardings=None, seed: int = 0):
    """`update(state, batch, frozen={}) -> (state, metrics)`: `apply_gradients` jitted with the state donated
    (`frozen`: the params that do not train, not donated); `state_shardings` pins the output state's layout to the
    input's (params/opt-state sharded by logical axes) and lays the activations' rows over its mesh's data axes
    (`rows_over`, as the RL update does); dropout keys come from `seed` and the update step."""
    out = None if state_shardings is None else (state_shardings, None)
    mesh = mesh_of(state_shardings)

    def update(state: TrainState, batch, frozen: dict | None = None):
        with rows_over(mesh):
            return apply_gradients(loss_fn, state, batch, frozen, key=jax.random.key(seed))

    return jax.jit(update, donate_argnums=0, out_shardings=out)

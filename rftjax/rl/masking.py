"""Masked reductions and input checks shared by the advantage estimators, the losses and the update step.

Masks are `[N, T]` bool or 0/1 (True on real completion tokens, right padding); every reduction is over the
masked entries only and never NaN on an empty mask. Checks raise a ValueError that names the offending input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def is_concrete(*xs) -> bool:
    """True when none of `xs` is a tracer (value checks can run: on the host or outside `jit`)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    """Mean of x over mask, float32 (0 where the mask is empty, never NaN). `axis=None`: over everything."""
    m = mask.astype(jnp.float32)
    return (x * m).sum(axis) / jnp.maximum(m.sum(axis), 1.0)


def masked_min_mean_max(x: Array, mask: Array, empty: float = 0.0) -> tuple[Array, Array, Array]:
    """`(min, mean, max)` of x over mask (same shape or broadcastable), float32 scalars; `empty` for the min and max
    of an empty mask (the mean is then 0), never NaN."""
    mb = mask.astype(bool)
    any_ = mb.any()
    mn = jnp.where(any_, jnp.min(jnp.where(mb, x, jnp.inf)), empty)
    mx = jnp.where(any_, jnp.max(jnp.where(mb, x, -jnp.inf)), empty)
    return mn, masked_mean(x, mask), mx


def masked_whiten(x: Array, mask: Array, eps: float = 1e-8) -> Array:
    """`(x - mean) / sqrt(var + eps)` over the masked entries, var Bessel-corrected (verl's `masked_whiten`).

    Masked entries of the result are 0.
    """
    m = mask.astype(jnp.float32)
    n = m.sum()
    mean = (x * m).sum() / jnp.maximum(n, 1.0)
    var = (jnp.square(x - mean) * m).sum() / jnp.maximum(n - 1.0, 1.0)
    return (x - mean) * jax.lax.rsqrt(var + eps) * m


def check_like_mask(mask: Array, **arrays) -> None:
    """Raise a ValueError naming each of `arrays` (None skipped) whose shape is not the mask's `[N, T]`."""
    for name, x in arrays.items():
        if x is not None and x.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but completion_mask has {tuple(mask.shape)}: "
                             f"all per-token inputs must be [N, T]")


def check_rewards(rewards, group_size: int | None = None, min_group: int = 1) -> None:
    """Raise a ValueError for rewards that are not a finite `[N]` vector split into groups of `group_size`
    (of at least `min_group` samples). The finiteness check runs only on concrete arrays (not under `jit`)."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [N] (one scalar per completion), got shape {tuple(rewards.shape)}")
    if group_size is not None:
        if group_size < min_group:
            raise ValueError(f"group_size={group_size} but this estimator needs at least {min_group} samples per "
                             f"prompt (set group_size >= {min_group})")
        if rewards.shape[0] % group_size:
            raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of group_size={group_size}")
    if is_concrete(rewards) and not np.all(np.isfinite(np.asarray(rewards))):
        bad = np.nonzero(~np.isfinite(np.asarray(rewards)))[0]
        raise ValueError(f"non-finite rewards at rows {bad[:10].tolist()}: a reward function returned NaN/inf")

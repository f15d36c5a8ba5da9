"""DAPO's data-side helpers: dynamic sampling and overlong reward shaping.

Source: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", Sec. 3.2
(dynamic sampling, Eq. 11's constraint `0 < |{o_i correct}| < G`) and Sec. 3.4 (soft overlong
punishment, Eq. 13). These run on the host on numpy arrays (or jnp; both work).
"""

from __future__ import annotations

import numpy as np


def groups_with_signal(rewards, group_size: int) -> np.ndarray:
    """bool `[B]`: True for groups whose G rewards are not all equal (a group of equal rewards has zero
    advantage under every group estimator and only dilutes the batch).

    Raises:
      ValueError: group_size does not divide N, or non-finite rewards.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
        raise ValueError(f"{r.shape} rewards do not split into groups of group_size={group_size}")
    if not np.all(np.isfinite(r)):
        raise ValueError("non-finite rewards: a reward function returned NaN/inf")
    g = r.reshape(-1, group_size)
    return g.max(1) > g.min(1)


def dynamic_sampling_rows(rewards, group_size: int) -> np.ndarray:
    """bool `[N]`: the rows of the groups kept by `groups_with_signal` (for indexing a rollout batch)."""
    return np.repeat(groups_with_signal(rewards, group_size), group_size)


def overlong_penalty(lengths, max_len: int, buffer_len: int) -> np.ndarray:
    """Soft overlong punishment (DAPO Eq. 13), float `[N]`, added to the task reward.

    `0` for `|y| <= L_max - L_cache`; `((L_max - L_cache) - |y|) / L_cache` in the buffer
    `(L_max - L_cache, L_max]` (linear from 0 to -1); `-1` beyond `L_max`. `buffer_len = 0` disables it.

    Raises:
      ValueError: buffer_len not in [0, max_len].
    """
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"overlong buffer_len={buffer_len} must be in [0, max_len={max_len}]")
    y = np.asarray(lengths, dtype=np.float64)
    if buffer_len == 0:
        return np.zeros_like(y)
    start = max_len - buffer_len
    return np.where(y <= start, 0.0, np.where(y <= max_len, (start - y) / buffer_len, -1.0))

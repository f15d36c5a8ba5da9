"""DAPO's dynamic sampling: which groups of a rollout batch carry a learning signal.

Source: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", Sec. 3.2
(dynamic sampling, Eq. 11's constraint `0 < |{o_i correct}| < G`). Runs on the host on numpy arrays (or jnp;
both work). DAPO's soft overlong punishment (Sec. 3.4) is a reward: `rftjax.rewards.overlong_penalty`.
"""

from __future__ import annotations

import numpy as np

from rftjax.rl.masking import check_rewards


def groups_with_signal(rewards, group_size: int) -> np.ndarray:
    """bool `[B]`: True for groups whose G rewards are not all equal (a group of equal rewards has zero
    advantage under every group estimator and only dilutes the batch).

    Raises:
      ValueError: rewards not `[N]`, group_size does not divide N, or non-finite rewards (`check_rewards`).
    """
    r = np.asarray(rewards, dtype=np.float64)
    check_rewards(r, group_size)
    g = r.reshape(-1, group_size)
    return g.max(1) > g.min(1)


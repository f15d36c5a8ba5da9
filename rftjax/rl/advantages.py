"""Advantage estimators for critic-free (group) and critic-based RL fine-tuning.

Conventions: `N = B * G` completions, rows `b*G .. b*G+G-1` are the G samples of prompt b (the sampler's
order). Outcome rewards are `[N]` float; token-level arrays are `[N, T]` with `completion_mask` `[N, T]`
(bool or 0/1, right padding). Every function is pure jnp and jit-able (`group_size` static).

Bad input raises a ValueError when the arrays are concrete (host-side rewards always are): a
`group_size` that does not divide N, group_size < 2 where a group statistic is needed, non-finite rewards,
mismatched shapes. Inside `jit` those checks cannot run; validate on the host first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rftjax.rl.kl import kl_penalised_rewards
from rftjax.rl.masking import check_like_mask, check_rewards, is_concrete, masked_whiten

Array = jax.Array


def _groups(rewards: Array, group_size: int) -> Array:
    return rewards.astype(jnp.float32).reshape(-1, group_size)


def grpo(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """GRPO outcome advantages `[N]`: `(r_i - mean_g r) / (std_g r + eps)`, std Bessel-corrected.

    Source: Shao et al. 2024 (DeepSeekMath), Sec. 4.1.2; verl `compute_grpo_outcome_advantage` (eps 1e-6);
    TRL uses eps 1e-4. A group whose rewards are all equal gets advantage 0.
    """
    if is_concrete(rewards):
        check_rewards(rewards, group_size, min_group=2)
    g = _groups(rewards, group_size)
    adv = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1)


def dr_grpo(rewards: Array, group_size: int) -> Array:
    """Dr.GRPO outcome advantages `[N]`: `r_i - mean_g r` (no std normalisation).

    Source: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", Sec. 3.2.
    """
    if is_concrete(rewards):
        check_rewards(rewards, group_size, min_group=2)
    g = _groups(rewards, group_size)
    return (g - g.mean(1, keepdims=True)).reshape(-1)


def rloo(rewards: Array, group_size: int) -> Array:
    """RLOO advantages `[N]`: `r_i - mean_{j != i} r_j` (= `G/(G-1) * (r_i - mean_g r)`).

    Source: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization", Eq. 7;
    Kool et al. 2019. verl `compute_rloo_outcome_advantage`.
    """
    if is_concrete(rewards):
        check_rewards(rewards, group_size, min_group=2)
    g = _groups(rewards, group_size)
    others = (g.sum(1, keepdims=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def outcome_token_rewards(rewards: Array, completion_mask: Array) -> Array:
    """`[N, T]` token rewards with each outcome reward on the completion's last real token (0 elsewhere)."""
    m = completion_mask.astype(jnp.int32)
    last = jnp.maximum(m.sum(1) - 1, 0)
    onehot = jax.nn.one_hot(last, m.shape[1], dtype=jnp.float32) * (m.sum(1, keepdims=True) > 0)
    return onehot * rewards.astype(jnp.float32)[:, None]


def discounted_returns(token_rewards: Array, completion_mask: Array, gamma: float = 1.0) -> Array:
    """`G_t = r_t + gamma * G_{t+1}` within each completion (reverse `lax.scan`), `[N, T]`, 0 where masked."""
    m = completion_mask.astype(jnp.float32)

    def step(carry, xs):
        r, mt = xs
        g = r + gamma * carry
        return g * mt, g * mt

    _, out = jax.lax.scan(step, jnp.zeros(token_rewards.shape[0], jnp.float32),
                          (token_rewards.astype(jnp.float32).T, m.T), reverse=True)
    return out.T


def reinforce_pp(token_rewards: Array, completion_mask: Array, gamma: float = 1.0) -> tuple[Array, Array]:
    """REINFORCE++ advantages: discounted returns of the (KL-penalised) token rewards, whitened over the
    whole batch. Returns `(advantages, returns)`, both `[N, T]`.

    Source: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs", Sec. 3 (token-level
    KL penalty folded into the reward: see `rftjax.rl.losses.kl_penalised_rewards`; global advantage
    normalisation); verl `compute_reinforce_plus_plus_outcome_advantage`.
    """
    check_like_mask(completion_mask, token_rewards=token_rewards)
    returns = discounted_returns(token_rewards, completion_mask, gamma)
    return masked_whiten(returns, completion_mask), returns


def reinforce_pp_baseline(rewards: Array, completion_mask: Array, group_size: int) -> Array:
    """REINFORCE++-baseline advantages `[N, T]`: group-mean-centred outcome reward on every token, then
    whitened over the batch. Source: Hu 2025 (REINFORCE++-baseline); verl
    `compute_reinforce_plus_plus_baseline_outcome_advantage`."""
    if is_concrete(rewards):
        check_rewards(rewards, group_size, min_group=2)
    centred = dr_grpo(rewards, group_size)
    m = completion_mask.astype(jnp.float32)
    return masked_whiten(centred[:, None] * m, completion_mask)


def gae(token_rewards: Array, values: Array, completion_mask: Array, gamma: float = 1.0, lam: float = 1.0,
        whiten: bool = True) -> tuple[Array, Array]:
    """Generalised advantage estimation with a value model. Returns `(advantages, returns)`, `[N, T]`.

    `delta_t = r_t + gamma * V_{t+1} - V_t`, `A_t = delta_t + gamma * lam * A_{t+1}` (reverse `lax.scan`),
    `returns = A + V` (before whitening). Masked positions are skipped: they neither bootstrap nor carry
    (verl's `compute_gae_advantage_return`). Source: Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", Eq. 16.
    """
    check_like_mask(completion_mask, token_rewards=token_rewards, values=values)
    m = completion_mask.astype(jnp.float32)

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, mt = xs
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        next_value = v * mt + (1 - mt) * next_value
        next_adv = adv * mt + (1 - mt) * next_adv
        return (next_value, next_adv), next_adv

    n = token_rewards.shape[0]
    init = (jnp.zeros(n, jnp.float32), jnp.zeros(n, jnp.float32))
    _, adv = jax.lax.scan(step, init, (token_rewards.astype(jnp.float32).T, values.astype(jnp.float32).T, m.T),
                          reverse=True)
    adv = adv.T
    returns = adv + values.astype(jnp.float32)
    if whiten:
        adv = masked_whiten(adv, completion_mask)
    return adv * m, returns * m


def compute_advantages(config, rewards: Array, completion_mask: Array, old_logprobs: Array | None = None,
                       ref_logprobs: Array | None = None, values: Array | None = None) -> tuple[Array, Array | None]:
    """Advantages by `config.advantage_estimator` (an `AlgorithmConfig`): the one switch the trainer calls.

    Args:
      config: the algorithm.
      rewards: `[N]` outcome rewards (one scalar per completion).
      completion_mask: `[N, T]`.
      old_logprobs, ref_logprobs: `[N, T]`, needed when `config.kl_in_reward` (the penalty is computed with
        the rollout policy's log-probs, as verl and OpenRLHF do).
      values: `[N, T]` critic values, needed by `gae`.

    Returns:
      `(advantages, returns)`: advantages `[N]` for grpo/dr_grpo/rloo, `[N, T]` for the token-level
      estimators; returns `[N, T]` for reinforce_pp and gae (the critic's targets), else None.

    Raises:
      ValueError: a missing input the estimator needs, or bad rewards (see `check_rewards`).
    """
    name, g = config.advantage_estimator, config.group_size
    if name == "grpo":
        return grpo(rewards, g, config.adv_eps), None
    if name == "dr_grpo":
        return dr_grpo(rewards, g), None
    if name == "rloo":
        return rloo(rewards, g), None
    if name == "reinforce_pp_baseline":
        return reinforce_pp_baseline(rewards, completion_mask, g), None
    if is_concrete(rewards):
        check_rewards(rewards)
    token_rewards = outcome_token_rewards(rewards, completion_mask)
    if config.kl_in_reward and config.kl_coef > 0:
        if old_logprobs is None or ref_logprobs is None:
            raise ValueError("kl_in_reward needs old_logprobs and ref_logprobs to penalise the rewards")
        token_rewards = kl_penalised_rewards(token_rewards, old_logprobs, ref_logprobs, completion_mask,
                                             config.kl_coef, config.kl_estimator)
    if name == "reinforce_pp":
        return reinforce_pp(token_rewards, completion_mask, config.gamma)
    if name == "gae":
        if values is None:
            raise ValueError("advantage_estimator 'gae' needs the critic's values [N, T]")
        return gae(token_rewards, values, completion_mask, config.gamma, config.lam)
    raise ValueError(f"unknown advantage_estimator {name!r}")

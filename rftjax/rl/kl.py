"""KL penalties to a frozen reference policy, from sampled-token log-probs.

Source: Schulman 2020, "Approximating KL Divergence" (estimators k1, k2, k3); verl `kl_penalty`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
LOG_RATIO_CLAMP = 20.0  # verl clamps log-ratios to [-20, 20] before exp, for stability


def kl_penalty(logprobs: Array, ref_logprobs: Array, estimator: str = "k3") -> Array:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs, float32 `[N, T]`.

    k1: `log pi - log pi_ref`; k2: `0.5 (log pi - log pi_ref)^2`; k3: `exp(d) - d - 1` with
    `d = log pi_ref - log pi` (unbiased, non-negative), d clamped to [-20, 20] and the result to [-10, 10]
    as verl's `low_var_kl`. Source: Schulman 2020, "Approximating KL Divergence".

    Raises:
      ValueError: unknown estimator, mismatched shapes.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    diff = logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32)
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * jnp.square(diff)
    if estimator == "k3":
        d = jnp.clip(-diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown kl_estimator {estimator!r}; choose k1, k2 or k3")


def kl_penalised_rewards(token_rewards: Array, logprobs: Array, ref_logprobs: Array, completion_mask: Array,
                         kl_coef: float, estimator: str = "k1") -> Array:
    """Token rewards with the KL penalty folded in: `r_t - kl_coef * KL_t` on real tokens, `[N, T]`.

    Used by REINFORCE++ and PPO (`kl_in_reward`); logprobs are the rollout policy's (old_logprobs).
    Source: Ouyang et al. 2022, Eq. 2; verl `apply_kl_penalty`.
    """
    kl = kl_penalty(logprobs, ref_logprobs, estimator)
    return (token_rewards.astype(jnp.float32) - kl_coef * kl) * completion_mask.astype(jnp.float32)

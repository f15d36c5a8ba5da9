"""Rollout correction: importance weights from the sampler's distribution to the trainer's (TIS / MIS).

The rollouts are sampled by the sampler (`rftjax.sampling`: a cached decode, possibly in bfloat16), while the
loss's `old_logprobs` are the trainer's forward pass at the rollout params; where the two differ the policy
gradient is biased (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training";
Liu, Li et al. 2025, "When Speed Kills Stability"). The correction weights each token's policy loss by
`w = pi_trainer / pi_sampler` of its rollout:

  - token level: `w_t = exp(old_t - sampler_t)`;
  - sequence level: `w_i = exp(sum_t m_t (old_t - sampler_t))`, the same weight on every token of row i;
  - `truncate` (TIS): `w <- clip(w, C_min, C_max)`; `mask` (MIS): `w <- w * 1[C_min <= w <= C_max]`; a bound left
    None is open (one-sided).

The log-ratio is clamped to [-20, 20] before exp (verl's safety bound) and the weights are constants (no
gradient). TRL's defaults are sequence / mask / [0, 3] (`vllm_importance_sampling_mode="sequence_mask"`,
`vllm_importance_sampling_cap=3`); verl's are token / truncate at 2 (`rollout_is="token"`,
`rollout_is_threshold=2`). The weights multiply the clipped surrogate before the KL term
(`rftjax.rl.losses.policy_loss`), as TRL's `_compute_loss` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rftjax.rl.kl import LOG_RATIO_CLAMP
from rftjax.rl.masking import masked_mean, masked_min_mean_max

Array = jax.Array

CORRECTION_LEVELS = ("off", "token", "sequence")
CORRECTION_MODES = ("truncate", "mask")


def correction_log_ratio(old_logprobs: Array, sampler_logprobs: Array, mask: Array, level: str) -> Array:
    """`log(pi_trainer / pi_sampler)` of each unit, float32: `[N, T]` at token level, `[N, 1]` at sequence level
    (the masked sum over the row's tokens), clamped to [-20, 20]; `level="off"` gives the token level.

    Args:
      old_logprobs, sampler_logprobs: float `[N, T]` of the sampled tokens under the trainer (at the rollout params)
        and under the sampler.
      mask: `[N, T]` bool or 0/1, the tokens the correction covers.
      level: one of `CORRECTION_LEVELS`.

    Raises:
      ValueError: an unknown level.
    """
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"unknown rollout_correction {level!r}; choose one of {list(CORRECTION_LEVELS)}")
    m = mask.astype(jnp.float32)
    log_ratio = (old_logprobs.astype(jnp.float32) - sampler_logprobs.astype(jnp.float32)) * m
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdims=True)
    return jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def bound_weights(weights: Array, mode: str, low: float | None, high: float | None) -> tuple[Array, Array]:
    """`(bounded, outside)`: `weights` clipped to `[low, high]` (`truncate`) or zeroed outside it (`mask`), and the
    bool mask of the entries outside the bounds (None: that side open).

    Raises:
      ValueError: an unknown mode.
    """
    if mode not in CORRECTION_MODES:
        raise ValueError(f"unknown rollout_correction_mode {mode!r}; choose one of {list(CORRECTION_MODES)}")
    lo = -jnp.inf if low is None else low
    hi = jnp.inf if high is None else high
    outside = (weights < lo) | (weights > hi)
    if mode == "truncate":
        return jnp.clip(weights, lo, hi), outside
    return jnp.where(outside, 0.0, weights), outside


def rollout_weights(old_logprobs: Array, sampler_logprobs: Array, mask: Array, level: str, mode: str = "truncate",
                    low: float | None = None, high: float | None = None) -> tuple[Array | None, dict[str, Array]]:
    """The correction weights of a batch and their diagnostics.

    Args:
      old_logprobs: float `[N, T]`, the trainer's log-probs at the rollout params.
      sampler_logprobs: float `[N, T]`, the sampler's (`SamplingOutput.model_logprobs`).
      mask: `[N, T]`, the tokens whose sampler is the rollout policy (the completion mask without NoisyRollout's
        distorted rows); the weights are 1 elsewhere.
      level: `off` (no weights; the diagnostics at token level), `token` or `sequence`.
      mode, low, high: `bound_weights`.

    Returns:
      `(weights, metrics)`: weights float32 `[N, T]` (token) or `[N, 1]` (sequence), stop-gradient, 1 outside
      `mask`; None when `level="off"`. Metrics (float32 scalars over the units under `mask`, tokens or sequences):
      `rollout_corr_weight_min/mean/max` of the applied weights, `rollout_corr_ess` (effective sample size as a
      fraction, `mean(w)^2 / mean(w^2)`), `rollout_corr_outside_frac` (units clipped or masked),
      `rollout_corr_chi2` (`mean(w_raw^2) - 1`, the chi-square divergence estimate of the unbounded weights),
      `rollout_corr_kl_token` (mean per-token k3 estimate of KL(sampler || trainer), `exp(r) - 1 - r` with
      `r = old - sampler`) and `rollout_corr_kl_seq` (its sum over a row's tokens, mean over rows).

    Raises:
      ValueError: unknown level or mode.
    """
    old = jax.lax.stop_gradient(old_logprobs)
    sampler = jax.lax.stop_gradient(sampler_logprobs)
    m = mask.astype(jnp.float32)
    log_w = correction_log_ratio(old, sampler, m, level)
    unit_mask = m if log_w.shape == m.shape else (m.sum(-1, keepdims=True) > 0).astype(jnp.float32)
    raw = jnp.exp(log_w)
    if level == "off":
        applied, outside = raw, jnp.zeros(raw.shape, bool)
    else:
        applied, outside = bound_weights(raw, mode, low, high)
    r = log_w if level != "sequence" else correction_log_ratio(old, sampler, m, "token")
    k3 = (jnp.exp(r) - 1.0 - r) * m
    rows = (m.sum(-1) > 0).astype(jnp.float32)
    any_unit = unit_mask.sum() > 0
    w_min, mean_w, w_max = masked_min_mean_max(applied, unit_mask, empty=1.0)
    metrics = {
        "rollout_corr_weight_min": w_min,
        "rollout_corr_weight_mean": mean_w,
        "rollout_corr_weight_max": w_max,
        "rollout_corr_ess": jnp.square(mean_w) / jnp.maximum(masked_mean(jnp.square(applied), unit_mask), 1e-30),
        "rollout_corr_outside_frac": masked_mean(outside.astype(jnp.float32), unit_mask),
        "rollout_corr_chi2": masked_mean(jnp.square(raw), unit_mask) - jnp.where(any_unit, 1.0, 0.0),
        "rollout_corr_kl_token": masked_mean(k3, m),
        "rollout_corr_kl_seq": masked_mean(k3.sum(-1), rows),
    }
    if level == "off":
        return None, metrics
    return jax.lax.stop_gradient(jnp.where(unit_mask > 0, applied, 1.0)), metrics

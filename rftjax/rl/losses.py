"""Policy and value losses of the GRPO/PPO family, on masked `[N, T]` arrays.

`policy_loss` implements the clipped surrogate (PPO, Schulman et al. 2017, Eq. 7) with clip-higher
(DAPO), dual-clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", Eq. 5), token-
or sequence-level importance ratios (GSPO, Zheng et al. 2025, Eq. 7 and the GSPO-token variant, Eq. 13),
a KL penalty to a reference policy with Schulman's k1/k2/k3 estimators ("Approximating KL Divergence",
2020), an entropy bonus, and four loss aggregation modes. Numbers match TRL's
`GRPOTrainer._compute_loss` and verl's `core_algos.py` (see tests/test_rl_trl.py).

All inputs: log-probs float `[N, T]` (any float dtype; computed in float32), `completion_mask` `[N, T]`
bool or 0/1, advantages `[N]` (outcome) or `[N, T]` (token-level). An all-masked row contributes nothing
(never NaN). Shapes are checked (ValueError); everything is jit-able with the config static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rftjax.rl.config import LOSS_AGG_MODES, AlgorithmConfig
from rftjax.rl.kl import LOG_RATIO_CLAMP, kl_penalty
from rftjax.rl.masking import check_like_mask, masked_mean, masked_min_mean_max

Array = jax.Array


def aggregate(loss_mat: Array, completion_mask: Array, loss_agg_mode: str, norm_len: int | None = None,
              normalizer: Array | float | None = None) -> Array:
    """Reduce a per-token loss `[N, T]` (or `[N, 1]`, broadcast) to a scalar.

    Modes (l = loss, m = mask, L_i = sum_t m_it, N rows, T padded length):
      - `token-mean`: `sum(l m) / sum(m)` (DAPO; TRL `dapo`/`bnpo`, verl default).
      - `seq-mean-token-mean`: `mean_i (sum_t l m / L_i)` (GRPO; TRL `grpo`).
      - `seq-mean-token-sum`: `mean_i sum_t l m`.
      - `seq-mean-token-sum-norm`: `sum(l m) / (N * norm_len)` with a constant `norm_len` (default T):
        Dr.GRPO's length-unbiased form, = TRL `dr_grpo` with `norm_len = max_completion_length`.
        (verl divides by `norm_len` only; the factor N is a constant learning-rate scale.)
    `normalizer`, when given, replaces the denominator (the number of tokens for `token-mean`, of
    sequences for the `seq-mean-*` modes, `N * norm_len` for the last): pass the global count when the
    batch is split into micro-batches, so the sum of their losses equals the full-batch loss.
    Rows with no tokens contribute 0 and the result is never NaN.

    Raises:
      ValueError: unknown mode.
    """
    m = completion_mask.astype(jnp.float32)
    lm = loss_mat.astype(jnp.float32) * m
    denom = denominator(completion_mask, loss_agg_mode, norm_len) if normalizer is None else normalizer
    if loss_agg_mode == "seq-mean-token-mean":
        return (lm.sum(-1) / jnp.maximum(m.sum(-1), 1.0)).sum() / denom
    return lm.sum() / denom


def denominator(completion_mask: Array, loss_agg_mode: str, norm_len: int | None = None) -> Array:
    """The denominator `aggregate` uses on the whole `completion_mask` `[N, T]` (float32 []): pass it as
    `normalizer` to each micro-batch of that batch, and their losses sum to the whole batch's loss.

    Raises:
      ValueError: unknown mode.
    """
    m = completion_mask.astype(jnp.float32)
    if loss_agg_mode == "token-mean":
        return jnp.maximum(m.sum(), 1.0)
    if loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return jnp.asarray(m.shape[0], jnp.float32)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return jnp.asarray(m.shape[0] * float(norm_len if norm_len is not None else m.shape[1]), jnp.float32)
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; choose one of {list(LOSS_AGG_MODES)}")


def importance_log_ratio(logprobs: Array, old_logprobs: Array, completion_mask: Array, ratio_level: str) -> Array:
    """Log importance weights: `[N, T]` (token, sequence_token) or `[N, 1]` (sequence).

    token: `log pi - log pi_old` per token. sequence (GSPO): the length-normalised sequence log-ratio
    `(1/L_i) sum_t (log pi - log pi_old)`. sequence_token (GSPO-token): the sequence value with per-token
    gradients, `sg[seq] + log pi_t - sg[log pi_t]`. Clamped to [-20, 20].
    """
    m = completion_mask.astype(jnp.float32)
    log_ratio = logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32)
    if ratio_level == "token":
        out = log_ratio
    else:
        seq = (log_ratio * m).sum(-1, keepdims=True) / jnp.maximum(m.sum(-1, keepdims=True), 1.0)
        if ratio_level == "sequence":
            out = seq
        elif ratio_level == "sequence_token":
            lp = logprobs.astype(jnp.float32)
            out = jax.lax.stop_gradient(seq) + lp - jax.lax.stop_gradient(lp)
        else:
            raise ValueError(f"unknown ratio_level {ratio_level!r}; choose token, sequence or sequence_token")
    return jnp.clip(out, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array, completion_mask: Array,
                config: AlgorithmConfig, ref_logprobs: Array | None = None, entropy: Array | None = None,
                normalizer: Array | float | None = None, rollout_weights: Array | None = None
                ) -> tuple[Array, dict[str, Array]]:
    """The clipped-surrogate policy loss of `config` and its diagnostics.

    Per token: `pg = max(-A * w, -A * clip(w, 1 - clip_eps_low, 1 + clip_eps_high))` with importance weight
    `w = exp(importance_log_ratio)`; with `dual_clip_c`, for A < 0: `min(pg, -A * dual_clip_c)`; times the rollout
    correction's weights when given (`rftjax.rl.correction`, constants; TRL applies them here too). Then
    `+ kl_coef * KL(pi || pi_ref)` (unless `kl_in_reward`; times w when `kl_bias_correction`) and
    `- entropy_coef * entropy`, aggregated by `config.loss_agg_mode` (see `aggregate`).

    Args:
      logprobs: `[N, T]` log-probs of the sampled tokens under the policy being optimised (differentiate
        the loss with respect to these).
      old_logprobs: `[N, T]` under the rollout policy (constants).
      advantages: `[N]` or `[N, T]`.
      completion_mask: `[N, T]`.
      config: the algorithm (static).
      ref_logprobs: `[N, T]` under the frozen reference; required when `kl_coef > 0` and not in reward.
      entropy: `[N, T]` per-token entropy of the policy, optional (metric, and the bonus if entropy_coef).
      normalizer: global denominator for micro-batched aggregation (see `aggregate`).
      rollout_weights: `[N, T]` or `[N, 1]` sampler-to-trainer weights (`rftjax.rl.correction.rollout_weights`),
        or None.

    Returns:
      `(loss, metrics)`: float32 scalar and a dict of float32 scalars: `pg_loss`, `kl_loss`,
      `entropy_loss`, `clip_frac_low`, `clip_frac_high`, `dual_clip_frac`, `ppo_kl` (approximate
      KL(old || new), k1), `ratio_min`/`ratio_mean`/`ratio_max`, `kl_ref`, `entropy`, `adv_mean`, `adv_std`.

    Raises:
      ValueError: mismatched shapes; KL requested without ref_logprobs; entropy bonus without entropy.
    """
    check_like_mask(completion_mask, logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                  entropy=entropy)
    if advantages.shape not in ((completion_mask.shape[0],), completion_mask.shape):
        raise ValueError(f"advantages must be [N] or [N, T] = {tuple(completion_mask.shape)}, got "
                         f"{tuple(advantages.shape)}")
    kl_in_loss = config.kl_coef > 0 and not config.kl_in_reward
    if kl_in_loss and ref_logprobs is None:
        raise ValueError(f"kl_coef={config.kl_coef} puts a KL term in the loss: pass ref_logprobs (or set kl_coef=0)")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={config.entropy_coef}: pass the per-token entropy")
    m = completion_mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)
    adv_tok = adv[:, None] if adv.ndim == 1 else adv

    log_w = importance_log_ratio(logprobs, old_logprobs, completion_mask, config.ratio_level)
    ratio = jnp.exp(log_w)
    clipped = jnp.clip(ratio, 1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high)
    pg = jnp.maximum(-adv_tok * ratio, -adv_tok * clipped)
    dual_clipped = jnp.zeros_like(pg, bool)
    if config.dual_clip_c is not None:
        bound = -adv_tok * config.dual_clip_c
        dual_clipped = (adv_tok < 0) & (pg > bound)
        pg = jnp.where(adv_tok < 0, jnp.minimum(pg, bound), pg)
    if rollout_weights is not None:
        pg = pg * jax.lax.stop_gradient(rollout_weights.astype(jnp.float32))
    agg = lambda x: aggregate(x, m, config.loss_agg_mode, config.norm_len, normalizer)  # noqa: E731
    pg_loss = agg(jnp.broadcast_to(pg, m.shape))
    loss = pg_loss

    metrics: dict[str, Array] = {"pg_loss": pg_loss}
    zero = jnp.zeros((), jnp.float32)
    metrics["kl_loss"], metrics["kl_ref"] = zero, zero
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, config.kl_estimator)
        metrics["kl_ref"] = masked_mean(kl, m)
        if kl_in_loss:
            if config.kl_bias_correction:
                kl = kl * ratio
            metrics["kl_loss"] = agg(kl)
            loss = loss + config.kl_coef * metrics["kl_loss"]
    metrics["entropy_loss"], metrics["entropy"] = zero, zero
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.astype(jnp.float32), m)
        if config.entropy_coef > 0:
            metrics["entropy_loss"] = agg(entropy.astype(jnp.float32))
            loss = loss - config.entropy_coef * metrics["entropy_loss"]

    ratio_tok = jnp.broadcast_to(ratio, m.shape)
    adv_b = jnp.broadcast_to(adv_tok, m.shape)
    frac = lambda hit: masked_mean(hit.astype(jnp.float32), m)
    metrics["clip_frac_low"] = frac((ratio_tok < 1 - config.clip_eps_low) & (adv_b < 0))
    metrics["clip_frac_high"] = frac((ratio_tok > 1 + config.clip_eps_high) & (adv_b > 0))
    metrics["dual_clip_frac"] = frac(jnp.broadcast_to(dual_clipped, m.shape))
    metrics["ppo_kl"] = masked_mean(old_logprobs.astype(jnp.float32) - logprobs.astype(jnp.float32), m)
    metrics["ratio_min"], metrics["ratio_mean"], metrics["ratio_max"] = masked_min_mean_max(ratio_tok, m)
    if adv.ndim == 1:
        metrics["adv_mean"], metrics["adv_std"] = adv.mean(), adv.std()
    else:
        mean = masked_mean(adv, m)
        metrics["adv_mean"], metrics["adv_std"] = mean, jnp.sqrt(masked_mean(jnp.square(adv - mean), m))
    metrics["loss"] = loss
    return loss, metrics


def value_loss(values: Array, old_values: Array, returns: Array, completion_mask: Array, clip_eps_value: float,
               loss_agg_mode: str = "token-mean", normalizer: Array | float | None = None
               ) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss of the critic: `0.5 * agg(max((V - R)^2, (clip(V, V_old +- eps) - R)^2))`.

    Args: values `[N, T]` (current critic), old_values `[N, T]` (critic at rollout time), returns `[N, T]`
    (from `gae`), completion_mask `[N, T]`. Returns `(loss, {"vf_loss", "vf_clip_frac", "value_mean"})`.
    Source: verl `compute_value_loss` / TRL `PPOTrainer` (after OpenAI baselines' PPO2).

    Raises:
      ValueError: mismatched shapes.
    """
    check_like_mask(completion_mask, values=values, old_values=old_values, returns=returns)
    v, v_old, r = (x.astype(jnp.float32) for x in (values, old_values, returns))
    v_clipped = jnp.clip(v, v_old - clip_eps_value, v_old + clip_eps_value)
    l1, l2 = jnp.square(v - r), jnp.square(v_clipped - r)
    loss = 0.5 * aggregate(jnp.maximum(l1, l2), completion_mask, loss_agg_mode, normalizer=normalizer)
    m = completion_mask.astype(jnp.float32)
    return loss, {"vf_loss": loss, "vf_clip_frac": masked_mean((l2 > l1).astype(jnp.float32), m),
                  "value_mean": masked_mean(v, m)}

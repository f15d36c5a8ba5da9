"""Rollout correction (TIS / MIS): the weights, their diagnostics and the corrected loss against an independent
numpy re-implementation of TRL's / verl's formulas, and finite differences showing the weights carry no gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rftjax import rl

BOUNDS = [(None, 2.0), (0.5, None), (0.5, 2.0), (0.0, 3.0)]


def _batch(seed=0, n=16, t=7):
    rng = np.random.default_rng(seed)
    sampler = -rng.random((n, t)) * 2 - 0.1
    old = sampler + rng.normal(0, 0.8, (n, t))  # a gap large enough that some weights leave every bound
    lengths = rng.integers(1, t + 1, n)
    mask = np.arange(t)[None] < lengths[:, None]
    mask[4] = False  # e.g. a NoisyRollout row: no weight of its own
    return old.astype(np.float32), sampler.astype(np.float32), mask


def np_weights(old, sampler, mask, level, mode, low, high):
    """TRL `_generate_and_score_completions` / verl `compute_rollout_correction_weights`, in float64 numpy:
    per token (or summed per sequence) log-ratio, clamp to [-20, 20], exp, then truncate or mask."""
    log_ratio = (old.astype(np.float64) - sampler) * mask
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdims=True)
    raw = np.exp(np.clip(log_ratio, -20, 20))
    lo, hi = (-np.inf if low is None else low), (np.inf if high is None else high)
    outside = (raw < lo) | (raw > hi)
    w = np.clip(raw, lo, hi) if mode == "truncate" else np.where(outside, 0.0, raw)
    units = mask if level == "token" else mask.any(-1, keepdims=True)
    return np.where(units, w, 1.0), raw, outside, units


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("low,high", BOUNDS)
def test_weights_and_diagnostics_equal_numpy(level, mode, low, high):
    old, sampler, mask = _batch()
    w, m = rl.rollout_weights(jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(mask), level, mode, low, high)
    want, raw, outside, units = np_weights(old, sampler, mask, level, mode, low, high)
    assert w.shape == want.shape and w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(w), want, rtol=1e-6, atol=1e-6)
    assert 0 < outside[units].mean() < 1  # the example exercises both sides of the bound
    applied = want[units]
    np.testing.assert_allclose(float(m["rollout_corr_weight_mean"]), applied.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["rollout_corr_weight_max"]), applied.max(), rtol=1e-6)
    np.testing.assert_allclose(float(m["rollout_corr_weight_min"]), applied.min(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(m["rollout_corr_ess"]), applied.mean() ** 2 / np.mean(applied ** 2), rtol=1e-6)
    np.testing.assert_allclose(float(m["rollout_corr_outside_frac"]), outside[units].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["rollout_corr_chi2"]), np.mean(raw[units] ** 2) - 1, rtol=1e-5)
    r = (old.astype(np.float64) - sampler) * mask
    k3 = (np.exp(r) - 1 - r) * mask
    np.testing.assert_allclose(float(m["rollout_corr_kl_token"]), k3[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["rollout_corr_kl_seq"]), k3.sum(-1)[mask.any(-1)].mean(), rtol=1e-5)


def test_off_gives_no_weights_but_the_token_diagnostics():
    old, sampler, mask = _batch()
    w, m = rl.rollout_weights(jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(mask), "off")
    raw = np.exp((old.astype(np.float64) - sampler))[mask]
    assert w is None and float(m["rollout_corr_outside_frac"]) == 0.0
    np.testing.assert_allclose(float(m["rollout_corr_weight_mean"]), raw.mean(), rtol=1e-6)


def np_policy_loss(lp, old, adv, mask, w, ref, eps_low, eps_high, kl_coef, agg):
    """The clipped surrogate times the correction weights, plus the (unweighted) k3 KL, as TRL's
    `GRPOTrainer._compute_loss`: `per_token_loss = -min(r A, clip(r) A) * is_ratio + beta * kl`."""
    ratio = np.exp(lp - old)
    pg = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv[:, None]) * w
    d = ref - lp
    per_token = pg + kl_coef * (np.exp(d) - d - 1)
    if agg == "token-mean":
        return (per_token * mask).sum() / mask.sum()
    return np.mean((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1))


@pytest.mark.parametrize("level,mode,low,high", [("token", "truncate", None, 2.0), ("sequence", "mask", 0.0, 3.0),
                                                 ("token", "mask", 0.5, 2.0), ("sequence", "truncate", 0.5, None)])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_corrected_loss_equals_numpy(level, mode, low, high, agg):
    old, sampler, mask = _batch(1)
    rng = np.random.default_rng(2)
    lp = (old + rng.normal(0, 0.2, old.shape)).astype(np.float32)
    ref = (old + rng.normal(0, 0.2, old.shape)).astype(np.float32)
    adv = rng.normal(0, 1, old.shape[0]).astype(np.float32)
    cfg = rl.AlgorithmConfig(group_size=2, clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.05, loss_agg_mode=agg,
                             rollout_correction=level, rollout_correction_mode=mode, rollout_correction_min=low,
                             rollout_correction_max=high)
    w, _ = rl.rollout_weights(jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(mask), level, mode, low, high)
    loss, _ = rl.policy_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), cfg,
                             ref_logprobs=jnp.asarray(ref), rollout_weights=w)
    want_w = np_weights(old, sampler, mask, level, mode, low, high)[0]
    want = np_policy_loss(lp.astype(np.float64), old, adv, mask, want_w, ref, 0.2, 0.28, 0.05, agg)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6, atol=1e-7)
    plain = np_policy_loss(lp.astype(np.float64), old, adv, mask, 1.0, ref, 0.2, 0.28, 0.05, agg)
    assert abs(want - plain) > 1e-3  # the weights change this loss


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_weights_carry_no_gradient(level):
    """On-policy (old = stop_gradient(current), as `steps.rl_loss`): the gradient of the corrected loss equals finite
    differences of the loss with the weights frozen at their value, and differs from those of the loss whose
    weights move with the log-probs, so a weight that leaked a gradient would fail here."""
    old, sampler, mask = _batch(3)
    adv = jnp.asarray(np.random.default_rng(4).normal(0, 1, old.shape[0]), jnp.float32)
    cfg = rl.AlgorithmConfig(group_size=2, rollout_correction=level, rollout_correction_max=2.0)
    s, m = jnp.asarray(sampler), jnp.asarray(mask)

    def corrected(lp):  # the weights computed from the current log-probs, as on an on-policy step
        old_ = jax.lax.stop_gradient(lp)
        w, _ = rl.rollout_weights(old_, s, m, level, "truncate", None, 2.0)
        return rl.policy_loss(lp, old_, adv, m, cfg, rollout_weights=w)[0]

    lp0 = jnp.asarray(old)
    w0, _ = rl.rollout_weights(lp0, s, m, level, "truncate", None, 2.0)
    frozen = lambda lp: rl.policy_loss(lp, lp0, adv, m, cfg, rollout_weights=w0)[0]  # noqa: E731
    moving = lambda lp: rl.policy_loss(  # noqa: E731
        lp, lp0, adv, m, cfg, rollout_weights=rl.rollout_weights(lp, s, m, level, "truncate", None, 2.0)[0])[0]
    g = np.asarray(jax.grad(corrected)(lp0))
    base, eps = np.asarray(lp0, np.float64), 1e-3
    fd_frozen, fd_moving = np.zeros_like(base), np.zeros_like(base)
    for idx in np.ndindex(*base.shape):
        up, down = base.copy(), base.copy()
        up[idx] += eps
        down[idx] -= eps
        up, down = jnp.asarray(up, jnp.float32), jnp.asarray(down, jnp.float32)
        fd_frozen[idx] = (float(frozen(up)) - float(frozen(down))) / (2 * eps)
        fd_moving[idx] = (float(moving(up)) - float(moving(down))) / (2 * eps)
    np.testing.assert_allclose(g, fd_frozen, atol=2e-3)
    assert np.abs(fd_moving - fd_frozen).max() > 1e-2
    # Nor do the weights pass a gradient to either log-prob input.
    for argnum in (0, 1):
        grad = jax.grad(lambda *a: rl.rollout_weights(*a, m, level, "truncate", None, 2.0)[0].sum(),
                        argnums=argnum)(lp0, s)
        assert not np.any(np.asarray(grad))


@pytest.mark.parametrize("bad", [dict(rollout_correction="tokens"), dict(rollout_correction_mode="clip"),
                                 dict(rollout_correction="token", rollout_correction_max=None),
                                 dict(rollout_correction="token", rollout_correction_min=2.0,
                                      rollout_correction_max=1.0),
                                 dict(rollout_correction="sequence", rollout_correction_min=-1.0)])
def test_bad_correction_configs_raise(bad):
    with pytest.raises(ValueError, match="rollout_correction"):
        rl.AlgorithmConfig(group_size=2, **bad)

"""RL objectives: hand-computed examples (numbers worked out by hand in the comments), finite differences,
identities, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rftjax import rewards, rl
from rftjax.rl import advantages as A
from rftjax.rl import dapo, masking

ATOL = 1e-5


# ---------------------------------------------------------------------------------------------------------
# Advantages, by hand


def test_grpo_dr_grpo_rloo_by_hand():
    r = jnp.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # Group 1: mean 0.25, Bessel std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5. Group 2: all equal -> 0.
    np.testing.assert_allclose(A.grpo(r, 4, eps=0.0)[:4], [1.5, -0.5, -0.5, -0.5], atol=ATOL)
    np.testing.assert_allclose(A.grpo(r, 4)[4:], 0.0, atol=ATOL)
    np.testing.assert_allclose(A.dr_grpo(r, 4), [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], atol=ATOL)
    # RLOO: r_i - mean of the other three: 1 - 0, 0 - 1/3.
    np.testing.assert_allclose(A.rloo(r, 4), [1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0], atol=ATOL)


def test_rloo_identity():
    r = jax.random.normal(jax.random.key(0), (24,))
    for g in (2, 3, 6):
        np.testing.assert_allclose(A.rloo(r, g), g / (g - 1) * A.dr_grpo(r, g), atol=ATOL)


def test_reinforce_pp_by_hand():
    r = jnp.array([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    adv, ret = A.reinforce_pp(r, mask, gamma=0.5)
    # Returns: row 0 [0.25, 0.5, 1], row 1 [1, 2, 0]. Whitening over the 5 real tokens: mean 0.95,
    # Bessel var 1.8 / 4 = 0.45, std 0.670820.
    np.testing.assert_allclose(ret, [[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]], atol=ATOL)
    np.testing.assert_allclose(adv, [[-1.043498, -0.670820, 0.074536], [0.074536, 1.565248, 0.0]], atol=ATOL)


def test_reinforce_pp_baseline_by_hand():
    r = jnp.array([1.0, 0.0, 3.0, 3.0])
    mask = jnp.array([[1, 1], [1, 0], [1, 1], [0, 0]])
    # Centred: [0.5, -0.5, 0, 0] on tokens: 0.5, 0.5, -0.5, 0, 0; mean 0.1, Bessel var 0.7 / 4, std 0.418330.
    np.testing.assert_allclose(A.reinforce_pp_baseline(r, mask, 2),
                               [[0.956183, 0.956183], [-1.434274, 0], [-0.239046, -0.239046], [0, 0]], atol=ATOL)


def test_gae_by_hand():
    r = jnp.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    v = jnp.array([[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    adv, ret = A.gae(r, v, mask, gamma=1.0, lam=0.5, whiten=False)
    # Row 0: delta = [0.1, 0.1, 0.3]; A2 = 0.3, A1 = 0.1 + 0.5 * 0.3 = 0.25, A0 = 0.1 + 0.5 * 0.25 = 0.225.
    # Row 1 (last token masked, no bootstrap from it): delta1 = 1 - 0.6 = 0.4, A0 = 0.1 + 0.5 * 0.4 = 0.3.
    np.testing.assert_allclose(adv, [[0.225, 0.25, 0.3], [0.3, 0.4, 0.0]], atol=ATOL)
    np.testing.assert_allclose(ret, [[0.725, 0.85, 1.0], [0.8, 1.0, 0.0]], atol=ATOL)


def test_gae_lambda1_gamma1_is_returns_minus_values():
    k1, k2 = jax.random.split(jax.random.key(1))
    r = jax.random.normal(k1, (5, 7))
    v = jax.random.normal(k2, (5, 7))
    mask = (jnp.arange(7)[None] < jnp.array([7, 3, 1, 5, 6])[:, None])
    adv, _ = A.gae(r, v, mask, gamma=1.0, lam=1.0, whiten=False)
    returns = A.discounted_returns(r, mask, 1.0)
    np.testing.assert_allclose(adv, (returns - v) * mask, atol=1e-5)


def test_outcome_token_rewards_puts_reward_on_last_token():
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_allclose(A.outcome_token_rewards(jnp.array([2.0, 3.0, 5.0]), mask),
                               [[0, 2, 0], [0, 0, 3], [0, 0, 0]])


# ---------------------------------------------------------------------------------------------------------
# Loss aggregation and policy loss, by hand

LOSS = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the third row is empty


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", 7 / 3),                       # (1 + 2 + 4) / 3 tokens
    ("seq-mean-token-mean", (1.5 + 4 + 0) / 3),  # per-row means 1.5, 4, 0 (empty row), over 3 rows
    ("seq-mean-token-sum", (3 + 4 + 0) / 3),     # per-row sums 3, 4, 0
    ("seq-mean-token-sum-norm", 7 / (3 * 3)),    # sum 7 / (N=3 * T=3)
])
def test_aggregate_by_hand(mode, expected):
    assert abs(float(rl.aggregate(LOSS, MASK, mode)) - expected) < ATOL
    assert abs(float(rl.aggregate(LOSS, MASK, "seq-mean-token-sum-norm", norm_len=4)) - 7 / 12) < ATOL


def _cfg(**kw):
    return rl.AlgorithmConfig(**{"group_size": 2, "clip_eps_low": 0.2, "clip_eps_high": 0.28, **kw})


def test_clipped_surrogate_and_dual_clip_by_hand():
    ratio = jnp.array([1.5, 0.5, 0.5, 4.0])
    old = jnp.zeros((4, 1))
    logp = jnp.log(ratio)[:, None]
    adv = jnp.array([1.0, 1.0, -1.0, -1.0])
    mask = jnp.ones((4, 1))
    # Per-token max(-A r, -A clip(r, 0.8, 1.28)): -1.28 (clipped high), -0.5, 0.8 (clipped low), 4.0.
    loss, m = rl.policy_loss(logp, old, adv, mask, _cfg())
    assert abs(float(loss) - (-1.28 - 0.5 + 0.8 + 4.0) / 4) < ATOL
    assert float(m["clip_frac_high"]) == 0.25 and float(m["clip_frac_low"]) == 0.25
    np.testing.assert_allclose([m["ratio_min"], m["ratio_mean"], m["ratio_max"]], [0.5, 1.625, 4.0], atol=ATOL)
    # d/dlogp of -A r is -A r on unclipped tokens, 0 on clipped ones; token-mean divides by 4.
    grad = jax.grad(lambda lp: rl.policy_loss(lp, old, adv, mask, _cfg())[0])(logp)
    np.testing.assert_allclose(grad[:, 0], [0, -0.125, 0, 1.0], atol=ATOL)
    # Dual clip c = 3 caps the last token's loss at 3 (and zeroes its gradient).
    loss, m = rl.policy_loss(logp, old, adv, mask, _cfg(dual_clip_c=3.0))
    assert abs(float(loss) - (-1.28 - 0.5 + 0.8 + 3.0) / 4) < ATOL and float(m["dual_clip_frac"]) == 0.25
    grad = jax.grad(lambda lp: rl.policy_loss(lp, old, adv, mask, _cfg(dual_clip_c=3.0))[0])(logp)
    np.testing.assert_allclose(grad[:, 0], [0, -0.125, 0, 0], atol=ATOL)


def test_sequence_ratio_by_hand():
    logp = jnp.array([[0.1, 0.3, 9.0]])  # third token masked: must not enter the sequence ratio
    old = jnp.zeros((1, 3))
    mask = jnp.array([[1, 1, 0]])
    adv = jnp.array([1.0])
    # Sequence log-ratio mean(0.1, 0.3) = 0.2, ratio e^0.2 = 1.221403 < 1.28: unclipped, loss -1.221403.
    loss, _ = rl.policy_loss(logp, old, adv, mask, _cfg(ratio_level="sequence"))
    assert abs(float(loss) + np.exp(0.2)) < ATOL
    loss, _ = rl.policy_loss(logp, old, adv, mask, _cfg(ratio_level="sequence", clip_eps_high=0.2))
    assert abs(float(loss) + 1.2) < ATOL
    # GSPO-token has the same value and, with seq-mean-token-mean, the same gradient as GSPO.
    for mode in ("seq-mean-token-mean",):
        g_seq = jax.grad(lambda lp: rl.policy_loss(lp, old, adv, mask, _cfg(ratio_level="sequence",
                                                                              loss_agg_mode=mode))[0])(logp)
        g_tok = jax.grad(lambda lp: rl.policy_loss(lp, old, adv, mask, _cfg(ratio_level="sequence_token",
                                                                              loss_agg_mode=mode))[0])(logp)
        np.testing.assert_allclose(g_seq, g_tok, atol=ATOL)
        np.testing.assert_allclose(g_seq, [[-np.exp(0.2) / 2, -np.exp(0.2) / 2, 0]], atol=ATOL)


def test_kl_estimators_by_hand():
    lp, ref = jnp.array([[-1.0]]), jnp.array([[-2.0]])
    assert abs(float(rl.kl_penalty(lp, ref, "k1")[0, 0]) - 1.0) < ATOL
    assert abs(float(rl.kl_penalty(lp, ref, "k2")[0, 0]) - 0.5) < ATOL
    assert abs(float(rl.kl_penalty(lp, ref, "k3")[0, 0]) - np.exp(-1.0)) < ATOL  # e^-1 - (-1) - 1
    # k3's clamp (verl low_var_kl) keeps extreme values finite.
    assert float(rl.kl_penalty(jnp.array([[-100.0]]), jnp.array([[0.0]]), "k3")[0, 0]) == 10.0


def test_kl_and_entropy_terms_by_hand():
    logp = jnp.array([[-1.0, -1.0]])
    mask = jnp.ones((1, 2))
    cfg = _cfg(kl_coef=0.5, kl_estimator="k1", entropy_coef=0.1, loss_agg_mode="token-mean")
    ref = jnp.array([[-2.0, -1.5]])  # k1 = [1, 0.5], mean 0.75
    ent = jnp.array([[2.0, 4.0]])  # mean 3
    loss, m = rl.policy_loss(logp, logp, jnp.array([0.0]), mask, cfg, ref_logprobs=ref, entropy=ent)
    assert abs(float(loss) - (0.5 * 0.75 - 0.1 * 3.0)) < ATOL
    assert abs(float(m["kl_ref"]) - 0.75) < ATOL and abs(float(m["entropy"]) - 3.0) < ATOL


def test_kl_penalised_rewards_and_value_loss_by_hand():
    r = jnp.array([[0.0, 1.0]])
    out = rl.kl_penalised_rewards(r, jnp.array([[-1.0, -1.0]]), jnp.array([[-1.5, -0.5]]), jnp.ones((1, 2)), 0.1)
    np.testing.assert_allclose(out, [[-0.05, 1.05]], atol=ATOL)  # r - 0.1 * k1, k1 = [0.5, -0.5]
    # v = 1, v_old = 0.5, R = 2, eps 0.2: clip(v) = 0.7; max((1-2)^2, (0.7-2)^2) = 1.69; loss 0.845.
    loss, m = rl.value_loss(jnp.array([[1.0]]), jnp.array([[0.5]]), jnp.array([[2.0]]), jnp.ones((1, 1)), 0.2)
    assert abs(float(loss) - 0.845) < ATOL and float(m["vf_clip_frac"]) == 1.0


def test_dapo_helpers_by_hand():
    np.testing.assert_array_equal(dapo.groups_with_signal([1, 1, 0, 1, 0, 0], 2), [False, True, False])
    # L_max 10, L_cache 4: free up to 6, linear to -1 at 10, -1 beyond.
    np.testing.assert_allclose(rewards.overlong_penalty([5, 6, 8, 10, 12], 10, 4), [0, 0, -0.5, -1, -1])
    np.testing.assert_allclose(rewards.overlong_penalty([50], 10, 0), [0])


# ---------------------------------------------------------------------------------------------------------
# Identities and finite differences


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_at_ratio_one_grpo_gradient_is_reinforce(mode):
    k1, k2 = jax.random.split(jax.random.key(3))
    logp = -jnp.abs(jax.random.normal(k1, (6, 5)))
    adv = jax.random.normal(k2, (6,))
    mask = (jnp.arange(5)[None] < jnp.array([5, 2, 1, 4, 3, 5])[:, None]).astype(jnp.float32)
    cfg = _cfg(loss_agg_mode=mode)
    g = jax.grad(lambda lp: rl.policy_loss(lp, logp, adv, mask, cfg)[0])(logp)
    g_reinforce = jax.grad(lambda lp: rl.aggregate(-adv[:, None] * lp, mask, mode))(logp)
    np.testing.assert_allclose(g, g_reinforce, atol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_matches_finite_differences(level, mode):
    keys = jax.random.split(jax.random.key(7), 4)
    logp = -jnp.abs(jax.random.normal(keys[0], (4, 5))) - 0.5
    old = logp + 0.3 * jax.random.normal(keys[1], (4, 5))
    ref = logp + 0.3 * jax.random.normal(keys[2], (4, 5))
    adv = jax.random.normal(keys[3], (4,))
    mask = (jnp.arange(5)[None] < jnp.array([5, 3, 4, 2])[:, None]).astype(jnp.float32)
    cfg = _cfg(ratio_level=level, loss_agg_mode=mode, kl_coef=0.1, entropy_coef=0.0)
    f = jax.jit(lambda lp: rl.policy_loss(lp, old, adv, mask, cfg, ref_logprobs=ref)[0])
    g = np.asarray(jax.grad(f)(logp))
    eps = 1e-3
    fd = np.zeros_like(g)
    base = np.asarray(logp)
    for idx in np.ndindex(*base.shape):
        up, down = base.copy(), base.copy()
        up[idx] += eps
        down[idx] -= eps
        fd[idx] = (float(f(jnp.asarray(up))) - float(f(jnp.asarray(down)))) / (2 * eps)
    assert np.abs(g).max() > 1e-2
    np.testing.assert_allclose(g, fd, atol=2e-3)


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises():
    with pytest.raises(ValueError, match="group_size=3"):
        A.grpo(jnp.ones(8), 3)
    with pytest.raises(ValueError, match="non-finite rewards"):
        A.grpo(jnp.array([1.0, jnp.nan, 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="at least 2"):
        A.rloo(jnp.ones(4), 1)
    with pytest.raises(ValueError, match=r"\[N\]"):
        A.dr_grpo(jnp.ones((4, 2)), 2)
    with pytest.raises(ValueError, match="completion_mask"):
        rl.policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros(2), jnp.ones((2, 3)), _cfg())
    with pytest.raises(ValueError, match="advantages"):
        rl.policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3), jnp.ones((2, 3)), _cfg())
    with pytest.raises(ValueError, match="ref_logprobs"):
        rl.policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2), jnp.ones((2, 3)), _cfg(kl_coef=0.1))
    with pytest.raises(ValueError, match="non-finite"):
        dapo.groups_with_signal([1.0, float("nan")], 2)


def test_empty_masks_give_zero_not_nan():
    z = jnp.zeros((3, 4))
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        for level in ("token", "sequence", "sequence_token"):
            cfg = _cfg(loss_agg_mode=mode, ratio_level=level, kl_coef=0.1)
            loss, m = rl.policy_loss(z - 1.0, z - 1.5, jnp.ones(3), z, cfg, ref_logprobs=z - 2.0)
            grad = jax.grad(lambda lp: rl.policy_loss(lp, z - 1.5, jnp.ones(3), z, cfg, ref_logprobs=z - 2.0)[0])(z)
            assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in m.values())
            assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("bad", [
    dict(advantage_estimator="vtrace"), dict(loss_agg_mode="sum"), dict(kl_estimator="k4"),
    dict(ratio_level="seq"), dict(group_size=1), dict(clip_eps_high=1.5), dict(dual_clip_c=0.5),
    dict(kl_in_reward=True), dict(num_iterations=0), dict(norm_len=0), dict(kl_coef=-1.0),
])
def test_bad_configs_raise(bad):
    with pytest.raises(ValueError):
        rl.AlgorithmConfig(**bad)


def test_presets():
    assert set(rl.PRESETS) == {"grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo"}
    dapo_cfg = rl.get_algorithm("dapo")
    assert (dapo_cfg.clip_eps_low, dapo_cfg.clip_eps_high, dapo_cfg.kl_coef) == (0.2, 0.28, 0.0)
    assert dapo_cfg.loss_agg_mode == "token-mean"
    assert rl.preset_settings("dapo") == {"dynamic_sampling": True, "gen_prompts_per_round": 0,
                                          "dynamic_sampling_rounds": 4, "overlong_buffer_len": 64}
    assert rl.preset_settings("grpo") == rl.SCHEDULE_DEFAULTS
    assert rl.get_algorithm("dr_grpo").loss_agg_mode == "seq-mean-token-sum-norm"
    assert rl.get_algorithm("gspo").ratio_level == "sequence"
    assert rl.get_algorithm("ppo").uses_critic and rl.get_algorithm("grpo").uses_reference
    assert rl.get_algorithm("grpo", group_size=4).group_size == 4
    with pytest.raises(ValueError, match="unknown algorithm preset"):
        rl.get_algorithm("trpo")
    with pytest.raises(ValueError, match="group_size"):
        rl.get_algorithm("grpo", group_size=1)


def test_compute_advantages_dispatch():
    r = jnp.array([1.0, 0.0, 0.5, 0.5])
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    lp, ref = -jnp.ones((4, 3)), -1.5 * jnp.ones((4, 3))
    np.testing.assert_allclose(rl.compute_advantages(rl.get_algorithm("grpo", group_size=2), r, mask)[0],
                               A.grpo(r, 2))
    np.testing.assert_allclose(rl.compute_advantages(rl.get_algorithm("rloo", group_size=2), r, mask)[0],
                               A.rloo(r, 2))
    # REINFORCE++: reward on the last token minus 0.01 * k1 (= 0.5) on every real token, then whitened.
    adv, ret = rl.compute_advantages(rl.get_algorithm("reinforce_pp"), r, mask, lp, ref)
    token_r = (A.outcome_token_rewards(r, mask) - 0.005) * mask
    np.testing.assert_allclose(ret, A.discounted_returns(token_r, mask), atol=1e-6)
    np.testing.assert_allclose(adv, masking.masked_whiten(ret, mask), atol=1e-6)
    with pytest.raises(ValueError, match="values"):
        rl.compute_advantages(rl.get_algorithm("ppo"), r, mask, lp, ref)
    with pytest.raises(ValueError, match="ref_logprobs"):
        rl.compute_advantages(rl.get_algorithm("reinforce_pp"), r, mask)
    adv, ret = rl.compute_advantages(rl.get_algorithm("ppo"), r, mask, lp, ref, values=jnp.zeros((4, 3)))
    assert adv.shape == ret.shape == (4, 3)

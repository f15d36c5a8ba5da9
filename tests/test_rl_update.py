"""The RL update on the devices: one host -> device transfer per step (checked with JAX's transfer guard), and
the on-device minibatching (permutations, gather, lax.scan) against a plain loop of single updates."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rftjax import batches, optim, rl, steps
from rftjax.models import get_preset, init_params
from rftjax.rl_update import UPDATE_STREAM, UpdateSettings, make_rl_update, minibatch_indices, prepare
from rftjax.rollout import RolloutBatch, collect_rollouts
from rftjax.train import Trainer
from helpers import set_by_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import smoke  # noqa: E402


def test_one_rl_step_moves_its_rollouts_to_the_devices_once(tmp_path, monkeypatch):
    """After the rollouts, the update part of an RL step makes exactly one explicit host -> device transfer (the
    RolloutBatch) and no implicit one: `transfer_guard_host_to_device("disallow")` raises on any implicit
    transfer, Python scalars included, and `jax.device_put` is counted. DAPO with a KL term: mu = 2 passes,
    minibatches of 4 gathered on device, old and reference log-probs. (PPO's critic path runs in the same
    program: test_train's ppo preset and experiments/parity.sh.)"""
    config = smoke.get_config("dapo")
    for key, value in {"mesh.num_devices": 1, "sft.enabled": False, "rl.algo.kl_coef": 0.01}.items():
        set_by_path(config, key, value)
    trainer = Trainer(config, str(tmp_path / "dapo"))
    setup, key = trainer.setup, jax.random.key(3)
    rollouts = collect_rollouts(setup.policy(trainer.params), trainer.state.rl_iter, key, setup.rollout_config,
                                setup.rewards, setup.place)
    # Rewards that differ within each group (an untrained policy's rollouts often all score the same), so the
    # policy gradient is not zero.
    n = rollouts.batch.rewards.shape[0]
    rollouts.batch = rollouts.batch.replace(rewards=(np.arange(n) % 3).astype(np.float32))
    before = jax.tree.map(np.asarray, trainer.params)
    puts = []
    device_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: puts.append(a[0]) or device_put(*a, **k))
    with jax.transfer_guard_host_to_device("disallow"):
        metrics = trainer.rl_update_step(rollouts, key)
    assert len(puts) == 1 and isinstance(puts[0], RolloutBatch)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0 and metrics["kl_ref"] >= 0  # rewards differ
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before),
                                                                     jax.tree.leaves(trainer.params)))


def test_minibatch_indices_are_fresh_permutations_per_pass():
    idx = np.asarray(minibatch_indices(jax.random.key(0), 8, 4, 3))
    assert idx.shape == (6, 4)
    passes = idx.reshape(3, 8)
    assert all(sorted(p) == list(range(8)) for p in passes) and len({tuple(p) for p in passes}) == 3
    np.testing.assert_array_equal(minibatch_indices(jax.random.key(0), 8, 8, 2), [list(range(8))] * 2)


def _tiny_batch(model, rng, n=8, t=6):
    prompt = np.concatenate([np.full((n, model.num_image_tokens), model.image_token_id),
                             rng.integers(4, 50, (n, 3))], axis=1).astype(np.int32)
    mask = np.arange(t)[None] < rng.integers(1, t + 1, n)[:, None]
    v = model.vision
    seq = batches.SequenceBatch(
        pixel_values=jnp.asarray(rng.standard_normal((n, v.image_size, v.image_size, v.num_channels)), jnp.float32),
        prompt_ids=jnp.asarray(prompt), prompt_mask=jnp.ones_like(prompt, bool),
        completion_ids=jnp.asarray(np.where(mask, rng.integers(4, 50, (n, t)), 0), jnp.int32),
        completion_mask=jnp.asarray(mask))
    return seq, mask


def test_on_policy_correction_uses_the_trainer_at_the_rollout_params_and_skips_noisy_rows():
    """On-policy GRPO with sequence-level MIS ([0, 3]): the update's gap and correction metrics and its loss equal
    those computed from the trainer's own log-probs (old) against the sampler's on the clean rows only; the noisy
    rows' sampler log-probs (another image's, 5 nats off) change nothing."""
    from test_rollout_correction import np_weights

    model = get_preset("tiny")
    algo = rl.get_algorithm("grpo", group_size=4, kl_coef=0.0, rollout_correction="sequence",
                            rollout_correction_mode="mask", rollout_correction_min=0.0, rollout_correction_max=3.0)
    rng = np.random.default_rng(1)
    seq, mask = _tiny_batch(model, rng)
    params = init_params(model, jax.random.key(0))
    trainer_lp = np.asarray(steps.completion_logprobs(params, model, seq)[0])
    noisy = np.tile([False, False, True, True], 2)
    sampler = np.where(noisy[:, None], trainer_lp - 5.0, trainer_lp + rng.normal(0, 0.5, trainer_lp.shape)) * mask
    rewards = jnp.asarray([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.2])
    tx = optim.make_optimizer(optim.make_schedule(1e-2, 10))
    update = make_rl_update(UpdateSettings(model, algo))

    def run(noisy_flags):
        batch = RolloutBatch(seq=seq, rewards=rewards, sampler_logprobs=jnp.asarray(sampler, jnp.float32),
                             noisy=noisy_flags)
        state = optim.TrainState.create(jax.tree.map(jnp.copy, params), tx)
        return {k: float(v[0]) for k, v in update(state, None, None, {}, batch, jax.random.key(2))[2][0].items()}

    got = run(jnp.asarray(noisy))
    clean = mask & ~noisy[:, None]
    gap = np.abs(trainer_lp - sampler)[clean]
    assert got["sampler_logprob_gap_max"] == pytest.approx(gap.max(), rel=1e-5) and gap.max() < 3
    w, raw, outside, units = np_weights(trainer_lp, sampler, clean, "sequence", "mask", 0.0, 3.0)
    assert got["rollout_corr_weight_mean"] == pytest.approx(w[units].mean(), rel=1e-5)
    assert got["rollout_corr_outside_frac"] == pytest.approx(outside[units].mean(), abs=1e-6)
    adv, _ = rl.compute_advantages(algo, rewards, jnp.asarray(mask))
    lp = jnp.asarray(trainer_lp)
    want, _ = rl.policy_loss(lp, lp, adv, jnp.asarray(mask), algo, rollout_weights=jnp.asarray(w, jnp.float32))
    assert got["loss"] == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    plain, _ = rl.policy_loss(lp, lp, adv, jnp.asarray(mask), algo)
    assert abs(float(plain) - float(want)) > 1e-3
    unflagged = run(None)  # the same rows trusted: the noisy rows' 5-nat gap shows
    assert unflagged["sampler_logprob_gap_max"] == pytest.approx(5.0, rel=1e-4)


def test_scanned_minibatch_updates_equal_a_plain_loop():
    """`make_rl_update` (mu = 2 passes x 2 minibatches in one lax.scan, rows gathered on the device) gives the
    params and per-update metrics of four single updates on the same rows in the same order."""
    model = get_preset("tiny")
    algo = rl.get_algorithm("grpo", group_size=4, num_iterations=2, kl_coef=0.05)
    rng = np.random.default_rng(0)
    n, t = 8, 6
    seq, mask = _tiny_batch(model, rng, n, t)
    sampler_lp = jnp.asarray(np.where(mask, -rng.random((n, t)), 0.0), jnp.float32)
    batch = RolloutBatch(seq=seq, rewards=jnp.asarray([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.2]),
                         sampler_logprobs=sampler_lp)
    params, ref = init_params(model, jax.random.key(0)), init_params(model, jax.random.key(1))
    tx = optim.make_optimizer(optim.make_schedule(1e-2, 10))
    key = jax.random.key(5)

    update = make_rl_update(UpdateSettings(model, algo, minibatch_size=4))
    donated = optim.TrainState.create(jax.tree.map(jnp.copy, params), tx)  # the update donates its state
    got, _, (metrics, critic_metrics) = update(donated, None, ref, {}, batch, key)
    assert critic_metrics == {} and metrics["loss"].shape == (4,)

    full = prepare(params, ref, None, batch, UpdateSettings(model, algo), on_policy=False)
    single = jax.jit(functools.partial(optim.apply_gradients, functools.partial(
        steps.rl_loss, config=model, algo=algo, temperature=1.0)))
    state, losses, gaps = optim.TrainState.create(params, tx), [], []
    for rows in np.asarray(minibatch_indices(jax.random.fold_in(key, UPDATE_STREAM), n, 4, 2)):
        state, m = single(state, jax.tree.map(lambda x: x[rows], full))
        losses.append(float(m["loss"]))
        # The sampler/trainer gap of each update's rows, against the trainer's log-probs at the rollout params.
        gaps.append(np.abs(np.asarray(full.old_logprobs) - np.asarray(sampler_lp))[rows][mask[rows]])
    np.testing.assert_allclose(np.asarray(metrics["loss"]), losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["sampler_logprob_gap_max"]), [g.max() for g in gaps], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["sampler_logprob_gap_mean"]), [g.mean() for g in gaps], rtol=1e-5)
    # Params after 4 Adam steps of ~lr = 1e-2 each: float32 rounding of the scanned vs the separately jitted
    # program, divided by Adam's sqrt(v) where a gradient is near 0, reaches ~1.1e-5 (one element of 2048 with the
    # LM head in checkpointed chunks; 3e-6 before: 1e-3 of one step either way); a wrong row, order or pass would
    # move params by a whole step (1e-2).
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5)
    assert int(got.step) == 4 and max(abs(x) for x in losses) > 1e-4


def _media_once():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import media_once

    return media_once


def test_media_once_per_prompt_saves_the_vision_work_of_the_copies():
    """G = 8 rows per prompt (Qwen2.5-VL tiny, images of 4 and 8 tokens): the update with each prompt's media
    stored once equals the one with the media repeated per row (loss within 1e-6, params within float rounding
    of Adam's step), and XLA's FLOP count drops by 7/8 of the vision tower's share (measured 0.874)."""
    r = _media_once().measure("qwen_vl_tiny")
    assert r["loss_diff"] < 1e-6 and r["param_diff"] < 1e-5
    assert r["saved_of_vision"] == pytest.approx(7 / 8, abs=0.03)


def test_minibatches_smaller_than_the_prompts_encode_only_their_prompts():
    """4 prompts x 2 rows, minibatches of 2 rows over 2 passes: `SequenceBatch.take` keeps only the prompts a
    minibatch uses, and every update's loss and the final params equal the per-row version's."""
    media_once = _media_once()
    config = get_preset("tiny")
    once, per_row = media_once.batches(config, np.random.default_rng(1), b=4, g=2)
    rows = jnp.asarray([3, 6])
    part = once.seq.take(rows)
    assert part.pixel_values.shape[0] == 2
    np.testing.assert_array_equal(part.pixel_values[part.prompt_index], per_row.seq.pixel_values[rows])
    algo = rl.get_algorithm("grpo", group_size=2, num_iterations=2, kl_coef=0.05)
    params, ref = init_params(config, jax.random.key(0)), init_params(config, jax.random.key(1))
    tx = optim.make_optimizer(optim.make_schedule(1e-2, 10))
    update = make_rl_update(UpdateSettings(config, algo, minibatch_size=2))
    results = [update(optim.TrainState.create(jax.tree.map(jnp.copy, params), tx), None, ref, {}, batch,
                      jax.random.key(4)) for batch in (once, per_row)]
    (a, _, (ma, _)), (b, _, (mb, _)) = results
    np.testing.assert_allclose(np.asarray(ma["loss"]), np.asarray(mb["loss"]), rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)

"""The RL update: a `RolloutBatch` already on the devices -> new policy (and critic) params, in one jitted call.

    RolloutBatch (device) ──prepare──► UpdateBatch: advantages, old/ref log-probs, critic values and returns
                          ──num_iterations x minibatches──► apply_gradients (policy, then critic), lax.scan

PureJaxRL style: the minibatch permutations are drawn on the device from the step's key and the minibatches
are gathered on the device, so an RL step moves its rollouts host -> device exactly once (the trainer's
`put` of the `RolloutBatch`; tests/test_rl_update.py runs this function under
`jax.transfer_guard_host_to_device("disallow")`).

Why the sampler's log-probs are not used as `old_logprobs`: the sampler's cached decode runs in the compute
dtype along another path than the training forward pass, while the ratio `pi / pi_old` must compare two
evaluations of the same function (the forward pass at `rl.temperature`). So `old_logprobs` (and `ref_logprobs`,
values) are recomputed here with the trainer's forward pass; on-policy updates (mu = 1, one minibatch) skip them:
old = stop_gradient(current), as TRL does. The gap between the two is logged (`steps.logprob_gap`), and with
`rl.algo.rollout_correction` the loss is weighted by their ratio (`rftjax.rl.correction`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rftjax import batches, optim, rl, steps
from rftjax.batches import RolloutBatch, UpdateBatch
from rftjax.models import ModelConfig
from rftjax.models.common import mesh_of, rows_over
from rftjax.optim import TrainState
from rftjax.trainable import combine

Array = jax.Array
UPDATE_STREAM = 1 << 30  # fold_in data of the update's key; rollout rounds use 0, 1, ... of the same step key


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """The static settings of the RL update (hashable).

    Attributes:
      config: the policy's model config.
      algo: the objective (`rl.AlgorithmConfig`).
      temperature: of the trainer's log-probs (the rollouts' sampling temperature).
      minibatch_size: rows per optimizer update (0 = all N rows of the step); must divide N.
      micro_batch_size: rows per forward (and backward) pass, gradients summed (0 = the minibatch); must divide
        the minibatch.
    """

    config: ModelConfig
    algo: rl.AlgorithmConfig
    temperature: float = 1.0
    minibatch_size: int = 0
    micro_batch_size: int = 0

    @classmethod
    def of(cls, run_config, config: ModelConfig, algo: rl.AlgorithmConfig) -> "UpdateSettings":
        """The settings of a run config's `rl.*` (temperature, minibatch_size, micro_batch_size)."""
        r = run_config.rl
        return cls(config, algo, float(r.temperature), r.minibatch_size, r.micro_batch_size)


def prepare(policy_params, ref_params, critic_params, batch: RolloutBatch, settings: UpdateSettings,
            on_policy: bool, micro: batches.MicroBatching = batches.MicroBatching()) -> UpdateBatch:
    """The `UpdateBatch` of a rollout batch: advantages by `settings.algo` (`rl.compute_advantages`), `old_logprobs`
    under the current params (unless `on_policy`; also needed for a KL penalty in the reward),
    `ref_logprobs` under `ref_params` (when `algo` has a KL term), critic values and returns (PPO); on-policy, the
    sampler's log-probs (and NoisyRollout's `noisy` flags) pass through for the loss's `steps.logprob_gap` and
    rollout correction. The forward passes run over
    the micro-batches `micro` (`batches.map_micro_batches`).
    Rewards are not checked here (inside jit): `rftjax.rollout.collect_rollouts` checks them on the host."""
    seq, config, algo, temperature = batch.seq, settings.config, settings.algo, settings.temperature

    def each(fn, params):
        return batches.map_micro_batches(lambda part: fn(params, config, part), seq, micro)

    logprobs = lambda params, config, part: steps.completion_logprobs(params, config, part, temperature)[0]  # noqa: E731
    old = each(logprobs, policy_params) if not on_policy or algo.kl_in_reward else None
    ref = each(logprobs, ref_params) if algo.uses_reference else None
    values = each(steps.critic_values, critic_params) if algo.uses_critic else None
    advantages, returns = rl.compute_advantages(algo, batch.rewards, seq.completion_mask, old, ref, values)
    return UpdateBatch(seq=seq, advantages=advantages, old_logprobs=None if on_policy else old,
                       ref_logprobs=None if algo.kl_in_reward else ref, old_values=values, returns=returns,
                       sampler_logprobs=batch.sampler_logprobs, noisy=batch.noisy)


def minibatch_indices(key: Array, n_rows: int, minibatch_size: int, num_iterations: int) -> Array:
    """int32 `[num_iterations * n_rows / minibatch_size, minibatch_size]`: the rows of each update, a fresh
    permutation per pass (`fold_in(key, pass)`); rows in order when one minibatch holds them all."""
    passes = [jax.random.permutation(jax.random.fold_in(key, i), n_rows) if minibatch_size < n_rows
              else jnp.arange(n_rows) for i in range(num_iterations)]
    return jnp.concatenate(passes).reshape(-1, minibatch_size)


def make_rl_update(settings: UpdateSettings, policy_shardings=None, critic_shardings=None) -> Callable:
    """`rl_update(policy, critic, ref_params, frozen, batch, key) -> (policy, critic, (policy_metrics,
    critic_metrics))`, jitted, `policy` and `critic` donated.

    Args (of the returned function):
      policy: the policy `TrainState` (its trainable params); critic: the critic's (PPO) or None; ref_params: the
        reference's trainable params (their values at the start of the stage) or None; frozen: the params that do
        not train (`rftjax.trainable.split`; `{}` when all do), shared by the policy, the reference and the critic's
        backbone; batch: a `RolloutBatch` of N rows on the devices; key: the step's PRNG key (the minibatch
        permutations come from `fold_in(key, UPDATE_STREAM)`, LoRA dropout from `fold_in(key, UPDATE_STREAM + 1)`).
    `settings.micro_batch_size` rows go through one forward (and backward) pass at a time: the old / reference /
    value passes and each update's gradients run over micro-batches (`batches.map_micro_batches`,
    `optim.apply_gradients`). Returns the metrics of every update stacked, float32
    `[num_iterations * N / minibatch_size]` per key, among them `sampler_logprob_gap_mean/max` (`steps.logprob_gap`
    of the trainer's log-probs at the rollout params, over each update's rows) and the rollout correction's
    `rollout_corr_*` (`rl.rollout_weights`); the critic's (empty without a critic) are `vf_loss`,
    `vf_clip_frac`, `value_mean` and its `critic_loss`, `critic_grad_norm`, `critic_skipped_updates`.
    """
    config, algo, minibatch_size = settings.config, settings.algo, settings.minibatch_size
    policy_loss = functools.partial(steps.rl_loss, config=config, algo=algo, temperature=settings.temperature)
    mesh = mesh_of(policy_shardings)  # micro-batches laid out over its data axes
    critic_loss = functools.partial(steps.critic_loss, config=config, algo=algo)

    def rl_update(policy: TrainState, critic: TrainState | None, ref_params: Any, frozen: dict, batch: RolloutBatch,
                  key: Array):
        with rows_over(mesh):  # activations' rows over the data axes (`shard_rows`), as the batch's
            return _rl_update(policy, critic, ref_params, frozen, batch, key)

    def _rl_update(policy, critic, ref_params, frozen, batch, key):
        n = batch.rewards.shape[0]
        mb = minibatch_size or n
        micro = settings.micro_batch_size or mb
        if mb % micro:
            raise ValueError(f"micro_batch_size={micro} must divide the minibatch's {mb} rows")
        on_policy = algo.num_iterations == 1 and mb == n
        critic_frozen = steps.critic_frozen(frozen)
        full = prepare(combine(policy.params, frozen), None if ref_params is None else combine(ref_params, frozen),
                       None if critic is None else combine(critic.params, critic_frozen), batch, settings,
                       on_policy, batches.MicroBatching(n // micro, mesh))
        update_micro = batches.MicroBatching(mb // micro, mesh)
        dropout_key = jax.random.fold_in(key, UPDATE_STREAM + 1)

        def one_update(states, rows):
            policy, critic = states
            part = full if mb == n else full.take(rows)
            policy, metrics = optim.apply_gradients(policy_loss, policy, part, frozen, dropout_key, update_micro)
            critic_metrics = {}
            if critic is not None:
                critic, critic_metrics = optim.apply_gradients(critic_loss, critic, part, critic_frozen,
                                                               micro=update_micro)
                # loss, grad_norm, skipped_updates: the critic's get a prefix, the policy's keep their names
                critic_metrics = {f"critic_{k}" if k in metrics else k: v for k, v in critic_metrics.items()}
            return (policy, critic), (metrics, critic_metrics)

        rows = minibatch_indices(jax.random.fold_in(key, UPDATE_STREAM), n, mb, algo.num_iterations)
        (policy, critic), (policy_metrics, critic_metrics) = jax.lax.scan(one_update, (policy, critic), rows)
        return policy, critic, (policy_metrics, critic_metrics)

    out = None if policy_shardings is None else (policy_shardings, critic_shardings, None)
    return jax.jit(rl_update, donate_argnums=(0, 1), out_shardings=out)

"""Batches of N rows (one completion each), typed pytrees: `SequenceBatch` (prompt + completion, what SFT and every
forward pass reads), `RolloutBatch` (sequences + rewards, what `rftjax.rollout` hands the RL update) and
`UpdateBatch` (a `SequenceBatch` plus what the RL losses need); `MicroBatching` splits a batch into micro-batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from rftjax.models import num_rows
from rftjax.models.common import shard_rows

Array = jax.Array


@flax.struct.dataclass
class SequenceBatch:
    """N rows of prompt + completion, with the media of their prompts.

    Attributes:
      pixel_values: the model family's media batch (LLaVA pixels float32 `[M, H, W, C]`, Qwen-VL `QwenImages`):
        one item per row (M = N) when `prompt_index` is None, else one per prompt, each stored once.
      prompt_ids: int32 `[N, P]`, left-padded, with the image placeholders.
      prompt_mask: bool `[N, P]`, False on padding.
      completion_ids: int32 `[N, T]`, right-padded.
      completion_mask: bool `[N, T]`, True on completion tokens (the EOS included).
      prompt_index: int32 `[N]` or None: row n's media is item `prompt_index[n]` of `pixel_values` (rollouts: the
        G rows of a group point at their prompt, so each forward pass encodes a prompt's media once and gathers
        the features into its rows: `completion_hidden`).
    """

    pixel_values: Array
    prompt_ids: Array
    prompt_mask: Array
    completion_ids: Array
    completion_mask: Array
    prompt_index: Array | None = None

    @classmethod
    def from_dict(cls, batch: dict) -> "SequenceBatch":
        """The arrays of a pipeline or rollout batch (a dict that also holds strings such as `answer`; without a
        `prompt_index`, one media item per row)."""
        return cls(**{f.name: batch.get(f.name) for f in dataclasses.fields(cls)})

    def take(self, rows: Array) -> "SequenceBatch":
        """The rows `rows` (int `[R]`) with their media. With `prompt_index`: when R is below the number of
        prompts, only the prompts these rows use (a static-size `jnp.unique`, padded with repeats of one of them:
        at most R items to encode) and `prompt_index` renumbered into them; otherwise every prompt's media."""
        if self.prompt_index is None:
            return jax.tree.map(lambda x: x[rows], self)
        index, media = self.prompt_index[rows], self.pixel_values
        if rows.shape[0] < num_rows(media):
            used, index = jnp.unique(index, size=rows.shape[0], return_inverse=True)
            media = jax.tree.map(lambda x: x[used], media)
        per_row = jax.tree.map(lambda x: x[rows], self.replace(pixel_values=None, prompt_index=None))
        return per_row.replace(pixel_values=media, prompt_index=index.reshape(-1).astype(jnp.int32))


@flax.struct.dataclass
class RolloutBatch:
    """One RL step's rollouts as arrays (numpy on the host, global arrays after the trainer's one transfer).

    Attributes:
      seq: `SequenceBatch` of `N = B * G` rows; rows `b*G .. b*G+G-1` are the G samples of prompt b (the
        prompt repeated, its media stored once: `prompt_index`), completions trimmed by
        `rftjax.rollout.trim_completions`.
      rewards: float32 `[N]`, the total reward of each completion (finite: checked on the host).
      sampler_logprobs: float32 `[N, T]`, the sampler's log-prob of each completion token under the unfiltered
        tempered model distribution (`SamplingOutput.model_logprobs`); the update reports how far the trainer's
        own log-probs are from it (`logprob_gap`) and weights the loss by the ratio with rollout correction
        (`rftjax.rl.correction`).
      noisy: bool `[N]` or None: rows sampled from a distorted image (NoisyRollout; the update conditions them on
        the clean one), whose sampler log-probs are of another prompt: the gap and the correction skip them.
    """

    seq: SequenceBatch
    rewards: Array
    sampler_logprobs: Array
    noisy: Array | None = None


def sampler_mask(completion_mask: Array, noisy: Array | None) -> Array:
    """bool `[N, T]`: `completion_mask` without the rows flagged `noisy` (bool `[N]`, or None: none)."""
    m = completion_mask.astype(bool)
    return m if noisy is None else m & ~noisy.astype(bool)[:, None]


@flax.struct.dataclass
class UpdateBatch:
    """What one RL update reads: the sequences and their advantages, log-probs and critic targets.

    Attributes:
      seq: the `SequenceBatch` of N rows.
      advantages: float32 `[N]` (outcome estimators) or `[N, T]` (token-level estimators).
      old_logprobs: float32 `[N, T]` under the rollout policy; None when the update is on-policy (one pass,
        one minibatch: then old = stop_gradient(current) and the ratio is exactly 1, as TRL does).
      ref_logprobs: float32 `[N, T]` under the frozen reference; None without a KL term in the loss.
      old_values: float32 `[N, T]` of the critic at rollout time (PPO), else None.
      returns: float32 `[N, T]`, the critic's targets (PPO), else None.
      sampler_logprobs: float32 `[N, T]` of the sampler (`RolloutBatch.sampler_logprobs`): the loss reports
        `logprob_gap` of the trainer's log-probs at the rollout params and these, and applies the rollout correction.
      noisy: bool `[N]` or None, as `RolloutBatch.noisy`.
    """

    seq: SequenceBatch
    advantages: Array
    old_logprobs: Array | None = None
    ref_logprobs: Array | None = None
    old_values: Array | None = None
    returns: Array | None = None
    sampler_logprobs: Array | None = None
    noisy: Array | None = None

    def take(self, rows: Array) -> "UpdateBatch":
        """The minibatch of rows `rows` (int `[R]`): every per-row array gathered, the media as
        `SequenceBatch.take` keeps them."""
        per_row = jax.tree.map(lambda x: x[rows], self.replace(seq=None))
        return per_row.replace(seq=self.seq.take(rows))


@dataclasses.dataclass(frozen=True)
class MicroBatching:
    """How one pass over a batch splits into micro-batches (static).

    Attributes:
      count: K micro-batches of N / K consecutive rows each (1: the whole batch at once).
      mesh: when given, each micro-batch's rows and media are laid out over the mesh's `data x fsdp` axes (arrays
        whose leading dim they divide); without it XLA may keep a gathered micro-batch (and its images) whole on
        every device, repeating its vision work on each.
    """

    count: int = 1
    mesh: jax.sharding.Mesh | None = None

    def part(self, batch, i: Array, n: int):
        """Micro-batch `i` (int []) of `batch` (N = `n` rows, a `SequenceBatch` or `UpdateBatch`)."""
        if n % self.count:
            raise ValueError(f"{self.count} micro-batches do not divide the batch's {n} rows")
        r = n // self.count
        part = batch.take(jnp.arange(r) + i * r)
        return part if self.mesh is None else jax.tree.map(lambda x: shard_rows(x, self.mesh), part)


def map_micro_batches(fn: Callable[[SequenceBatch], Any], seq: SequenceBatch, micro: MicroBatching = MicroBatching()):
    """`fn(part)` (a pytree of `[R, ...]` arrays) on the micro-batches of `seq` (`micro`), one after the other
    (`lax.map`: one micro-batch's activations at a time), concatenated to `[N, ...]`: the forward-only passes
    (old / reference log-probs, values) in the update's memory.

    Raises:
      ValueError: K does not divide N.
    """
    if micro.count == 1:
        return fn(seq)
    n = seq.completion_ids.shape[0]
    out = jax.lax.map(lambda i: fn(micro.part(seq, i, n)), jnp.arange(micro.count))
    return jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), out)

"""The pure, jitted pieces of training: completion log-probs, the SFT / RL / critic losses, the optimizer,
and the update step `update(state, batch) -> (state, metrics)` that XLA compiles once per shape.

Batches are typed pytrees with N rows (one completion each): `SequenceBatch` (prompt + completion, what SFT
and every forward pass reads), `RolloutBatch` (sequences + rewards, what `rftjax.rollout` hands the RL update)
and `UpdateBatch` (a `SequenceBatch` plus what the RL losses need).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from rftjax import rl
from rftjax.models import ModelConfig, model_for, num_rows, uses_dropout
from rftjax.models.common import shard_rows
from rftjax.rl.masking import masked_mean
from rftjax.trainable import combine

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
        own log-probs are from it (`logprob_gap`), never trains on it.
    """

    seq: SequenceBatch
    rewards: Array
    sampler_logprobs: Array


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
      sampler_logprobs: float32 `[N, T]` of the sampler, on on-policy updates only (then the loss's log-probs
        are the trainer's at the rollout params, and it reports `logprob_gap` of the two).
    """

    seq: SequenceBatch
    advantages: Array
    old_logprobs: Array | None = None
    ref_logprobs: Array | None = None
    old_values: Array | None = None
    returns: Array | None = None
    sampler_logprobs: Array | None = None

    def take(self, rows: Array) -> "UpdateBatch":
        """The minibatch of rows `rows` (int `[R]`): every per-row array gathered, the media as
        `SequenceBatch.take` keeps them."""
        per_row = jax.tree.map(lambda x: x[rows], self.replace(seq=None))
        return per_row.replace(seq=self.seq.take(rows))


@flax.struct.dataclass
class TrainState:
    """`step` (int32 [], optimizer updates applied), `params` (the trainable params: all of them, or the
    `rftjax.trainable.split` part that trains), `opt_state` (of those only); `tx` is static."""

    step: Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "cosine", start_step: int = 0):
    """Linear warm-up to `lr`, then cosine decay to `0.1 * lr` at `total_steps` (or constant): an optax schedule,
    update count -> learning rate. `start_step` > 0 continues such a schedule from that step (count 0 gets its
    value at `start_step`): the SFT control's `rl.control_schedule=continue`."""
    if start_step:
        schedule = make_schedule(lr, total_steps, warmup_steps, decay)
        return lambda count: schedule(count + start_step)
    if decay == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
                                    [max(warmup_steps, 1)]) if warmup_steps else optax.constant_schedule(lr)
    if decay != "cosine":
        raise ValueError(f"unknown lr decay {decay!r}; choose cosine or constant")
    return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else lr, lr, warmup_steps,
                                              max(total_steps, warmup_steps + 1), end_value=0.1 * lr)


def _decay_mask(params):
    """Weight decay on matrices and embedding tables (leaves of rank >= 2), not on norms and biases."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def _lr_scale(scales: dict[str, float]) -> optax.GradientTransformation:
    """Multiply the updates of the params under each top-level module in `scales` by its factor
    (`{"vision_tower": 0.1}`); other params are untouched. A factor of 0 freezes the module."""
    scales = {k: float(v) for k, v in scales.items() if float(v) != 1.0}
    if not scales:
        return optax.identity()

    def label(params):
        missing = sorted(set(scales) - set(params))
        if missing:
            raise ValueError(f"lr scales for {missing}: no such top-level modules (have {sorted(params)})")
        return {k: jax.tree.map(lambda _, k=k: k if k in scales else "rest", v) for k, v in params.items()}

    transforms = {k: optax.scale(v) for k, v in scales.items()}
    return optax.multi_transform({**transforms, "rest": optax.identity()}, label)


def make_optimizer(schedule, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   grad_clip: float = 1.0, grad_accum: int = 1,
                   lr_scales: dict[str, float] | None = None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; updates whose gradients are not finite are skipped and counted
    (`optax.apply_if_finite`, see `skipped_updates`); `grad_accum > 1` averages that many micro-batches per
    update (`optax.MultiSteps`). `lr_scales` multiplies the learning rate (and decay) of top-level modules,
    e.g. `{"vision_tower": 0.1}` for the lower ViT learning rate of Qwen2-VL / LLaVA-OneVision training;
    unknown module names raise ValueError when the optimizer is initialised."""
    tx = optax.chain(optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity(),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=_decay_mask),
                     _lr_scale(lr_scales or {}))
    tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
    return optax.MultiSteps(tx, every_k_schedule=grad_accum) if grad_accum > 1 else tx


def state_shardings(abstract: TrainState, param_shardings, mesh) -> TrainState:
    """The shardings of a `TrainState` whose params have `param_shardings`: every optimizer-state leaf that mirrors a
    param (Adam's moments, a gradient accumulator: a leaf whose key path ends with the param's path and has its
    shape) sharded like that param, everything else (counters) replicated. Without it, XLA may lay the freshly
    created moments out replicated, and FSDP would shard the params but not the optimizer state."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    keys = lambda path: tuple(getattr(k, "key", None) for k in path)  # noqa: E731 - dict keys; None otherwise
    params = {keys(p): (x.shape, sh) for (p, x), sh in zip(jax.tree_util.tree_flatten_with_path(abstract.params)[0],
                                                           jax.tree.leaves(param_shardings))}

    def sharding_of(path, x):
        k = keys(path)
        for i in range(len(k)):
            shape, sh = params.get(k[i:], (None, None))
            if shape == x.shape:
                return sh
        return replicated

    opt = jax.tree_util.tree_map_with_path(sharding_of, abstract.opt_state)
    return abstract.replace(step=replicated, params=param_shardings, opt_state=opt)


def skipped_updates(opt_state) -> Array:
    """How many updates `apply_if_finite` skipped for non-finite gradients (int32 [])."""
    found = [s.total_notfinite for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
        s, optax.ApplyIfFiniteState)) if isinstance(s, optax.ApplyIfFiniteState)]
    return found[0] if found else jnp.zeros((), jnp.int32)


LOGPROB_CHUNK_BYTES = 128 << 20
"""Float32 logits held at once by `completion_logprobs` (one chunk of `[C, V]`; forward and backward)."""


def _apply(params, config: ModelConfig, rng: Array | None):
    """`(fn(*args, **kw) -> model.apply(...))` of `config`'s module with `params` (LoRA dropout on when `rng` is given
    and the config has dropout)."""
    train = rng is not None and uses_dropout(config)
    model, variables = model_for(config, train=train), {"params": params}
    rngs = {"dropout": rng} if train else None
    return lambda *args, **kw: model.apply(variables, *args, rngs=rngs, **kw)


def completion_hidden(params, config: ModelConfig, batch: SequenceBatch, rng: Array | None = None) -> Array:
    """The decoder's final hidden states `[N, T, D]` (compute dtype) at the positions that predict each
    completion token, from one forward pass over prompt + completion; with `batch.prompt_index`, each prompt's
    media is encoded once and its features gathered into its rows. `rng`: a training forward pass, with the
    LoRA adapters' dropout when the config has one (`uses_dropout`); None: deterministic."""
    apply = _apply(params, config, rng)
    ids = jnp.concatenate([batch.prompt_ids, batch.completion_ids], axis=1)
    mask = jnp.concatenate([batch.prompt_mask, batch.completion_mask], axis=1)
    media, features = batch.pixel_values, None
    if batch.prompt_index is not None:  # each prompt's media encoded once, its features gathered into its rows
        encoded = apply(media, method="encode_images")
        features, media = jax.tree.map(lambda x: jnp.take(x, batch.prompt_index, axis=0), encoded), None
    out = apply(media, ids, mask, image_features=features, return_hidden=True)
    p, t = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    return out.hidden[:, p - 1:p - 1 + t]


def token_logprobs(head: Callable[[Array], Array], hidden: Array, targets: Array, temperature: float = 1.0,
                   chunk_bytes: int | None = None) -> tuple[Array, Array]:
    """`(logprobs, entropy)`, float32 `[N, T]`, of `targets` (int `[N, T]`) under `softmax(head(hidden) /
    temperature)`, never holding more than one chunk of float32 logits `[C, V]`.

    The N*T positions are cut into chunks of C = max(8, chunk_bytes / (4 V)) tokens; a `lax.scan` computes each
    chunk's logits, logsumexp, target log-prob and entropy under `jax.checkpoint`, so the backward pass recomputes
    a chunk's logits instead of storing them (levanter's blockwise cross-entropy, MaxText's vocabulary tiling over
    tokens). Equal to `log_softmax` of the full logits up to float32 rounding.

    Args:
      head: float32 logits `[C, V]` of hidden states `[C, D]` (the model's `head` method).
      hidden: `[N, T, D]`, any float dtype.
      targets: int `[N, T]` token ids in `[0, V)`.
      temperature: divides the logits (> 0).
      chunk_bytes: float32 logits bytes per chunk (default `LOGPROB_CHUNK_BYTES`).
    """
    n, t, d = hidden.shape
    chunk_bytes = chunk_bytes or LOGPROB_CHUNK_BYTES
    vocab = jax.eval_shape(head, jax.ShapeDtypeStruct((1, d), hidden.dtype)).shape[-1]
    total = n * t
    chunk = max(8, min(total, chunk_bytes // (4 * vocab)))
    k = -(-total // chunk)
    pad = k * chunk - total
    h = jnp.pad(hidden.reshape(total, d), ((0, pad), (0, 0))).reshape(k, chunk, d)
    y = jnp.pad(targets.reshape(total), (0, pad)).reshape(k, chunk)

    @jax.checkpoint
    def one_chunk(h_c, y_c):
        logits = head(h_c).astype(jnp.float32) / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0] - lse
        entropy = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
        return lp, entropy

    _, (lp, entropy) = jax.lax.scan(lambda carry, xs: (carry, one_chunk(*xs)), None, (h, y))
    return lp.reshape(-1)[:total].reshape(n, t), entropy.reshape(-1)[:total].reshape(n, t)


def completion_logprobs(params, config: ModelConfig, batch: SequenceBatch, temperature: float = 1.0,
                        rng: Array | None = None) -> tuple[Array, Array]:
    """`(logprobs, entropy)`, float32 `[N, T]`, of the completion tokens under `softmax(logits / temperature)`
    (0 where masked); `rng` as `completion_hidden`. The LM head runs in chunks (`token_logprobs`): no `[N, T, V]`
    array exists in the forward or the backward pass."""
    hidden = completion_hidden(params, config, batch, rng=rng)
    head = functools.partial(_apply(params, config, rng), method="head")
    lp, entropy = token_logprobs(head, hidden, batch.completion_ids, temperature)
    m = batch.completion_mask.astype(jnp.float32)
    return lp * m, entropy * m


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


def logprob_gap(trainer_logprobs: Array, sampler_logprobs: Array, completion_mask: Array) -> dict[str, Array]:
    """Sampler/trainer agreement over completion tokens, float32 scalars: `sampler_logprob_gap_mean` and
    `sampler_logprob_gap_max` of `|trainer - sampler|` (nats), both `[N, T]`; the rollout engine vs trainer
    mismatch that verl#2996 reports. Equal functions in float32 give ~1e-6; larger values mean the sampler
    computes a different distribution (dtype, cache path, a bug), which biases every ratio `pi / pi_old`."""
    m = completion_mask.astype(bool)
    gap = jnp.where(m, jnp.abs(jax.lax.stop_gradient(trainer_logprobs) - sampler_logprobs), 0.0)
    return {"sampler_logprob_gap_mean": masked_mean(gap, m.astype(jnp.float32)), "sampler_logprob_gap_max": gap.max()}


def sft_loss(params, batch: SequenceBatch, config: ModelConfig, rng: Array | None = None,
             whole_mask: Array | None = None) -> tuple[Array, dict]:
    """Cross-entropy of the completion tokens (token mean over the batch) - the SFT cold start. `whole_mask`: the
    completion mask `[N, T]` of the whole batch when `batch` is one micro-batch of it (`apply_gradients`): the
    mean is then over the whole batch's tokens, so the micro-batches' losses sum to the batch's."""
    lp, _ = completion_logprobs(params, config, batch, rng=rng)
    m = batch.completion_mask.astype(jnp.float32)
    loss = -(lp * m).sum() / rl.denominator(batch.completion_mask if whole_mask is None else whole_mask, "token-mean")
    return loss, {"sft_loss": loss, "tokens": m.sum()}


def _normalizer(whole_mask: Array | None, algo: rl.AlgorithmConfig) -> Array | None:
    return None if whole_mask is None else rl.denominator(whole_mask, algo.loss_agg_mode, algo.norm_len)


def rl_loss(params, batch: UpdateBatch, config: ModelConfig, algo: rl.AlgorithmConfig,
            temperature: float, rng: Array | None = None, whole_mask: Array | None = None) -> tuple[Array, dict]:
    """`rl.policy_loss` on freshly computed log-probs. Without `old_logprobs` the update is on-policy
    (mu = 1, one minibatch): old = stop_gradient(current), ratio exactly 1, as TRL does; with
    `sampler_logprobs` the metrics include `logprob_gap`. `whole_mask` as `sft_loss` (the aggregation's
    denominator is the whole minibatch's: `rl.denominator`)."""
    lp, entropy = completion_logprobs(params, config, batch.seq, temperature, rng=rng)
    old = jax.lax.stop_gradient(lp) if batch.old_logprobs is None else batch.old_logprobs
    loss, metrics = rl.policy_loss(lp, old, batch.advantages, batch.seq.completion_mask, algo,
                                   ref_logprobs=batch.ref_logprobs, entropy=entropy,
                                   normalizer=_normalizer(whole_mask, algo))
    if batch.sampler_logprobs is not None:
        metrics = {**metrics, **logprob_gap(lp, batch.sampler_logprobs, batch.seq.completion_mask)}
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Critic (PPO): the VLM backbone with a scalar head on the final hidden states.


def init_critic(policy_params, config: ModelConfig) -> dict:
    """Critic params initialised from the policy backbone, value head zero (`V = 0` at the start). Given the
    policy's trainable params only, the critic's backbone shares the policy's frozen ones (`critic_frozen`)."""
    return {"backbone": policy_params, "head": {"kernel": jnp.zeros((config.text.hidden_size,), jnp.float32),
                                                "bias": jnp.zeros((), jnp.float32)}}


def critic_values(critic_params, config: ModelConfig, batch: SequenceBatch) -> Array:
    """Values `[N, T]` (float32) of the states before each completion token; 0 where masked."""
    h = completion_hidden(critic_params["backbone"], config, batch).astype(jnp.float32)
    v = h @ critic_params["head"]["kernel"] + critic_params["head"]["bias"]
    return v * batch.completion_mask.astype(jnp.float32)


def critic_frozen(frozen: dict) -> dict:
    """The frozen part of the critic's params, for a policy whose frozen params are `frozen`."""
    return {"backbone": frozen} if frozen else {}


def critic_loss(critic_params, batch: UpdateBatch, config: ModelConfig, algo: rl.AlgorithmConfig,
                rng: Array | None = None, whole_mask: Array | None = None) -> tuple[Array, dict]:
    """`algo.value_coef` x the clipped value loss (`rl.value_loss`) of the critic on `batch.returns` (`rng` is
    unused: the critic's forward pass is deterministic; `whole_mask` as `rl_loss`)."""
    values = critic_values(critic_params, config, batch.seq)
    loss, metrics = rl.value_loss(values, batch.old_values, batch.returns, batch.seq.completion_mask,
                                  algo.clip_eps_value, algo.loss_agg_mode, normalizer=_normalizer(whole_mask, algo))
    return algo.value_coef * loss, metrics


def _completion_mask(batch) -> Array:
    return (batch.seq if isinstance(batch, UpdateBatch) else batch).completion_mask


def merge_micro_metrics(metrics: dict[str, Array], tokens: Array) -> dict[str, Array]:
    """One update's metrics from its micro-batches' (each `[K]`, K micro-batches with `tokens` `[K]` completion
    tokens): `*_max` the max, `*_min` the min, `tokens` and `*_loss`/`loss` terms (already over the whole batch's
    denominator) the sum, every other metric the token-weighted mean (exact for the masked means over tokens;
    for per-sequence statistics such as `adv_std` the micro-batches' mean)."""
    w = tokens / jnp.maximum(tokens.sum(), 1.0)

    def merge(key, x):
        if key.endswith("_max"):
            return x.max()
        if key.endswith("_min"):
            return x.min()
        if key == "tokens" or key == "loss" or key.endswith("_loss"):
            return x.sum()
        return (x * w).sum()

    return {k: merge(k, v) for k, v in metrics.items()}


def apply_gradients(loss_fn: Callable[..., tuple[Array, dict]], state: TrainState, batch, frozen: dict | None = None,
                    key: Array | None = None, micro: MicroBatching = MicroBatching()) -> tuple[TrainState, dict]:
    """One optimizer update (pure): gradients of `loss_fn(params, batch, rng=...) -> (loss, metrics)` with respect
    to the trainable `state.params` only (`params` = them combined with `frozen`, which gets no gradient), the
    optimizer step, and the metrics plus `loss`, `grad_norm` and `skipped_updates` (float32 / int32 scalars).
    `rng` is `fold_in(key, state.step)` (None without a key): the training forward pass's dropout.

    `micro` with K > 1 micro-batches (dividing the batch's N rows: `MicroBatching`) runs them one after the other
    (a `lax.scan`: one micro-batch's activations live at a time) and sums their gradients; each is called as
    `loss_fn(params, part, rng=..., whole_mask=[N, T] completion mask of the batch)` so that its loss uses the
    whole batch's denominator and the sum is the batch's loss (verl's micro-batches with a global token count).
    Metrics: `merge_micro_metrics`.
    """
    rng = None if key is None else jax.random.fold_in(key, state.step)

    def grads_of(part, rng, whole_mask=None):
        def loss_of(trainable):
            kw = {} if whole_mask is None else {"whole_mask": whole_mask}
            return loss_fn(combine(trainable, frozen or {}), part, rng=rng, **kw)

        return jax.value_and_grad(loss_of, has_aux=True)(state.params)

    if micro.count == 1:
        (loss, metrics), grads = grads_of(batch, rng)
    else:
        whole_mask = _completion_mask(batch)

        def one(acc, i):
            part = micro.part(batch, i, whole_mask.shape[0])
            (loss, metrics), grads = grads_of(part, None if rng is None else jax.random.fold_in(rng, i), whole_mask)
            return jax.tree.map(jnp.add, acc, grads), (metrics, loss, _completion_mask(part).sum())

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (metrics, losses, tokens) = jax.lax.scan(one, zeros, jnp.arange(micro.count))
        loss, metrics = losses.sum(), merge_micro_metrics(metrics, tokens.astype(jnp.float32))
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "skipped_updates": skipped_updates(opt_state)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_update(loss_fn: Callable[..., tuple[Array, dict]], state_shardings=None, seed: int = 0):
    """`update(state, batch, frozen={}) -> (state, metrics)`: `apply_gradients` jitted with the state donated
    (`frozen`: the params that do not train, not donated); `state_shardings` pins the output state's layout to the
    input's (params/opt-state sharded by logical axes); dropout keys come from `seed` and the update step."""
    out = None if state_shardings is None else (state_shardings, None)

    def update(state: TrainState, batch, frozen: dict | None = None):
        return apply_gradients(loss_fn, state, batch, frozen, key=jax.random.key(seed))

    return jax.jit(update, donate_argnums=0, out_shardings=out)


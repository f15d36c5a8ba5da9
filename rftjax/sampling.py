"""Group rollouts: prefill once per prompt, then a `lax.while_loop` of one-token decode steps.

`generate` is the one entry point for rollouts (training) and evaluation. It is one XLA program per
(config, shapes, sampling settings): no per-token Python. Each prompt's image is encoded and its prompt
prefilled once; the model's decode state (`rftjax.models.DecoderState`: a KV cache, recurrent states, whatever
its layer kinds keep) is repeated for the G samples of its group, which then decode with independent
randomness. The sampler touches the state only through its protocol (`init_state`, `repeat`, `take`). The
loop stops as soon as every row has emitted an EOS id or the budget is spent; before that, rows that have
finished are dropped from the decode batch (it halves once half of it is done: `decode_sizes`), so short
completions stop costing decode steps.

Sampling follows HF's logits-processor order: temperature, then top-k, then top-p (nucleus; Holtzman et al.
2020, "The Curious Case of Neural Text Degeneration"). Token ids that must never be generated (the image
placeholder by default) are removed from the distribution before anything else.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rftjax.models import (DecoderState, cast_for_compute, check_image_tokens, model_for, num_rows,
                           placeholder_ids)

Array = jax.Array
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How `generate` samples: a frozen, hashable settings object (a static argument of the jitted sampler; the
    role of vLLM's `SamplingParams` and gemma's sampler settings).

    Attributes:
      group_size: G, samples per prompt (>= 1); output rows are `N = B * G`, grouped contiguously.
      max_new_tokens: T, the token budget per completion (>= 1).
      temperature, top_k, top_p: the sampling distribution (`filter_logits`: temperature > 0, top_k >= 0 with 0
        = all, top_p in (0, 1]); ignored when greedy.
      greedy: argmax decoding.
      eos_ids: ids that end a completion (the EOS token is kept and masked in).
      pad_id: id written after a row ends.
      suppress_ids: ids never generated; None: the model's image (and video) placeholders. Add the pad id if it
        is not a real token of the vocabulary.
      compact: drop finished rows from the decode batch (`decode_sizes`: the batch halves, up to 3 times, once at
        most half of it is still decoding). The output is the same as without (each row's noise does not depend
        on the batch), up to float rounding of the smaller batch's matmuls. None: on unless the prompts are
        sharded over several devices, where gathering rows would move decode states between devices (under an
        outer jit, where the placement is not known: on).

    Raises:
      ValueError: a setting outside its range (at construction).
    """

    group_size: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    suppress_ids: tuple[int, ...] | None = None
    compact: bool | None = None

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)  # normalise sequences to hashable int tuples
        set_("eos_ids", tuple(int(e) for e in self.eos_ids))
        if self.suppress_ids is not None:
            set_("suppress_ids", tuple(int(i) for i in self.suppress_ids))
        if self.group_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"group_size={self.group_size} and max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (use greedy=True for argmax decoding)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"top_k={self.top_k} must be >= 0 and top_p={self.top_p} in (0, 1]")

    def replace(self, **changes) -> "SamplingParams":
        """A copy with `changes` (validated again)."""
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class SamplingOutput:
    """Rollouts of `N = B * G` rows, row `b * G + g` being sample g of prompt b.

    Attributes:
      completion_ids: int32 `[N, T]` (T = max_new_tokens), right-padded with `pad_id` after EOS.
      completion_mask: bool `[N, T]`, True on generated tokens (the EOS token included).
      model_logprobs: float32 `[N, T]`, log-prob of each sampled token under `softmax(logits / temperature)`
        without filtering or suppression (temperature 1 when greedy): the quantity the trainer's forward pass
        computes (`rftjax.steps.completion_logprobs`), so `|model_logprobs - trainer log-probs|` measures
        sampler/trainer disagreement (verl#2996). 0 where masked.
      lengths: int32 `[N]`, number of generated tokens (= completion_mask.sum(1)).
      truncated: bool `[N]`, True where the row spent the whole budget without emitting an EOS id.
    """

    completion_ids: Array
    completion_mask: Array
    model_logprobs: Array
    lengths: Array
    truncated: Array


@flax.struct.dataclass
class LoopState:
    """The carry of a decode `lax.while_loop` (N = B * G rows, T = max_new_tokens) over M <= N slots: all N rows
    at first; once finished rows are dropped (`decode_sizes`), the M slots hold the rows still decoding.

    Attributes:
      step: int32 `[]`, tokens generated so far (the column the next token is written to).
      tokens: int32 `[N, T]`, generated ids of every row (`pad_id` after a row is done and in unwritten columns).
      model_logprobs: float32 `[N, T]`, log-prob of each generated token under the unfiltered tempered model
        distribution.
      rows: int32 `[M]`, the row (of N) each slot decodes.
      done: bool `[M]`, slots whose row has emitted an EOS id.
      state: the model's `DecoderState` of the M slots (every prompt repeated G times, then compacted).
      last_logits: float32 `[M, V]`, logits of the next token of each slot.
    """

    step: Array
    tokens: Array
    model_logprobs: Array
    rows: Array
    done: Array
    state: DecoderState
    last_logits: Array


def decode_sizes(n: int, compact: bool, max_phases: int = 4, min_rows: int = 8) -> tuple[int, ...]:
    """Slot counts of the decode phases for `n` rows: `(n, n/2, n/4, ...)` (at most `max_phases`, halving while
    the half is an integer >= `min_rows`), or `(n,)` without compaction. Phase k+1 starts once at most its size
    of rows are still decoding; each phase is one more traced copy of the decode step (compile time)."""
    sizes = [n]
    while compact and len(sizes) < max_phases and sizes[-1] % 2 == 0 and sizes[-1] // 2 >= min_rows:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def filter_logits(logits: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  suppress_ids: Sequence[int] = ()) -> Array:
    """Logits of the sampling distribution, float32 `[N, V]`, `-inf` on excluded tokens.

    Order (as HF's processors): suppressed ids removed, divide by `temperature`, keep the `top_k` largest
    (0: all), keep the smallest set of most likely tokens whose probability reaches `top_p` (1.0: all).
    Ties at a top-k / top-p threshold are all kept. Always keeps at least one token.
    """
    x = logits.astype(jnp.float32)
    if suppress_ids:  # a constant mask (fuses with what follows), not a scatter
        banned = np.zeros(x.shape[-1], bool)
        banned[list(suppress_ids)] = True
        x = jnp.where(banned, NEG_INF, x)
    x = x / temperature
    if 0 < top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, top_k)[0][:, -1:]
        x = jnp.where(x < kth, NEG_INF, x)
    if top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(sorted_x, n_keep - 1, axis=-1)
        x = jnp.where(x < threshold, NEG_INF, x)
    return x


def first_argmax(x: Array) -> Array:
    """Index of the first maximum along the last axis, int32 `[N]` for x `[N, V]` (`jnp.argmax`'s result).

    Written as two plain reductions: XLA CPU runs argmax's variadic (value, index) reduce several times
    slower at decode shapes (0.7 ms of a 13 ms decode step at `[32, 8192]`).
    """
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == x.max(-1, keepdims=True), iota, x.shape[-1]), axis=-1)


def sample_tokens(key: Array, logits: Array, params: SamplingParams, rows: Array | None = None,
                  num_rows: int = 0) -> tuple[Array, Array]:
    """One token per row from logits `[M, V]` by `params` (temperature, top-k, top-p, suppressed ids, greedy):
    `(tokens int32 [M], model_logprobs float32 [M])`, the log-prob under the unfiltered
    `softmax(logits / temperature)` (temperature 1 when greedy).

    `rows` (int `[M]`, of `num_rows`): the rows these logits belong to; row r gets the noise it would get in a
    draw over all `num_rows` rows, so dropping finished rows does not change the other rows' samples.
    """
    temperature = 1.0 if params.greedy else params.temperature
    suppress = params.suppress_ids or ()
    if params.greedy:
        tokens = first_argmax(filter_logits(logits, 1.0, 0, 1.0, suppress))
    else:
        x = filter_logits(logits, temperature, params.top_k, params.top_p, suppress)
        if rows is None:
            noise = jax.random.gumbel(key, x.shape)
        else:
            noise = jax.random.gumbel(key, (num_rows, x.shape[1]))[rows]
        tokens = first_argmax(x + noise)  # = jax.random.categorical(key, x), the same draws
    model_logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1),
                                         tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), model_logprobs


def _check_prompts(config, pixel_values, prompt_ids, prompt_mask, params: SamplingParams) -> None:
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be [B, P], got {prompt_ids.shape} and "
                         f"{prompt_mask.shape}")
    if pixel_values is not None and num_rows(pixel_values) != prompt_ids.shape[0]:
        raise ValueError(f"{num_rows(pixel_values)} images for {prompt_ids.shape[0]} prompts: give one per prompt")
    if not 0 <= params.pad_id < config.text.vocab_size:
        raise ValueError(f"pad_id={params.pad_id} is not a token id of the vocabulary (size "
                         f"{config.text.vocab_size})")


@functools.partial(jax.jit, static_argnames=("config", "params"))
def _generate(weights, pixel_values, prompt_ids, prompt_mask, rng, *, config, params: SamplingParams
              ) -> SamplingOutput:
    model = model_for(config)
    b, p = prompt_ids.shape
    g, t_max = params.group_size, params.max_new_tokens
    n = b * g
    variables = {"params": cast_for_compute(weights, config)}  # cast once, not once per decode step

    # Prefill: each image encoded and each prompt processed once.
    features = None
    if pixel_values is not None:
        features = model.apply(variables, pixel_values, method="encode_images")
    out = model.apply(variables, None, prompt_ids, prompt_mask, state=model.init_state(b, p + t_max),
                      image_features=features)
    last_logits = out.logits[:, -1]  # prompts are left-padded: the last column is every row's last real token

    # Repeat for the G samples of each group (rows b*G .. b*G+G-1 share prompt b).
    state = LoopState(step=jnp.zeros((), jnp.int32), tokens=jnp.full((n, t_max), params.pad_id, jnp.int32),
                      model_logprobs=jnp.zeros((n, t_max), jnp.float32),
                      rows=jnp.arange(n, dtype=jnp.int32), done=jnp.zeros((n,), bool),
                      state=out.state.repeat(g), last_logits=jnp.repeat(last_logits, g, axis=0))
    eos = jnp.asarray(params.eos_ids or (-1,), jnp.int32)
    sizes = decode_sizes(n, params.compact)

    def body(s: LoopState) -> LoopState:
        compacted = s.rows.shape[0] < n
        token, model_logp = sample_tokens(jax.random.fold_in(rng, s.step), s.last_logits, params,
                                          rows=s.rows if compacted else None, num_rows=n)
        live = ~s.done
        token = jnp.where(live, token, params.pad_id)
        decoded = model.apply(variables, None, token[:, None], live[:, None], state=s.state)
        at = (jnp.where(live, s.rows, n), s.step)  # finished slots write nothing (row n is out of range: dropped)
        return s.replace(step=s.step + 1, tokens=s.tokens.at[at].set(token, mode="drop"),
                         model_logprobs=s.model_logprobs.at[at].set(model_logp, mode="drop"),
                         done=s.done | jnp.isin(token, eos), state=decoded.state, last_logits=decoded.logits[:, 0])

    # Decode phases over fewer and fewer slots: phase k runs while more rows are unfinished than phase k+1 has
    # slots; then the unfinished rows (and some finished ones, if fewer remain) move to the smaller batch.
    for k, size in enumerate(sizes):
        if k:
            keep = jnp.argsort(state.done, stable=True)[:size]  # unfinished slots first
            state = state.replace(rows=state.rows[keep], done=state.done[keep], state=state.state.take(keep),
                                  last_logits=state.last_logits[keep])
        fewer = sizes[k + 1] if k + 1 < len(sizes) else 0

        def cond(s: LoopState, fewer=fewer):
            return (s.step < t_max) & (jnp.sum(~s.done) > fewer)

        state = jax.lax.while_loop(cond, body, state)
    tokens = state.tokens

    # A row's mask runs up to and including its first EOS, or over the whole budget. (If the loop stopped
    # early, every row has an EOS, so unwritten columns are always after one.)
    is_eos = jnp.isin(tokens, eos)
    mask = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0
    lengths = mask.sum(1).astype(jnp.int32)
    return SamplingOutput(completion_ids=jnp.where(mask, tokens, params.pad_id), completion_mask=mask,
                          model_logprobs=jnp.where(mask, state.model_logprobs, 0.0), lengths=lengths,
                          truncated=~jnp.any(is_eos & mask, axis=1))


def generate(weights, config, pixel_values, prompt_ids: Array, prompt_mask: Array, rng: Array,
             params: SamplingParams = SamplingParams()) -> SamplingOutput:
    """Sample `params.group_size` completions for each of B left-padded prompts.

    Args:
      weights: `model_for(config)` params (may be sharded; the batch may be sharded over the mesh's data axes).
      config: the model config (static) of any registered family (`rftjax.models.family`).
      pixel_values: each prompt's media, or None for text-only prompts: one image float `[B, H, W, C]` (LLaVA)
        or `QwenImages` (each row's images and video: packed patches + `grid_thw`; the M-RoPE positions continue
        past the media while decoding).
      prompt_ids: int32 `[B, P]`, left-padded, with each row's media placeholders (LLaVA:
        `config.num_image_tokens`; Qwen-VL: a run of `t*h*w/4` per item of its grids).
      prompt_mask: bool `[B, P]`, False on padding.
      rng: PRNG key. Same key and inputs, same output; the left padding of a prompt does not matter.
      params: the `SamplingParams` (G, T, the distribution, EOS/pad/suppressed ids, compaction); its
        `suppress_ids=None` means the model's image (and video) placeholders.

    Returns:
      `SamplingOutput` (completion ids/mask/model_logprobs `[N, T]`, lengths and truncated `[N]`), `N = B * G`
      rows grouped contiguously.

    Raises:
      ValueError: shapes that do not match, a pad id outside the vocabulary, an image-token count that does not
        match the image (checked when prompt_ids is concrete).
    """
    _check_prompts(config, pixel_values, prompt_ids, prompt_mask, params)
    if params.suppress_ids is None:
        params = params.replace(suppress_ids=placeholder_ids(config))
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((prompt_ids, pixel_values)))
    if not traced:
        check_image_tokens(prompt_ids, config, pixel_values)
    if params.compact is None:  # under an outer jit the placement is unknown here: compact
        sharded = not traced and isinstance(prompt_ids, jax.Array) and len(prompt_ids.sharding.device_set) > 1
        params = params.replace(compact=not sharded)
    return _generate(weights, pixel_values, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, bool),
                     rng, config=config, params=params)

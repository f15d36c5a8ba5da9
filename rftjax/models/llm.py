"""Llama/Qwen2-style decoder LM with an explicit decode state, and the decoder-layer-kind registry.

RMSNorm, rotary position embeddings (RoPE, `rotate_half` convention of HF Llama), grouped-query attention,
SwiGLU MLP, optional tied embeddings and attention biases. Sources: Touvron et al. 2023 (Llama), Su et al.
2021 (RoFormer, RoPE), Ainslie et al. 2023 (GQA); numerics follow transformers' `modeling_llama.py` and
`modeling_qwen2.py`.

Positions are always derived from the attention mask (`cumsum(mask) - 1`), so left-padded batches put
every row's first real token at position 0, as HF `generate` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rftjax.models.common import (Linear, RMSNorm, dot_product_attention, merge_image_features, normal_init,
                                  shard_rows)
from rftjax.models.config import TextConfig, attention_layer_activations, attention_layer_flops, attention_layer_params

Array = jax.Array


# ----------------------------------------------------------------------------------------------------------
# Decode state and model output


@flax.struct.dataclass
class DecoderState:
    """Decoding state of the decoder: every layer's own state plus per-row bookkeeping (the model owns it:
    `init_state`; the sampler uses only `repeat`, `take`, `next_pos`).

    Attributes:
      layers: the layers' states, each a pytree whose arrays lead with the row axis `[B, ...]` (an attention
        layer: `{'k': [B, K, S, hd], 'v': [B, K, S, hd]}`, heads-major so attention reads it without a
        transpose; a recurrent layer: its recurrent tensors): a tuple with one state per layer, or, when the
        model scans its layers, the scanned block's state with a leading `[L / len(layer_pattern)]` axis.
      mask: bool `[B, S]`, True where a slot holds a real (non-padding) token.
      next_pos: int32 `[B]`, the position id the next real token of each row gets (= real tokens so far).
      index: int32 `[]`, number of slots written (the next write starts here); the same for all rows.
      layer_batch_axis: static; the row axis of the arrays in `layers` (0, or 1 when scanned).
    """

    layers: Any
    mask: Array
    next_pos: Array
    index: Array
    layer_batch_axis: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def max_len(self) -> int:
        """Number of slots S."""
        return self.mask.shape[1]

    def repeat(self, n: int) -> "DecoderState":
        """Each row repeated `n` times in place (rows `b*n .. b*n+n-1` copy row b): `B` rows become `B*n`.

        Used to decode G samples of a group from one prefilled prompt.
        """
        return self._map_rows(lambda x, axis: jnp.repeat(x, n, axis=axis))

    def take(self, rows: Array) -> "DecoderState":
        """The state of rows `rows` (int `[M]`, indices into `[B]`, in that order): `B` rows become `M` (the
        sampler drops finished rows with it)."""
        return self._map_rows(lambda x, axis: jnp.take(x, rows, axis=axis))

    def _map_rows(self, fn) -> "DecoderState":
        """`fn(array, row_axis)` applied to every per-row array; `index` is shared by all rows."""
        axis = self.layer_batch_axis
        return self.replace(layers=jax.tree.map(lambda x: fn(x, axis), self.layers), mask=fn(self.mask, 0),
                            next_pos=fn(self.next_pos, 0))


@flax.struct.dataclass
class ModelOutput:
    """What a model call returns.

    Attributes:
      logits: float32 `[B, T, V]`; None when the call asked for `return_hidden` (the LM head is skipped).
      state: the `DecoderState` after the call's tokens, when the call was given one; else None.
      hidden: the decoder's final normalised hidden states `[B, T, D]` (compute dtype) with `return_hidden`;
        else None.
    """

    logits: Array | None = None
    state: DecoderState | None = None
    hidden: Array | None = None


@flax.struct.dataclass
class DeepStack:
    """Visual features added to the decoder's hidden states after its first layers (Qwen3-VL's DeepStack, Meng
    et al. 2024; HF `Qwen3VLTextModel._deepstack_process`).

    Attributes:
      is_visual: bool `[B, T]`, the image placeholder positions of the call's tokens.
      features: `[B, k, P, D]`: level j (of k) is added after decoder layer j; the n-th visual position of row b
        takes `features[b, j, n]`.
    """

    is_visual: Array
    features: Array

    def after_layer(self, x: Array, layer: Array | int) -> Array:
        """`x` `[B, T, D]` plus level `layer`'s features at the visual positions (unchanged for `layer >= k`;
        `layer` may be traced, as in a scan over layers)."""
        k = self.features.shape[1]
        if isinstance(layer, int) and layer >= k:
            return x
        level = jax.lax.dynamic_index_in_dim(self.features, jnp.minimum(layer, k - 1), axis=1, keepdims=False)
        return x + merge_image_features(jnp.zeros_like(x), self.is_visual & (layer < k), level)


@flax.struct.dataclass
class LayerInputs:
    """What every decoder layer reads besides its hidden states and its own state (one object, broadcast over a
    scan of layers).

    Attributes:
      positions: int32 `[B, T]` or `[3, B, T]` (M-RoPE) position ids of the T new tokens.
      mask: bool `[B, T, S]`, query t may attend key slot s (causal, real keys only; S = T without a state).
      token_mask: bool `[B, T]`, True on the new tokens that are real (False on padding): a recurrent layer
        leaves its state unchanged on padding.
      index: int32 `[]`, the first slot the new tokens are written to (0 without a state).
    """

    positions: Array
    mask: Array
    token_mask: Array
    index: Array


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One kind of decoder layer: a Linen module class and its empty decode state.

    Attributes:
      module: a Linen module class built as `module(config, dtype, param_dtype, name=...)` and called as
        `(x [B, T, D], state or None, LayerInputs) -> (x [B, T, D], new state or None)`. Without a state it
        processes the T tokens from scratch (a full forward); with one it continues from it.
      init_state: `(config: TextConfig, batch_size, max_len, dtype) -> ` the layer's empty state, a pytree of
        arrays leading with the row axis `[batch_size, ...]`.
      param_count: `config -> ` the layer's parameters (`text_param_count`, `rftjax.models.param_count`).
      flops_per_token: `(config, mean context length) -> ` the layer's forward FLOPs per token (matmuls only;
        `text_flops_per_token`, MFU).
      activations: `(config, seq, compute dtype bytes) -> (bytes per token while its backward pass runs, bytes per
        token of its matmul outputs)`: the planner's activation estimate (`rftjax.plan`); default the attention
        layer's (`attention_layer_activations`).
    """

    module: type
    init_state: Callable[[TextConfig, int, int, Any], Any]
    param_count: Callable[[TextConfig], int]
    flops_per_token: Callable[[TextConfig, float], float]
    activations: Callable[[TextConfig, int, int], tuple[float, float]] = attention_layer_activations


LAYER_KINDS: dict[str, LayerKind] = {}
"""Decoder layer kinds by name (`TextConfig.layer_pattern` names them); `register_layer_kind` adds one."""


def register_layer_kind(name: str, kind: LayerKind) -> LayerKind:
    """Make `kind` available to `TextConfig.layer_pattern` as `name` (replacing one of that name)."""
    LAYER_KINDS[name] = kind
    return kind


def layer_kind(name: str) -> LayerKind:
    """The registered layer kind `name`.

    Raises:
      ValueError: no such kind (lists the registered ones).
    """
    if name not in LAYER_KINDS:
        raise ValueError(f"TextConfig.layer_pattern names layer kind {name!r}; registered kinds: "
                         f"{sorted(LAYER_KINDS)}")
    return LAYER_KINDS[name]


def _layer_kinds(config: TextConfig) -> list[LayerKind]:
    """The kind of every layer, `[num_layers]`."""
    return [layer_kind(name) for name in config.layer_kinds]


def text_param_count(t: TextConfig) -> int:
    """Parameters of the decoder: embeddings, every layer by its kind, the final norm, the LM head unless tied."""
    emb = t.vocab_size * t.hidden_size
    layers = sum(kind.param_count(t) for kind in _layer_kinds(t))
    return emb + layers + t.hidden_size + (0 if t.tie_word_embeddings else emb)


def text_flops_per_token(t: TextConfig, context_len: float) -> float:
    """Forward FLOPs of the decoder per token at a mean attended context of `context_len` tokens.

    Counts matmuls only (2 FLOPs per multiply-add): every layer by its kind (attention: the weights plus `QK^T`
    and `AV`) and the LM head. The embedding lookup is free. Backward is ~2x forward, so a training step costs
    ~3x this per token (the PaLM/MaxText MFU convention).
    """
    layers = sum(kind.flops_per_token(t, context_len) for kind in _layer_kinds(t))
    return float(layers + 2 * t.hidden_size * t.vocab_size)


def init_state(config: TextConfig, batch_size: int, max_len: int, dtype=jnp.float32,
               scan_layers: bool = False) -> DecoderState:
    """An empty `DecoderState` for `batch_size` rows of up to `max_len` tokens (prompt + generated).

    `scan_layers` must match the model's (`VLMConfig.scan_layers`). Attention layers hold
    `2 * batch_size * max_len * num_kv_heads * head_dim` elements of `dtype` each; other kinds what their
    `LayerKind.init_state` gives.
    """
    pattern = config.layer_pattern
    if scan_layers:
        blocks = config.num_layers // len(pattern)
        stacked = [jax.tree.map(lambda x: jnp.broadcast_to(x, (blocks, *x.shape)),
                                layer_kind(kind).init_state(config, batch_size, max_len, dtype)) for kind in pattern]
        layers = stacked[0] if len(pattern) == 1 else tuple(stacked)
    else:  # a fresh state per layer: no two layers share a buffer (a donated state must not hold one twice)
        layers = tuple(kind.init_state(config, batch_size, max_len, dtype) for kind in _layer_kinds(config))
    return DecoderState(layers=layers, mask=jnp.zeros((batch_size, max_len), bool),
                        next_pos=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32),
                        layer_batch_axis=1 if scan_layers else 0)


class ModelStateMixin:
    """`init_state` and `head` for a model module (`VLM`, `QwenVL`) whose `config` has `text`, `compute_dtype`
    and `scan_layers` and whose decoder is `self.language_model`."""

    def init_state(self, batch_size: int, max_len: int, dtype=None) -> DecoderState:
        """Empty `DecoderState` for this model (see `init_state`); dtype defaults to the compute dtype."""
        c = self.config
        return init_state(c.text, batch_size, max_len, dtype or c.compute_dtype, c.scan_layers)

    def head(self, hidden: Array) -> Array:
        """float32 logits `[..., V]` of the decoder's final hidden states `[..., D]` (`return_hidden=True`
        output): what `__call__` returns as logits, applied to any subset of positions (`rftjax.steps`'s chunked
        log-probs never hold `[N, T, V]`)."""
        return self.language_model.logits(hidden)


def positions_from_mask(attention_mask: Array, start: Array | int = 0) -> Array:
    """Position ids `[B, T]` int32: `start + cumsum(mask) - 1`, clipped at `start` for leading padding.

    `start` is `[B]` or a scalar: the number of real tokens each row already has (0 without a cache).
    """
    m = attention_mask.astype(jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    start = start[:, None] if start.ndim == 1 else start
    return start + jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


def mrope_axes(mrope_section: tuple[int, ...], interleaved: bool = False) -> np.ndarray:
    """Which position axis (0 temporal, 1 height, 2 width) each of the `sum(mrope_section)` rotary frequencies
    takes, int `[hd/2]`.

    Contiguous (Qwen2-VL, HF `apply_multimodal_rotary_pos_emb`): the first `mrope_section[0]` frequencies axis 0,
    the next `mrope_section[1]` axis 1, the rest axis 2. Interleaved (Qwen3-VL, HF
    `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`): frequency j takes axis 1 when `j % 3 == 1` and
    `j < 3 * mrope_section[1]`, axis 2 when `j % 3 == 2` and `j < 3 * mrope_section[2]`, axis 0 otherwise.
    """
    if not interleaved:
        return np.repeat(np.arange(3), mrope_section)
    j = np.arange(sum(mrope_section))
    axis = np.zeros_like(j)
    for a in (1, 2):
        axis[(j % 3 == a) & (j < 3 * mrope_section[a])] = a
    return axis


def apply_rope(x: Array, positions: Array, theta: float, mrope_section: tuple[int, ...] | None = None,
               interleaved: bool = False, rotary_dim: int | None = None) -> Array:
    """Rotary embedding (HF `rotate_half` layout: dims `[0, rd/2)` pair with `[rd/2, rd)`).

    x `[B, T, H, hd]`; positions int `[B, T]` (1-D RoPE) or `[3, B, T]` (M-RoPE: temporal, height, width
    positions; Qwen2-VL, Wang et al. 2024 sec. 2.1). With M-RoPE, rotary frequency `f` (of `rd/2`) takes its
    position from the axis `mrope_axes(mrope_section, interleaved)[f]`; `[B, T]` positions with M-RoPE mean
    all three axes equal (text), which is plain RoPE. `rotary_dim` (rd, default hd): only the first rd dims turn,
    the rest pass (partial rotary, Qwen3.5). Computed in float32, returned in x's dtype.
    """
    hd = x.shape[-1]
    rd = rotary_dim or hd
    if rd < hd:
        return jnp.concatenate([apply_rope(x[..., :rd], positions, theta, mrope_section, interleaved), x[..., rd:]],
                               axis=-1)
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if positions.ndim == 3:
        if mrope_section is None:
            raise ValueError("3-D positions [3, B, T] need mrope_section (TextConfig.mrope_section)")
        axis = mrope_axes(mrope_section, interleaved)  # [hd/2]: which position axis each frequency uses
        pos = jnp.moveaxis(positions.astype(jnp.float32), 0, -1)[..., axis]  # [B, T, hd/2]
        freqs = pos * inv_freq
    else:
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    return rotate(x, freqs)


def rotate(x: Array, angles: Array) -> Array:
    """Rotate x `[B, T, H, hd]` by `angles` float32 `[B, T, hd/2]` (HF `rotate_half` layout: dim i pairs with
    dim `i + hd/2`, both turned by `angles[..., i]`). Computed in float32, returned in x's dtype."""
    hd = x.shape[-1]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : hd // 2], xf[..., hd // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Layers


class DecoderLayer(nn.Module):
    """One attention decoder block (layer kind `"attention"`): `x + attn(rmsnorm(x))`, then
    `x + swiglu(rmsnorm(x))`; with `config.qk_norm` (Qwen3) the queries and keys are RMS-normalised per head
    (`q_norm`, `k_norm`, weights `[head_dim]`) before RoPE. Qwen3.5's gated attention (`attn_output_gate`:
    `q_proj` gives `[query | gate]` per head, the output is scaled by `sigmoid(gate)`; Qiu et al. 2025) with partial
    rotary (`rotary_dim`) and `(1 + w)` norms (`zero_centered_norm`) are switches of the same layer.

    Call: `(x [B, T, D], state, inputs: LayerInputs) -> (x [B, T, D], new state)`. With `state=None` the keys are
    the T new tokens (S = T); otherwise (`{'k', 'v'}: [B, K, S, hd]`) the new keys/values are written at slots
    `[inputs.index, inputs.index + T)` and the query attends over all S slots (padding is masked by
    `inputs.mask`).
    """

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, state, inputs: LayerInputs):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = shard_rows(x)
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", zero_centered=c.zero_centered_norm, **kw)(x)
        q = Linear((c.num_heads, c.head_dim * (2 if c.attn_output_gate else 1)), ("embed", "heads", "head_dim"),
                   use_bias=c.qkv_bias, name="q_proj", **kw)(h)
        if c.attn_output_gate:  # Qwen3.5: [query | gate] per head
            q, gate = q[..., :c.head_dim], q[..., c.head_dim:]
        k = Linear((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=c.qkv_bias,
                   name="k_proj", **kw)(h)
        v = Linear((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=c.qkv_bias,
                   name="v_proj", **kw)(h)
        if c.qk_norm:  # Qwen3: RMSNorm over each head's query and key, before RoPE
            q = RMSNorm(c.rms_norm_eps, name="q_norm", zero_centered=c.zero_centered_norm, **kw)(q)
            k = RMSNorm(c.rms_norm_eps, name="k_norm", zero_centered=c.zero_centered_norm, **kw)(k)
        rope = (inputs.positions, c.rope_theta, c.mrope_section, c.mrope_interleaved, c.rotary_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = k.transpose(0, 2, 1, 3)  # [B, K, T, hd]
        v = v.transpose(0, 2, 1, 3)
        if state is not None:
            start = (0, 0, inputs.index, 0)
            k = jax.lax.dynamic_update_slice(state["k"], k.astype(state["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(state["v"], v.astype(state["v"].dtype), start)
            state = {"k": k, "v": v}
        a = dot_product_attention(q, k.astype(self.dtype), v.astype(self.dtype), inputs.mask)
        if c.attn_output_gate:
            a = a * jax.nn.sigmoid(gate)
        x = x + Linear(c.hidden_size, ("heads", "head_dim", "embed"), num_in=2, use_bias=c.o_bias,
                       name="o_proj", **kw)(a)
        return mlp_block(self, x), state


def mlp_block(layer: nn.Module, x: Array) -> Array:
    """`x + down(silu(gate(h)) * up(h))` with `h = post_attention_layernorm(x)`: the second half of every decoder
    layer kind, its params created in `layer`'s scope (`post_attention_layernorm`, `gate_proj`, `up_proj`,
    `down_proj`). Call it from the layer's compact `__call__` (its submodules attach to the module being called)."""
    c = layer.config
    kw = dict(dtype=layer.dtype, param_dtype=layer.param_dtype)
    h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", zero_centered=c.zero_centered_norm, **kw)(x)
    gate = Linear(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(h)
    up = Linear(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(h)
    return x + Linear(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(nn.silu(gate) * up)


def _kv_state(config: TextConfig, batch_size: int, max_len: int, dtype) -> dict:
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


register_layer_kind("attention", LayerKind(DecoderLayer, _kv_state, attention_layer_params, attention_layer_flops))


class DecoderBlock(nn.Module):
    """One repeat of `config.layer_pattern` (its layers in order, params under `{kind}_{j}`): the unit
    `DecoderLM` scans when the pattern has several kinds (MaxText's scannable block).

    Call: `(x [B, T, D], states (tuple, one per layer of the pattern) or None, inputs) -> (x, new states)`.
    """

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    remat_policy: Any = None

    @nn.compact
    def __call__(self, x, states, inputs: LayerInputs):
        new = []
        for j, kind in enumerate(self.config.layer_pattern):
            cls = _layer_class(kind, self.remat, self.remat_policy, prevent_cse=False)
            x, s = cls(self.config, self.dtype, self.param_dtype, name=f"{kind}_{j}")(
                x, None if states is None else states[j], inputs)
            new.append(s)
        return x, tuple(new)


def _layer_class(kind: str, remat: bool, policy, prevent_cse: bool):
    cls = layer_kind(kind).module
    return nn.remat(cls, prevent_cse=prevent_cse, policy=policy) if remat else cls


class DecoderLM(nn.Module):
    """Decoder-only LM over a pattern of layer kinds (`config.layer_pattern`, repeated to `num_layers`).

    Call: `(input_ids int [B, T] | None, attention_mask [B, T], inputs_embeds [B, T, D] | None,
    state: DecoderState | None, return_hidden=False, positions=None, deepstack: DeepStack | None = None)` ->
    `ModelOutput`: logits float32
    `[B, T, V]` (or, with `return_hidden`, the final normalised hidden states `[B, T, D]` and no logits), and the
    new state when given one. Give exactly one of `input_ids` / `inputs_embeds` (the VLM passes embeddings with
    image features merged in; use `embed` to get token embeddings).

    Attention: query t sees key s iff s is at or before t and s is a real token (mask). With a state, the T
    new tokens are appended at slots `[state.index, state.index + T)`, their positions continue from
    `state.next_pos`, and masked (padding) new tokens are never attended to later; recurrent layer kinds skip
    them.

    Positions: by default `cumsum(mask) - 1` from `state.next_pos` (left padding does not shift them). Explicit
    `positions` int `[B, T]` or `[3, B, T]` (M-RoPE, see `apply_rope`) override that; the state then records
    `next_pos = max(position) + 1` over each row's real tokens, so the text decoded after a Qwen-VL prompt
    continues from its largest 3-D position: `next_pos` plays the role of HF's `rope_deltas`
    (`next_pos = cache length + rope_delta`).

    Layer params live under `layers_{i}`; with `scan_layers`, under one stacked `layers` (a single-kind pattern
    scans the layer itself, so its params keep the layer's names; a pattern of several kinds scans a
    `DecoderBlock`, params under `layers/{kind}_{j}`).
    """

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    remat: bool = False
    remat_policy: Any = None

    def setup(self):
        c = self.config
        self.embed_tokens = self.param(
            "embed_tokens", nn.with_logical_partitioning(normal_init(), ("vocab", "embed")),
            (c.vocab_size, c.hidden_size), self.param_dtype)
        pattern = c.layer_pattern
        if self.scan_layers:  # one unit, scanned in __call__ (`_scan_layers`)
            if len(pattern) == 1:
                self.layers = _layer_class(pattern[0], self.remat, self.remat_policy, prevent_cse=False)(
                    c, self.dtype, self.param_dtype)
            else:
                self.layers = DecoderBlock(c, self.dtype, self.param_dtype, self.remat, self.remat_policy)
        else:
            self.layers = [_layer_class(kind, self.remat, self.remat_policy, prevent_cse=True)(
                c, self.dtype, self.param_dtype, name=f"layers_{i}") for i, kind in enumerate(c.layer_kinds)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, zero_centered=c.zero_centered_norm)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, ("embed", "vocab"), dtype=self.dtype, param_dtype=self.param_dtype,
                                  out_dtype=jnp.float32)

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings `[B, T, D]` (compute dtype) of int ids `[B, T]`."""
        return jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)

    def _scan_layers(self, x, layer_states, inputs: LayerInputs, deepstack: DeepStack | None):
        """The scanned unit over the `num_layers / len(layer_pattern)` blocks (params stacked on axis 0); the carry
        holds the block index so DeepStack can add its level after block j (single-kind patterns: layer j)."""
        if deepstack is not None and len(self.config.layer_pattern) > 1:
            raise ValueError("DeepStack needs a single-kind layer_pattern when scan_layers is on")

        def body(unit, carry, states, inputs):
            x, i = carry
            x, new = unit(x, states, inputs)
            if deepstack is not None:
                x = deepstack.after_layer(x, i)
            return (x, i + 1), new

        scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(0, nn.broadcast),
                       length=self.config.num_layers // len(self.config.layer_pattern),
                       metadata_params={nn.PARTITION_NAME: "layers"})
        (x, _), new_layers = scan(self.layers, (x, jnp.zeros((), jnp.int32)), layer_states, inputs)
        return x, new_layers

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None, state: DecoderState | None = None,
                 return_hidden: bool = False, positions: Array | None = None,
                 deepstack: DeepStack | None = None) -> ModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        explicit = positions is not None
        if state is None:
            positions = positions_from_mask(attention_mask) if positions is None else positions
            key_valid, index, layer_states = attention_mask, jnp.zeros((), jnp.int32), None
            key_slot = jnp.arange(t)
        else:
            positions = positions_from_mask(attention_mask, state.next_pos) if positions is None else positions
            index = state.index
            key_valid = jax.lax.dynamic_update_slice(state.mask, attention_mask, (0, index))
            key_slot = jnp.arange(state.max_len) - index  # slot relative to the first new token
            layer_states = state.layers
        causal = key_slot[None, :] <= jnp.arange(t)[:, None]  # [T, S]
        inputs = LayerInputs(positions=positions, mask=causal[None] & key_valid[:, None, :],
                             token_mask=attention_mask, index=index)

        if self.scan_layers:
            x, new_layers = self._scan_layers(x, layer_states, inputs, deepstack)
        else:
            new_layers = []
            for i, layer in enumerate(self.layers):
                x, s = layer(x, None if layer_states is None else layer_states[i], inputs)
                if deepstack is not None:
                    x = deepstack.after_layer(x, i)
                new_layers.append(s)
            new_layers = tuple(new_layers)
        x = self.norm(x)
        new_state = None
        if state is not None:
            if explicit:  # the largest position of each row's real tokens, + 1 (rows without any keep theirs)
                top = positions.max(0) if positions.ndim == 3 else positions
                next_pos = jnp.maximum(state.next_pos, jnp.max(jnp.where(attention_mask, top + 1, 0), axis=1))
            else:
                next_pos = state.next_pos + attention_mask.sum(1)
            new_state = state.replace(layers=new_layers, mask=key_valid, next_pos=next_pos.astype(jnp.int32),
                                      index=index + t)
        if return_hidden:  # final hidden states [B, T, D] (e.g. for a value head), no LM head
            return ModelOutput(state=new_state, hidden=x)
        return ModelOutput(logits=self.logits(x), state=new_state)

    def logits(self, hidden: Array) -> Array:
        """The LM head: float32 logits `[..., V]` of final hidden states `[..., D]` (the tied embedding table or
        `lm_head`; compute-dtype inputs, float32 accumulation)."""
        if self.config.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", hidden.astype(self.dtype), self.embed_tokens.astype(self.dtype),
                              preferred_element_type=jnp.float32)
        return self.lm_head(hidden)

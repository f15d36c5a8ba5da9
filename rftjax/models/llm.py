"""Llama/Qwen2-style decoder LM with an explicit KV cache.

RMSNorm, rotary position embeddings (RoPE, `rotate_half` convention of HF Llama), grouped-query attention,
SwiGLU MLP, optional tied embeddings and attention biases. Sources: Touvron et al. 2023 (Llama), Su et al.
2021 (RoFormer, RoPE), Ainslie et al. 2023 (GQA); numerics follow transformers' `modeling_llama.py` and
`modeling_qwen2.py`.

Positions are always derived from the attention mask (`cumsum(mask) - 1`), so left-padded batches put
every row's first real token at position 0, as HF `generate` does.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rftjax.models.common import Linear, RMSNorm, dot_product_attention, normal_init
from rftjax.models.config import TextConfig

Array = jax.Array


# ----------------------------------------------------------------------------------------------------------
# KV cache


@flax.struct.dataclass
class KVCache:
    """Decoding state of the decoder: keys/values of every layer plus per-row bookkeeping.

    Attributes:
      layers: per-layer `{'k': [B, K, S, hd], 'v': [B, K, S, hd]}` dicts (heads-major: attention reads the
        cache without transposing it) (a tuple, one per layer), or, when
        the model scans its layers, one such dict with a leading `[L]` axis on every array.
      mask: bool `[B, S]`, True where a slot holds a real (non-padding) token.
      next_pos: int32 `[B]`, the position id the next real token of each row gets (= real tokens so far).
      index: int32 `[]`, number of slots written (the next write starts here); the same for all rows.
    """

    layers: Any
    mask: Array
    next_pos: Array
    index: Array

    @property
    def max_len(self) -> int:
        """Number of slots S."""
        return self.mask.shape[1]

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated `n` times in place (rows `b*n .. b*n+n-1` copy row b): `B` rows become `B*n`.

        Used to decode G samples of a group from one prefilled prompt. Works for both layouts of `layers`
        (per-layer `[B, K, S, hd]`, or `[L, B, K, S, hd]` when the layers are scanned).
        """
        return self._map_rows(lambda x, axis: jnp.repeat(x, n, axis=axis))

    def take(self, rows: Array) -> "KVCache":
        """The cache of rows `rows` (int `[M]`, indices into `[B]`, in that order): `B` rows become `M` (the
        sampler drops finished rows with it)."""
        return self._map_rows(lambda x, axis: jnp.take(x, rows, axis=axis))

    def _map_rows(self, fn) -> "KVCache":
        """`fn(array, batch_axis)` applied to every per-row array (both layouts of `layers`: per-layer
        `[B, K, S, hd]`, or `[L, B, K, S, hd]` when the layers are scanned); `index` is shared by all rows."""
        batch_axis = 1 if isinstance(self.layers, dict) else 0  # a dict of stacked arrays: the scanned layout
        return self.replace(layers=jax.tree.map(lambda x: fn(x, batch_axis), self.layers), mask=fn(self.mask, 0),
                            next_pos=fn(self.next_pos, 0))


def init_cache(config: TextConfig, batch_size: int, max_len: int, dtype=jnp.float32,
               scan_layers: bool = False) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens (prompt + generated).

    `scan_layers` must match the model's (`VLMConfig.scan_layers`). Memory:
    `2 * num_layers * batch_size * max_len * num_kv_heads * head_dim` elements of `dtype`.
    """
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    if scan_layers:
        full = (config.num_layers, *shape)
        layers = {"k": jnp.zeros(full, dtype), "v": jnp.zeros(full, dtype)}
    else:
        layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                       for _ in range(config.num_layers))
    return KVCache(layers=layers, mask=jnp.zeros((batch_size, max_len), bool),
                   next_pos=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32))


class ModelCacheMixin:
    """`init_cache` for a model module (`VLM`, `QwenVL`) whose `config` has `text`, `compute_dtype` and
    `scan_layers`."""

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """Empty `KVCache` for this model (see `init_cache`); dtype defaults to the compute dtype."""
        c = self.config
        return init_cache(c.text, batch_size, max_len, dtype or c.compute_dtype, c.scan_layers)


def positions_from_mask(attention_mask: Array, start: Array | int = 0) -> Array:
    """Position ids `[B, T]` int32: `start + cumsum(mask) - 1`, clipped at `start` for leading padding.

    `start` is `[B]` or a scalar: the number of real tokens each row already has (0 without a cache).
    """
    m = attention_mask.astype(jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    start = start[:, None] if start.ndim == 1 else start
    return start + jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


def apply_rope(x: Array, positions: Array, theta: float, mrope_section: tuple[int, ...] | None = None) -> Array:
    """Rotary embedding (HF `rotate_half` layout: dims `[0, hd/2)` pair with `[hd/2, hd)`).

    x `[B, T, H, hd]`; positions int `[B, T]` (1-D RoPE) or `[3, B, T]` (M-RoPE: temporal, height, width
    positions; Qwen2-VL, Wang et al. 2024 sec. 2.1). With M-RoPE, rotary frequency `f` (of `hd/2`) takes its
    position from axis 0 for the first `mrope_section[0]` frequencies, axis 1 for the next `mrope_section[1]`
    and axis 2 for the rest, as HF's `apply_multimodal_rotary_pos_emb`; `[B, T]` positions with M-RoPE mean
    all three axes equal (text), which is plain RoPE. Computed in float32, returned in x's dtype.
    """
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if positions.ndim == 3:
        if mrope_section is None:
            raise ValueError("3-D positions [3, B, T] need mrope_section (TextConfig.mrope_section)")
        axis = np.repeat(np.arange(3), mrope_section)  # [hd/2]: which position axis each frequency uses
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
    """One decoder block: `x + attn(rmsnorm(x))`, then `x + swiglu(rmsnorm(x))`.

    Call: `(x [B, T, D], layer_cache, positions [B, T] or [3, B, T], mask [B, T, S], cache_index [])`
    -> `(x [B, T, D], new layer_cache)`. With `layer_cache=None` the keys are the T new tokens (S = T);
    otherwise the new keys/values are written at slots `[cache_index, cache_index + T)` and the query
    attends over all S cached slots.
    """

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, positions, mask, cache_index):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        q = Linear((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), use_bias=c.qkv_bias,
                   name="q_proj", **kw)(h)
        k = Linear((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=c.qkv_bias,
                   name="k_proj", **kw)(h)
        v = Linear((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), use_bias=c.qkv_bias,
                   name="v_proj", **kw)(h)
        q = apply_rope(q, positions, c.rope_theta, c.mrope_section)
        k = apply_rope(k, positions, c.rope_theta, c.mrope_section).transpose(0, 2, 1, 3)  # [B, K, T, hd]
        v = v.transpose(0, 2, 1, 3)
        if layer_cache is not None:
            start = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
            layer_cache = {"k": k, "v": v}
        a = dot_product_attention(q, k.astype(self.dtype), v.astype(self.dtype), mask)
        x = x + Linear(c.hidden_size, ("heads", "head_dim", "embed"), num_in=2, use_bias=c.o_bias,
                       name="o_proj", **kw)(a)
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        gate = Linear(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(h)
        up = Linear(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(h)
        x = x + Linear(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(nn.silu(gate) * up)
        return x, layer_cache


class DecoderLM(nn.Module):
    """Decoder-only LM.

    Call: `(input_ids int [B, T] | None, attention_mask [B, T], inputs_embeds [B, T, D] | None,
    cache: KVCache | None, return_hidden=False, positions=None)` -> `(logits float32 [B, T, V], new cache |
    None)`; with `return_hidden` (no cache) the final normalised hidden states `[B, T, D]` instead of logits.
    Give exactly one of `input_ids` / `inputs_embeds` (the VLM passes embeddings with image features merged
    in; use `embed` to get token embeddings).

    Attention: query t sees key s iff s is at or before t and s is a real token (mask). With a cache, the T
    new tokens are appended at slots `[cache.index, cache.index + T)`, their positions continue from
    `cache.next_pos`, and masked (padding) new tokens are never attended to later.

    Positions: by default `cumsum(mask) - 1` from `cache.next_pos` (left padding does not shift them). Explicit
    `positions` int `[B, T]` or `[3, B, T]` (M-RoPE, see `apply_rope`) override that; the cache then records
    `next_pos = max(position) + 1` over each row's real tokens, so the text decoded after a Qwen-VL prompt
    continues from its largest 3-D position: `next_pos` plays the role of HF's `rope_deltas`
    (`next_pos = cache length + rope_delta`).

    Layer params live under `layers_{i}` (or one stacked `layers` when `scan_layers`).
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
        layer_cls = DecoderLayer
        if self.remat:
            layer_cls = nn.remat(layer_cls, prevent_cse=not self.scan_layers, policy=self.remat_policy)
        if self.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.dtype, self.param_dtype)
        else:
            self.layers = [layer_cls(c, self.dtype, self.param_dtype, name=f"layers_{i}")
                           for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, ("embed", "vocab"), dtype=self.dtype, param_dtype=self.param_dtype,
                                  out_dtype=jnp.float32)

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings `[B, T, D]` (compute dtype) of int ids `[B, T]`."""
        return jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None, cache: KVCache | None = None,
                 return_hidden: bool = False, positions: Array | None = None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        explicit = positions is not None
        if cache is None:
            positions = positions_from_mask(attention_mask) if positions is None else positions
            key_valid, index, layer_caches = attention_mask, jnp.zeros((), jnp.int32), None
            key_slot = jnp.arange(t)
        else:
            positions = positions_from_mask(attention_mask, cache.next_pos) if positions is None else positions
            index = cache.index
            key_valid = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
            key_slot = jnp.arange(cache.max_len) - index  # slot relative to the first new token
            layer_caches = cache.layers
        causal = key_slot[None, :] <= jnp.arange(t)[:, None]  # [T, S]
        mask = causal[None] & key_valid[:, None, :]  # [B, T, S]

        if self.scan_layers:
            x, new_layers = self.layers(x, layer_caches, positions, mask, index)
        else:
            new_layers = []
            for i, layer in enumerate(self.layers):
                x, lc = layer(x, None if layer_caches is None else layer_caches[i], positions, mask, index)
                new_layers.append(lc)
            new_layers = tuple(new_layers)
        x = self.norm(x)
        if return_hidden:  # final hidden states [B, T, D] (e.g. for a value head), no LM head
            return x, None
        if self.config.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, self.embed_tokens.astype(self.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x)
        if cache is None:
            return logits, None
        if explicit:  # the largest position of each row's real tokens, + 1 (rows without any keep theirs)
            top = positions.max(0) if positions.ndim == 3 else positions
            next_pos = jnp.maximum(cache.next_pos, jnp.max(jnp.where(attention_mask, top + 1, 0), axis=1))
        else:
            next_pos = cache.next_pos + attention_mask.sum(1)
        new_cache = KVCache(layers=new_layers, mask=key_valid, next_pos=next_pos.astype(jnp.int32), index=index + t)
        return logits, new_cache

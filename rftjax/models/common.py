"""Building blocks shared by the vision encoder and the decoder LM.

Everything here is a pure function or a small Linen module. Matmuls take inputs in the compute dtype and
accumulate in float32 (`preferred_element_type=float32`): on CPUs with AMX and on TPUs/GPUs that is both the
fast path and the accurate one. Softmax and normalisation statistics are always float32.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

Array = jax.Array
# Large negative finite value for masked attention scores. A fully masked query row (a left-padding
# position) then gets a uniform distribution instead of NaN; its output is never used.
MASK_VALUE = float(np.finfo(np.float32).min)


_ROW_MESH: contextvars.ContextVar = contextvars.ContextVar("rftjax_row_mesh", default=None)


@contextlib.contextmanager
def rows_over(mesh: jax.sharding.Mesh | None):
    """While tracing inside this context, `shard_rows` lays activations' rows over `mesh`'s `data x fsdp` axes
    (None: no constraint). A trace-time setting: enter it inside the function `jax.jit` traces."""
    token = _ROW_MESH.set(mesh)
    try:
        yield
    finally:
        _ROW_MESH.reset(token)


def mesh_of(shardings) -> jax.sharding.Mesh | None:
    """The mesh of the first `NamedSharding` leaf of `shardings` (a pytree of shardings, or None); None without
    one (single device, or shardings left to XLA)."""
    leaves = jax.tree.leaves(shardings)
    return getattr(leaves[0], "mesh", None) if leaves else None


def shard_rows(x: Array, mesh: jax.sharding.Mesh | None = None) -> Array:
    """`x` `[B, ...]` constrained to rows over the `data x fsdp` axes of `mesh` (default: the `rows_over` context's);
    unchanged without a mesh or when those axes do not divide B. The decoder layers and vision blocks call it on
    their inputs: under FSDP, XLA's sharding propagation may otherwise shard activations along the hidden
    dimension (the params' FSDP axis) and keep every row on every device."""
    mesh = mesh or _ROW_MESH.get()
    if mesh is None or not x.ndim or x.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))


def vocab_shards(vocab: int) -> int:
    """How many devices `split_vocab` spreads a vocabulary of `vocab` over: all of the `rows_over` context's mesh
    when its size divides `vocab`, else 1 (also without a mesh)."""
    mesh = _ROW_MESH.get()
    return 1 if mesh is None or vocab % mesh.size else mesh.size


def split_vocab(hidden: Array, head, vocab: int) -> Array:
    """Vocabulary-parallel LM head: float32 logits `head(hidden)` `[..., V]` (V = `vocab`, the head's output size) of
    hidden states `[..., D]` with every row on every device and V split over all devices of the `rows_over` context's mesh (Megatron-LM's parallel
    cross-entropy, MaxText's vocabulary tiling): each device computes its slice of the vocabulary for all rows, and
    the rows' hidden states (small) are gathered instead of the head's weight; with the head's params laid out
    by `split_vocab_params`, its gradient stays in each device's shard. Unchanged `head(hidden)` when
    `vocab_shards` is 1."""
    mesh = _ROW_MESH.get()
    if vocab_shards(vocab) == 1:
        return head(hidden)
    spec = lambda *axes: jax.sharding.NamedSharding(mesh, PartitionSpec(*axes))  # noqa: E731
    logits = head(jax.lax.with_sharding_constraint(hidden, spec()))
    return jax.lax.with_sharding_constraint(logits, spec(*[None] * (logits.ndim - 1), tuple(mesh.axis_names)))


def split_vocab_params(params, vocab: int):
    """`params` with every leaf that has a dim of size `vocab` (the LM head's weight, a tied embedding table)
    laid out with that dim over all devices of the `rows_over` context's mesh, the other dims whole: the layout
    `split_vocab`'s logits need (one re-layout per pass, never a gather of the weight; the head's gradient is
    accumulated in it). Unchanged when `vocab_shards(vocab)` is 1."""
    if vocab_shards(vocab) == 1:
        return params
    mesh = _ROW_MESH.get()

    def place(x):
        if vocab not in x.shape:
            return x
        spec = [None] * x.ndim
        spec[x.shape.index(vocab)] = tuple(mesh.axis_names)
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, PartitionSpec(*spec)))

    return jax.tree.map(place, params)


def normal_init(std: float = 0.02):
    """`jax.nn.initializers.normal(std)`: the init HF uses for LLaVA/Llama/SigLIP linear layers."""
    return jax.nn.initializers.normal(std)


class Linear(nn.Module):
    """Dense layer contracting the last `len(in_axes)` input dims with a kernel of shape `[*in, *out]`.

    Attributes:
      features: output dims, e.g. `(num_heads, head_dim)` for a query projection.
      kernel_axes: logical axis names of the kernel, one per kernel dim (input dims first), used by
        `rftjax.sharding` to shard it.
      num_in: how many trailing input dims are contracted (2 for an output projection `[.., H, hd] -> D`).
      use_bias: add a bias of shape `features` (logical axes: the kernel's output axes).
      dtype: compute dtype; inputs and kernel are cast to it, accumulation is float32, the output has `dtype`.
      param_dtype: storage dtype of the parameters (float32 by default).
      out_dtype: output dtype (default `dtype`); float32 for logits.

    Input `[..., *in]`, output `[..., *features]`.
    """

    features: Sequence[int] | int
    kernel_axes: Sequence[str | None]
    num_in: int = 1
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = normal_init()
    out_dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.num_in:]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
            (*in_shape, *features),
            self.param_dtype,
        )
        contract = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (contract, ((), ())),
            preferred_element_type=jnp.float32,
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(self.kernel_axes[self.num_in:])),
                features,
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.out_dtype or self.dtype)


def _norm_param(module: nn.Module, name: str, init, d: int) -> Array:
    """A `[d]` normalisation parameter (logical axis `norm`, replicated), read as float32."""
    return module.param(name, nn.with_logical_partitioning(init, ("norm",)), (d,), module.param_dtype).astype(
        jnp.float32)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias (SigLIP), statistics in float32. Input/output `[..., D]`."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _norm_param(self, "scale", nn.initializers.ones_init(), x.shape[-1])
        bias = _norm_param(self, "bias", nn.initializers.zeros_init(), x.shape[-1])
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        return ((xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm as in Llama/Qwen2 (`x / rms(x) * scale`, statistics in float32). Input/output `[..., D]`.
    `zero_centered` (Qwen3.5's `Qwen3_5RMSNorm`): `x / rms(x) * (1 + scale)` with `scale` initialised to 0."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    zero_centered: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros_init() if self.zero_centered else nn.initializers.ones_init()
        scale = _norm_param(self, "scale", init, x.shape[-1])
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + scale if self.zero_centered else scale)).astype(self.dtype)


# Query rows per kv head up to which attention scores are a multiply-reduce rather than a batched matmul: at
# decode shapes XLA CPU runs `[B, K]` batches of `[r, hd] @ [hd, S]` GEMMs with r = 2 at a fraction of the
# memory bandwidth (0.7 ms per layer at B=32, S=170 in experiments/bench_qwen_vl.py).
_FEW_QUERIES = 8


def _pad_rows(x: Array, block: int, value=0) -> Array:
    """`x` `[B, T, ...]` padded with `value` along T to a multiple of `block`."""
    pad = -x.shape[1] % block
    return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=value) if pad else x


def _over_query_blocks(one_block, block: int, length: int) -> Array:
    """`one_block(start)` (`[B, block, ...]`, the outputs of the queries `[start, start + block)`) over the blocks
    of `length` queries, one at a time (`lax.map`) under `jax.checkpoint` (the backward pass recomputes a block's
    scores instead of storing them), concatenated to `[B, length, ...]`."""
    nb = -(-length // block)
    out = jax.lax.map(jax.checkpoint(one_block), jnp.arange(nb) * block)  # [nb, B, block, ...]
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape(out.shape[0], nb * block, *out.shape[3:])[:, :length]


QUERY_BLOCK = 256
"""Queries per block of the XLA attention when T is longer: float32 scores `[B, H, 256, S]` at a time."""


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, implementation: str | None = None) -> Array:
    """Multi-head / grouped-query scaled dot-product attention.

    Args:
      q: queries `[B, T, H, hd]`.
      k, v: keys and values `[B, K, S, hd]` (heads-major, the KV-cache layout: both matmuls then have
        their batch dims `(B, K)` leading and need no transpose of the cache), `H % K == 0`; query head `h`
        uses kv head `h // (H // K)`, the grouping of HF's `repeat_kv`.
      mask: bool `[B, T, S]`, True where query t may attend to key s.
      implementation: `"xla"` (the einsums below), `"jax"` (`jax.nn.dot_product_attention`: cuDNN's fused flash
        attention on GPUs where it applies, XLA otherwise); None picks `"jax"` on GPUs for more than
        `_FEW_QUERIES` query rows per kv head (prefill, training) and `"xla"` otherwise.

    Returns:
      `[B, T, H, hd]` in q's dtype. Scores and softmax are float32; scale is `hd ** -0.5`. In XLA, T over
      `QUERY_BLOCK` runs one block of queries at a time under `jax.checkpoint` (`[B, H, T, S]` scores never
      exist, and the backward pass recomputes a block's instead of storing them).
    """
    b, t, h, hd = q.shape
    kvh, s = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"num_heads={h} is not a multiple of num_kv_heads={kvh}")
    r = h // kvh
    if implementation is None:
        implementation = "jax" if jax.default_backend() == "gpu" and r * t > _FEW_QUERIES else "xla"
    if implementation == "jax":
        out = jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3).astype(q.dtype),
                                           v.transpose(0, 2, 1, 3).astype(q.dtype), mask=mask[:, None])
        return out.astype(q.dtype)
    if implementation != "xla":
        raise ValueError(f"attention implementation {implementation!r}: choose xla or jax")
    if t > QUERY_BLOCK:  # long prefill / training: one block of queries at a time, recomputed in the backward pass
        qp, mp = _pad_rows(q, QUERY_BLOCK), _pad_rows(mask, QUERY_BLOCK)

        def one_block(start):
            rows = lambda x: jax.lax.dynamic_slice_in_dim(x, start, QUERY_BLOCK, axis=1)  # noqa: E731
            return dot_product_attention(rows(qp), k, v, rows(mp), "xla")

        return _over_query_blocks(one_block, QUERY_BLOCK, t)
    qg = q.reshape(b, t, kvh, r, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, r * t, hd)
    if r * t <= _FEW_QUERIES:  # decode: one broadcast multiply-reduce instead of B*K tiny GEMMs
        scores = jnp.sum(qg[:, :, :, None, :].astype(jnp.float32) * k[:, :, None, :, :].astype(jnp.float32), -1)
    else:
        scores = jnp.einsum("bkqd,bksd->bkqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores.reshape(b, kvh, r, t, s), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, kvh, r * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, kvh, r, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd).astype(q.dtype)


FULL_ATTENTION_BLOCK = 256
"""Queries per block of a vision tower's full attention (`segment_attention`): scores `[B, H, 256, P]`."""


def segment_attention(q: Array, k: Array, v: Array, segments: Array, block: int, band: bool = False) -> Array:
    """Attention within segments, one block of queries at a time: no `[P, P]` scores or mask ever exist.

    Args:
      q, k, v: `[B, P, H, hd]` (self-attention: queries and keys are the same P positions).
      segments: int `[B, P]`: position p attends to the positions of its own segment (a vision tower's frame or
        window); -1 marks padding, never attended to (a padding query gets an output that must not be used).
      block: queries per block (P is padded up to a multiple of it).
      band: the segments are contiguous runs of at most `block` positions (windows sorted into window order):
        a query block then attends to its own block and the two next to it only (`[block, 3 block]` scores),
        the FLOPs of windowed attention up to a factor 3. Otherwise each query block attends to all P keys.

    Returns:
      `[B, P, H, hd]` in q's dtype. Scores and softmax in float32, scale `hd ** -0.5`; each block runs under
      `jax.checkpoint`, so its scores are recomputed in the backward pass instead of stored (the flash-attention
      trade, in XLA).
    """
    p, hd = q.shape[1], q.shape[3]
    q, k, v = (_pad_rows(x, block) for x in (q, k, v))
    segments = _pad_rows(segments, block, -1)
    if band:  # keys of block i: blocks i-1, i, i+1 (zero blocks of padding at both ends)
        edge = ((0, 0), (block, block), (0, 0), (0, 0))
        k, v = jnp.pad(k, edge), jnp.pad(v, edge)
        key_segments = jnp.pad(segments, ((0, 0), (block, block)), constant_values=-1)

    def one_block(start):
        qb = jax.lax.dynamic_slice_in_dim(q, start, block, axis=1)
        sq = jax.lax.dynamic_slice_in_dim(segments, start, block, axis=1)
        if band:
            kb, vb = (jax.lax.dynamic_slice_in_dim(x, start, 3 * block, axis=1) for x in (k, v))
            sk = jax.lax.dynamic_slice_in_dim(key_segments, start, 3 * block, axis=1)
        else:
            kb, vb, sk = k, v, segments
        scores = jnp.einsum("bqhd,bkhd->bhqk", qb, kb, preferred_element_type=jnp.float32) * (hd ** -0.5)
        allowed = (sq[:, :, None] == sk[:, None, :]) & (sk[:, None, :] >= 0)
        probs = jax.nn.softmax(jnp.where(allowed[:, None], scores, MASK_VALUE), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(vb.dtype), vb, preferred_element_type=jnp.float32)

    return _over_query_blocks(one_block, block, p).astype(q.dtype)


def merge_image_features(embeds: Array, is_image: Array, features: Array) -> Array:
    """Token embeddings `[B, T, D]` with the image placeholders (`is_image` bool `[B, T]`) replaced by the row's
    image features `[B, P, D]` in order: the j-th placeholder of row b takes `features[b, j]`. Equals HF's
    `masked_scatter` whenever each row holds as many placeholders as its image has features."""
    idx = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features.astype(embeds.dtype), idx[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, embeds)


def gelu_tanh(x: Array) -> Array:
    """GELU with the tanh approximation (HF `gelu_pytorch_tanh`, SigLIP's MLP)."""
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: Array) -> Array:
    """Exact (erf) GELU (HF `gelu`, the LLaVA projector)."""
    return jax.nn.gelu(x, approximate=False)


def local_rows(x) -> np.ndarray:
    """`x` as numpy, or, for a global `jax.Array` that spans other processes' devices, the rows `[b, ...]` this
    process holds (its addressable shards in row order): host-side input checks of a multi-process run check
    each process's own rows."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        blocks = {s.index[0].start or 0: s.data for s in x.addressable_shards}
        return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])
    return np.asarray(x)

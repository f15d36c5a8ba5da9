"""Gated DeltaNet: Qwen3.5's linear-attention decoder layer (layer kind `"gated_delta_net"`).

Sources: Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (eq. 10: the
gated delta rule `S_t = S_{t-1} (a_t (I - b_t k_t k_t^T)) + b_t v_t k_t^T`, o_t = S_t q_t); the chunked (WY / UT
transform) form of Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length". Numerics and tensor layout follow transformers' `modeling_qwen3_5.py` (`Qwen3_5GatedDeltaNet`,
`torch_chunk_gated_delta_rule`, `torch_recurrent_gated_delta_rule`).

Per token: `in_proj_qkv` gives queries and keys (`linear_num_key_heads` heads of `linear_key_head_dim`) and
values (`linear_num_value_heads` heads of `linear_value_head_dim`), passed through a causal depthwise
convolution of `linear_conv_kernel` taps and SiLU; `beta = sigmoid(in_proj_b x)`, the log-decay
`g = -exp(A_log) * softplus(in_proj_a x + dt_bias)`; q and k are L2-normalised (q also scaled by
`dk ** -0.5`) and each query/key head serves `Hv / Hk` consecutive value heads. The delta rule runs in float32:
chunked (64 tokens per chunk, a `lax.scan` over chunks) for a prefill or a training pass, token by token for a
one-token decode step. The output passes a gated RMSNorm (`norm(o) * silu(z)`, `z = in_proj_z x`) and `out_proj`.

Decode state per layer: `conv` `[B, C, K-1]` (the last K-1 inputs of the convolution, compute dtype; C = 2 Hk dk +
Hv dv) and `recurrent` `[B, Hv, dk, dv]` (float32). Padding tokens have their inputs zeroed before the layer (as HF
does) and no decay, so left padding never reaches the state; a padding token inside a sequence still shifts a
zero into the convolution window (the sampler never feeds one).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rftjax.models.common import Linear, RMSNorm, shard_rows
from rftjax.models.config import TextConfig, mlp_activations
from rftjax.models.llm import LayerInputs, LayerKind, mlp_block, register_layer_kind

Array = jax.Array

CHUNK = 64
"""Tokens per chunk of the chunked delta rule (HF's `chunk_size`)."""


def l2norm(x: Array, eps: float = 1e-6) -> Array:
    """`x / sqrt(sum(x^2) + eps)` over the last axis (HF / flash-linear-attention's `l2norm`)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def recurrent_delta_rule(q: Array, k: Array, v: Array, g: Array, beta: Array, state: Array) -> tuple[Array, Array]:
    """The gated delta rule token by token (HF `torch_recurrent_gated_delta_rule`).

    Args:
      q, k: float32 `[B, T, H, dk]` (normalised, q scaled); v: float32 `[B, T, H, dv]`; g (log decay, <= 0),
        beta: float32 `[B, T, H]`; state: float32 `[B, H, dk, dv]`.

    Returns:
      `(out float32 [B, T, H, dv], final state [B, H, dk, dv])`.
    """
    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t = xs
        s = s * jnp.exp(g_t)[..., None, None]
        kv_mem = jnp.einsum("bhkv,bhk->bhv", s, k_t)
        s = s + jnp.einsum("bhk,bhv->bhkv", k_t, (v_t - kv_mem) * b_t[..., None])
        return s, jnp.einsum("bhkv,bhk->bhv", s, q_t)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
    state, out = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(out, 0, 1), state


@jax.custom_vjp
def unit_lower_inverse(a: Array) -> Array:
    """`(I + L)^-1` for L the strictly lower triangle of `a` `[..., C, C]`, by forward substitution over the C rows
    (HF `torch_chunk_gated_delta_rule`'s export path): row i becomes `row_i + row_i @ M` with the rows above it
    already final. Matmuls only (no LAPACK call: XLA:CPU's triangular solve deadlocked in the backward pass at
    batch 32 here, jax 0.10.2).

    Its gradient is the matrix inverse's, `dL = -X^T dX X^T` on the strictly lower triangle (X the result; Giles
    2008, "Collected matrix derivative results", sec. 2.2.3): two matmuls, where differentiating the substitution
    loop would keep the whole `[..., C, C]` matrix once per row (C copies: 0.5 GB per row and DeltaNet layer at
    Qwen3.5-2B's widths and 1,024 tokens)."""
    c = a.shape[-1]

    def body(i, m):
        row = jax.lax.dynamic_index_in_dim(m, i, axis=-2)  # [..., 1, C]: zero at and right of the diagonal
        return jax.lax.dynamic_update_index_in_dim(m, row + row @ m, i, axis=-2)

    return jax.lax.fori_loop(1, c, body, -jnp.tril(a, -1)) + jnp.eye(c, dtype=a.dtype)


def _unit_lower_inverse_fwd(a: Array) -> tuple[Array, Array]:
    x = unit_lower_inverse(a)
    return x, x


def _unit_lower_inverse_bwd(x: Array, g: Array) -> tuple[Array]:
    xt = jnp.swapaxes(x, -1, -2)
    return (jnp.tril(-(xt @ g @ xt), -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def chunked_delta_rule(q: Array, k: Array, v: Array, g: Array, beta: Array, state: Array,
                       chunk: int = CHUNK) -> tuple[Array, Array]:
    """The gated delta rule over chunks of `chunk` tokens (HF `torch_chunk_gated_delta_rule`): within a chunk the
    updates are condensed by the inverse of a unit lower-triangular matrix (the UT transform, `unit_lower_inverse`),
    across chunks a `lax.scan` carries the state. Same arguments and results as `recurrent_delta_rule`, equal to it
    up to float32 rounding. T is padded to a multiple of `chunk` with zeros (no decay, no update)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    pad = -t % chunk
    n = (t + pad) // chunk

    def chunks(x):  # [B, T, H, ...] -> [B, H, N, C, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        x = jnp.moveaxis(x, 2, 1)
        return x.reshape(b, h, n, chunk, *x.shape[3:])

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    cum = jnp.cumsum(g, axis=-1)  # [B, H, N, C]: log decay from the chunk's start
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    pairwise = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))  # [.., C, C]
    ut = jnp.einsum("bhncd,bhnsd->bhncs", k_beta, k) * pairwise
    intra = jnp.einsum("bhncd,bhnsd->bhncs", q, k) * pairwise
    inverse = unit_lower_inverse(ut)  # the UT transform: (I + strictly_lower(ut))^-1, [B, H, N, C, C]
    new_values = jnp.einsum("bhncs,bhnsd->bhncd", inverse, v_beta)  # [B, H, N, C, dv]
    k_cumdecay = jnp.einsum("bhncs,bhnsd->bhncd", inverse, k_beta * jnp.exp(cum)[..., None])  # [.., C, dk]
    q = q * jnp.exp(cum)[..., None]
    k = k * jnp.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = jnp.exp(cum[..., -1])  # [B, H, N]

    def step(s, xs):
        q_i, k_i, nv_i, kc_i, intra_i, decay_i = xs
        v_new = nv_i - jnp.einsum("bhcd,bhdv->bhcv", kc_i, s)
        out = jnp.einsum("bhcd,bhdv->bhcv", q_i, s) + jnp.einsum("bhcs,bhsv->bhcv", intra_i, v_new)
        s = s * decay_i[..., None, None] + jnp.einsum("bhcd,bhcv->bhdv", k_i, v_new)
        return s, out

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, new_values, k_cumdecay, intra, chunk_decay))
    state, out = jax.lax.scan(step, state, xs)  # out [N, B, H, C, dv]
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, n * chunk, dv)[:, :, :t]
    return jnp.moveaxis(out, 1, 2), state


def conv_dim(c: TextConfig) -> int:
    """Channels of the convolution: `2 * Hk * dk + Hv * dv` (queries, keys, values)."""
    return 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim


class GatedDeltaNetLayer(nn.Module):
    """One Gated DeltaNet decoder block (layer kind `"gated_delta_net"`): `x + out_proj(gated_norm(delta_rule(
    conv(in_proj(rmsnorm(x)))), z))`, then the SwiGLU MLP (`mlp_block`); see the module docstring.

    Call: `(x [B, T, D], state or None, inputs: LayerInputs) -> (x [B, T, D], new state or None)`; the state is
    `{"conv": [B, C, K-1], "recurrent": float32 [B, Hv, dk, dv]}` (`init_state`). Params (HF names):
    `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, `conv1d` (kernel `[K, C]`), `dt_bias`, `A_log`,
    `linear_norm` (the gated RMSNorm's `[dv]` scale), `out_proj`, and the norms and MLP of `mlp_block`.
    """

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, state, inputs: LayerInputs):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hk, hv, dk, dv, kernel = (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim,
                                  c.linear_value_head_dim, c.linear_conv_kernel)
        x = shard_rows(x)
        b, t, _ = x.shape
        real = inputs.token_mask
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", zero_centered=c.zero_centered_norm, **kw)(x)
        h = jnp.where(real[..., None], h, 0).astype(self.dtype)  # HF apply_mask_to_padding_states
        qkv = Linear(conv_dim(c), ("embed", "mlp"), name="in_proj_qkv", **kw)(h)
        z = Linear((hv, dv), ("embed", "heads", "head_dim"), name="in_proj_z", **kw)(h)
        beta = jax.nn.sigmoid(Linear(hv, ("embed", "heads"), name="in_proj_b", **kw)(h).astype(jnp.float32))
        a = Linear(hv, ("embed", "heads"), name="in_proj_a", **kw)(h).astype(jnp.float32)
        weight = self.param("conv1d", nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "mlp")),
                            (kernel, conv_dim(c)), self.param_dtype)
        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (hv,),
                             self.param_dtype)
        a_log = self.param("A_log", nn.with_logical_partitioning(
            lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0)), ("norm",)), (hv,),
            self.param_dtype)

        window = jnp.zeros((b, kernel - 1, qkv.shape[-1]), qkv.dtype) if state is None else \
            jnp.swapaxes(state["conv"], 1, 2).astype(qkv.dtype)
        seq = jnp.concatenate([window, qkv], axis=1)  # [B, K-1+T, C]
        conv = sum(seq[:, j:j + t].astype(jnp.float32) * weight[j].astype(jnp.float32) for j in range(kernel))
        conv = nn.silu(conv).astype(self.dtype)
        q, k, v = jnp.split(conv, [hk * dk, 2 * hk * dk], axis=-1)
        q = jnp.repeat(q.reshape(b, t, hk, dk), hv // hk, axis=2).astype(jnp.float32)
        k = jnp.repeat(k.reshape(b, t, hk, dk), hv // hk, axis=2).astype(jnp.float32)
        q, k = l2norm(q) * dk ** -0.5, l2norm(k)
        v = v.reshape(b, t, hv, dv).astype(jnp.float32)
        g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(a + dt_bias.astype(jnp.float32))
        g = jnp.where(real[..., None], g, 0.0)  # no decay on padding: the state is left as it is
        initial = jnp.zeros((b, hv, dk, dv), jnp.float32) if state is None else state["recurrent"]
        rule = recurrent_delta_rule if state is not None and t == 1 else chunked_delta_rule
        out, recurrent = rule(q, k, v, g, beta, initial)
        out = RMSNorm(c.rms_norm_eps, name="linear_norm", **kw)(out.astype(self.dtype)).astype(jnp.float32)
        out = (out * nn.silu(z.astype(jnp.float32))).astype(self.dtype)
        x = x + Linear(c.hidden_size, ("heads", "head_dim", "embed"), num_in=2, name="out_proj", **kw)(out)
        if state is not None:
            state = {"conv": jnp.swapaxes(seq[:, -(kernel - 1):], 1, 2).astype(state["conv"].dtype),
                     "recurrent": recurrent}
        return mlp_block(self, x), state


def init_state(c: TextConfig, batch_size: int, max_len: int, dtype) -> dict:
    """An empty decode state (independent of `max_len`): conv window `[B, C, K-1]` in `dtype`, recurrent state
    float32 `[B, Hv, dk, dv]`."""
    return {"conv": jnp.zeros((batch_size, conv_dim(c), c.linear_conv_kernel - 1), dtype),
            "recurrent": jnp.zeros((batch_size, c.linear_num_value_heads, c.linear_key_head_dim,
                                    c.linear_value_head_dim), jnp.float32)}


def param_count(c: TextConfig) -> int:
    """Parameters of one Gated DeltaNet layer: projections, conv taps, `dt_bias`, `A_log`, the gated norm, `out_proj`,
    the SwiGLU MLP and two RMSNorms."""
    d, m, hv, value = c.hidden_size, c.intermediate_size, c.linear_num_value_heads, \
        c.linear_num_value_heads * c.linear_value_head_dim
    mixer = d * conv_dim(c) + d * value + 2 * d * hv + c.linear_conv_kernel * conv_dim(c) + 2 * hv + \
        c.linear_value_head_dim + value * d
    return mixer + 3 * d * m + 2 * d


def flops_per_token(c: TextConfig, context_len: float) -> float:
    """Forward FLOPs per token of one Gated DeltaNet layer (2 per multiply-add; independent of the context): the
    projections, the convolution taps, the MLP, and the chunked delta rule's matmuls per value head, with C = CHUNK:
    the chunk's `k k^T` and `q k^T` (`2 * 2 C dk`), the forward substitution of `unit_lower_inverse` (`2 C^2`, it
    multiplies full rows), the inverse applied to the values and keys (`2 C (dk + dv)`), `attn v` (`2 C dv`), and the
    state's read by `k` and `q` and its update (`3 * 2 dk dv`)."""
    d, m, hv, dk, dv = c.hidden_size, c.intermediate_size, c.linear_num_value_heads, c.linear_key_head_dim, \
        c.linear_value_head_dim
    proj = 2 * (d * conv_dim(c) + d * hv * dv + 2 * d * hv + hv * dv * d + 3 * d * m)
    rule = hv * (4 * CHUNK * dk + 2 * CHUNK * CHUNK + 2 * CHUNK * (dk + dv) + 2 * CHUNK * dv + 6 * dk * dv)
    return float(proj + 2 * c.linear_conv_kernel * conv_dim(c) + rule)


def activations(c: TextConfig, seq: int, e: int) -> tuple[float, float]:
    """`(bytes per token while the layer's backward pass runs, bytes per token of its matmul outputs)` of one Gated
    DeltaNet layer (the planner's estimate; independent of `seq`): norm, projection, convolution and MLP
    intermediates, the float32 q/k/v, and the chunk's float32 `[C, C]` matrices per value head; the outputs of
    the qkv, z, out and MLP projections."""
    d, m, conv, value = c.hidden_size, c.intermediate_size, conv_dim(c), c.linear_num_value_heads * \
        c.linear_value_head_dim
    per_token = e * (6 * d + 2 * conv + 2 * value) + mlp_activations(m, e) + 4 * (2 * conv + 2 * value) + \
        c.linear_num_value_heads * CHUNK * 4 * 4
    return float(per_token), float(e * (conv + value + d + 2 * m + d))


register_layer_kind("gated_delta_net", LayerKind(GatedDeltaNetLayer, init_state, param_count, flops_per_token,
                                                 activations))

"""SigLIP-style Vision Transformer (matches HF `SiglipVisionModel`, without the pooling head).

Conv patch embedding (as a patch reshape + matmul), learned position embeddings, pre-LN blocks with
multi-head attention and a GELU(tanh) MLP, final LayerNorm. Source: Zhai et al. 2023, "Sigmoid Loss for
Language Image Pre-Training"; layout and numerics follow transformers' `modeling_siglip.py`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rftjax.models.common import LayerNorm, Linear, dot_product_attention, gelu_tanh, normal_init
from rftjax.models.config import VisionConfig

Array = jax.Array


def patchify(images: Array, patch_size: int) -> Array:
    """`[B, H, W, C]` -> `[B, (H/p)*(W/p), p, p, C]`: the patches in row-major order.

    Equivalent to a stride-`p` valid convolution's receptive fields, in the order HF flattens them.
    """
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p, p, c)


class VisionBlock(nn.Module):
    """Pre-LN transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`. `[B, P, D] -> [B, P, D]`."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        h = LayerNorm(c.layer_norm_eps, self.dtype, self.param_dtype, name="layer_norm1")(x)
        heads = (c.num_heads, c.head_dim)
        q = Linear(heads, ("embed", "heads", "head_dim"), name="q_proj", **kw)(h)
        k = Linear(heads, ("embed", "heads", "head_dim"), name="k_proj", **kw)(h)
        v = Linear(heads, ("embed", "heads", "head_dim"), name="v_proj", **kw)(h)
        mask = jnp.ones((x.shape[0], x.shape[1], x.shape[1]), bool)
        a = dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
        x = x + Linear(c.hidden_size, ("heads", "head_dim", "embed"), num_in=2, name="out_proj", **kw)(a)
        h = LayerNorm(c.layer_norm_eps, self.dtype, self.param_dtype, name="layer_norm2")(x)
        h = gelu_tanh(Linear(c.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(h))
        return x + Linear(c.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


class VisionTransformer(nn.Module):
    """SigLIP ViT encoder.

    Call: `pixel_values` float `[B, H, W, C]` (channels last, already normalised, H = W = image_size)
    -> patch features `[B, P, D_v]` in the compute dtype, `P = (image_size / patch_size) ** 2`.

    `feature_layer=None` returns the final output (after the post-LayerNorm, SigLIP's `last_hidden_state`).
    An int indexes the hidden states `[embeddings, block_1, ..., block_L]` like HF's `hidden_states`
    (so -1 is the last block's output *before* the post-LayerNorm, which is what LLaVA feeds its projector).

    Raises:
      ValueError: pixel_values of the wrong shape.
    """

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array, feature_layer: int | None = None) -> Array:
        c = self.config
        want = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}] (channels last) for "
                             f"vision.image_size={c.image_size}, got shape {tuple(pixel_values.shape)}")
        patches = patchify(pixel_values, c.patch_size)
        x = Linear(c.hidden_size, (None, None, None, "embed"), num_in=3, use_bias=True, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="patch_embedding")(patches)
        pos = self.param("position_embedding",
                         nn.with_logical_partitioning(normal_init(), ("patches", "embed")),
                         (c.num_patches, c.hidden_size), self.param_dtype)
        x = x + pos.astype(self.dtype)[None]
        hidden_states = [x]
        for i in range(c.num_layers):
            x = VisionBlock(c, self.dtype, self.param_dtype, name=f"layers_{i}")(x)
            hidden_states.append(x)
        final = LayerNorm(c.layer_norm_eps, self.dtype, self.param_dtype, name="post_layernorm")(x)
        return final if feature_layer is None else hidden_states[feature_layer]

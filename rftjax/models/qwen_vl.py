"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic-resolution vision tower, patch merger, and the Qwen2 / Qwen3 decoder
with M-RoPE.

Sources: Wang et al. 2024, "Qwen2-VL" (naive dynamic resolution, 2-D RoPE in the ViT, M-RoPE in the LM);
Bai et al. 2025, "Qwen2.5-VL Technical Report" (window attention, RMSNorm + SwiGLU in the ViT); Qwen3-VL
(learned position embeddings resampled to each grid, DeepStack (Meng et al. 2024) from three vision blocks into
the first decoder layers, interleaved M-RoPE, Qwen3's q/k norms). Numerics and tensor layout follow
transformers' `modeling_qwen2_5_vl.py` / `modeling_qwen2_vl.py` / `modeling_qwen3_vl.py`; one module serves the
three families through `QwenVisionConfig` / `TextConfig` switches (norm, gated MLP, windows, patch bias,
position table, DeepStack; q/k norm, interleaved M-RoPE).

Static shapes under jit. HF concatenates the patches of all images and videos into one `[sum(t*h*w), 1176]`
array and runs variable-length attention; XLA needs fixed shapes, so here each row carries its media items (up
to K images and videos, in the order their placeholders appear in the row's prompt) packed into one patch
budget: `QwenImages.patches [B, P, patch_dim]` (item 0's `t*h*w` patches, then item 1's, ..., in HF's order
where each 2x2 merge unit is contiguous, then zeros), `QwenImages.grid_thw [B, K, 3]` and, for videos,
`QwenImages.time_interval [B, K]`. Every attention masks the padding
out; window and full-image attention are masks over the row's patches (attention with a mask does not depend
on token order, so HF's reordering into window order and back is not needed; the merger groups the same 4
patches in both orders). A model call compiles once per `(B, P, T)`: with `QwenVLConfig.image_token_buckets`
of k budgets and one prompt length, a run triggers at most k compilations of each jitted function, whatever
the image sizes (a batch with other sizes in the same bucket reuses the program).

Attention never builds `[P, P]` scores: the patches are sorted into window order once (as HF does), windowed
blocks attend block-banded (a window's run of patches against the three blocks around it: at most 3x the FLOPs of
a windowed kernel) and full-attention blocks one block of `FULL_ATTENTION_BLOCK` queries at a time
(`segment_attention`); after the last block the patches return to HF's order for the merger.
`config.qwen_vision_flops` counts the windowed work.

A video item is `t` temporal patches of `temporal_patch_size` frames each: the tower attends within each
temporal patch (a "frame" below) as HF does, and the M-RoPE temporal positions of frame f are
`floor(f * time_interval)` (Qwen2.5-VL: `tokens_per_second * second_per_grid_t`; Qwen2-VL: 1). Qwen3-VL
places each temporal patch as its own `t = 1` item behind a text timestamp (HF's `get_rope_index` splits
its video grids the same way); the data side does that split (`rftjax.data.qwen_image.QwenMedia`).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rftjax.models import hf
from rftjax.models.common import (FULL_ATTENTION_BLOCK, LayerNorm, Linear, RMSNorm, gelu_exact, gelu_tanh,
                                  local_rows, merge_image_features, segment_attention, shard_rows)
from rftjax.models.config import (QWEN3_MODEL_TYPES, QwenVisionConfig, QwenVLConfig, qwen_vision_flops,
                                  qwen_vision_param_count)
from rftjax.models.family import Family, VisionDims, register
from rftjax.models.llm import DecoderLM, DecoderState, DeepStack, ModelOutput, ModelStateMixin, rotate

Array = jax.Array


@flax.struct.dataclass
class QwenImages:
    """The media items of each row (images and videos) in the Qwen-VL patch layout, packed into a static
    patch budget.

    Attributes:
      patches: float `[B, P, patch_dim]`: row b's items' normalised patches one after another (each item's
        `t*h*w` patches in HF's `Qwen2VLImageProcessor` / video-processor order and values), zeros after. `P` is
        a multiple of `spatial_merge_size ** 2`.
      grid_thw: int32 `[B, K, 3]`: `(t, h, w)` patch grid of row b's item k (t = 1 for images, temporal patches
        for videos); `(0, 0, 0)` for an absent item (absent items come last). `[B, 3]` is shorthand for K = 1.
      time_interval: float32 `[B, K]` (or `[B]` with `[B, 3]` grids), the M-RoPE temporal step per temporal
        patch of each item (videos: Qwen2.5-VL `tokens_per_second * second_per_grid_t`, Qwen2-VL 1), or None
        (all 1; images have one temporal patch, so theirs never matters).
    """

    patches: Array
    grid_thw: Array
    time_interval: Array | None = None


@flax.struct.dataclass
class QwenImageFeatures:
    """Merged image features (the vision tower's output) with the grids the M-RoPE positions need.

    Attributes:
      features: `[B, P / merge_unit, D]` in the compute dtype; row b's items' `t*h*w / merge_unit` features one
        after another, then zeros.
      grid_thw, time_interval: as in `QwenImages`.
      deepstack: Qwen3-VL's DeepStack features `[B, k, P / merge_unit, D]` (level j from vision block
        `deepstack_visual_indexes[j]` through its own merger), or None.
    """

    features: Array
    grid_thw: Array
    deepstack: Array | None = None
    time_interval: Array | None = None


def media_items(grid_thw: Array, time_interval: Array | None = None) -> tuple[Array, Array]:
    """`(grids int32 [B, K, 3], time_interval float32 [B, K])` of a `QwenImages`' `grid_thw` (`[B, 3]` or
    `[B, K, 3]`) and `time_interval` (None: all 1)."""
    grids = grid_thw[:, None] if grid_thw.ndim == 2 else grid_thw
    if time_interval is None:
        return grids.astype(jnp.int32), jnp.ones(grids.shape[:2], jnp.float32)
    step = time_interval[:, None] if time_interval.ndim == 1 else time_interval
    return grids.astype(jnp.int32), step.astype(jnp.float32)


def _activation(name: str):
    return {"silu": nn.silu, "gelu": gelu_exact, "gelu_tanh": gelu_tanh,
            "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}[name]


def _norm(v: QwenVisionConfig):
    return RMSNorm if v.norm == "rms" else LayerNorm


def locate_items(index: Array, sizes: Array):
    """Where ordinals `index` (int `[B, N]` or `[1, N]`) fall among a row's items laid end to end (`sizes` int
    `[B, K]`): `(offset within the item [B, N], valid [B, N] (False past the last item), at)`, `at(a [B, K]) ->
    [B, N]` giving each ordinal's item's value (the last item's past the end)."""
    ends = jnp.cumsum(sizes, axis=1)
    item = (index[..., None] >= ends[:, None, :]).sum(-1)
    valid = item < sizes.shape[1]
    item = jnp.minimum(item, sizes.shape[1] - 1)
    at = lambda a: jnp.take_along_axis(a, item, axis=1)  # noqa: E731
    return index - at(ends - sizes), valid, at


def patch_layout(grid_thw: Array, num_patches: int, v: QwenVisionConfig) -> dict[str, Array]:
    """Geometry of every patch slot of every row, int32 `[B, P]` each (computed under jit from `grid_thw`,
    `[B, 3]` or `[B, K, 3]`: the row's items packed one after another).

    Keys: `valid` (bool: slot holds a patch of one of the row's items), `frame` (temporal patch, counted over
    the row's items so that two items never share one: the attention segment of full-attention blocks), `row`,
    `col` (patch coordinates in the item, the 2-D RoPE positions), `grid_h`, `grid_w` (the item's patch grid),
    `window` (attention window id within the row; windows are `window_units x window_units` merged tokens,
    counted per frame as HF's `get_window_index`, items one after another). Slot i of a frame holds merge unit
    `i // merge_unit` (row-major over the merged grid), sub-patch `i % merge_unit` (row-major within the unit),
    HF's patch order.
    """
    m = v.spatial_merge_size
    grids, _ = media_items(grid_thw)
    i = jnp.arange(num_patches, dtype=jnp.int32)[None]
    j, valid, at = locate_items(i, grids.prod(-1))
    h, w = at(grids[..., 1]), at(grids[..., 2])
    hw = jnp.maximum(h * w, 1)
    frame_in_item, j = j // hw, j % hw
    unit, sub = j // (m * m), j % (m * m)
    merged_w = jnp.maximum(w // m, 1)
    unit_row, unit_col = unit // merged_w, unit % merged_w
    frames_before = jnp.cumsum(grids[..., 0], axis=1) - grids[..., 0]
    out = {"valid": valid, "frame": at(frames_before) + frame_in_item, "row": unit_row * m + sub // m,
           "col": unit_col * m + sub % m, "grid_h": h, "grid_w": w}
    if v.window_units is not None:
        wu = v.window_units
        windows_w = (jnp.maximum(grids[..., 2] // m, 1) + wu - 1) // wu  # [B, K]
        windows_h = (jnp.maximum(grids[..., 1] // m, 1) + wu - 1) // wu
        per_item = grids[..., 0] * windows_h * windows_w
        first = at(jnp.cumsum(per_item, axis=1) - per_item)
        out["window"] = first + (frame_in_item * at(windows_h) + unit_row // wu) * at(windows_w) + unit_col // wu
    return out


def vision_rope_angles(row: Array, col: Array, v: QwenVisionConfig) -> Array:
    """2-D rotary angles float32 `[B, P, head_dim / 2]`: the first `head_dim / 4` frequencies rotate by the
    patch row, the rest by its column (HF `Qwen2_5_VLVisionRotaryEmbedding`, theta `v.rope_theta`)."""
    quarter = v.head_dim // 2
    inv_freq = 1.0 / (v.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    return jnp.concatenate([row[..., None] * inv_freq, col[..., None] * inv_freq], axis=-1).astype(jnp.float32)


class QwenVisionBlock(nn.Module):
    """Pre-norm ViT block: `x + proj(attn(rope(qkv(norm1(x)))))`, then `x + mlp(norm2(x))`.

    Call: `(x [B, P, D], angles float32 [B, P, hd/2], frames int [B, P], windows int [B, P] or None, window
    bool [] or None) -> [B, P, D]`: each patch attends to the patches of its segment (-1: padding); windowed
    blocks attend within `windows` (window segments in window order: contiguous runs of at most one window,
    `segment_attention` with a band), the others within `frames`. `windowed` says which kind the block is; None:
    the `window` argument says it per call (a traced flag: the scanned tower's blocks of both kinds, `lax.cond`).
    Fused qkv with bias (kernel `[D, 3, H, hd]`), output projection with bias, MLP gated (SwiGLU-style with
    `hidden_act`) or plain.
    """

    config: QwenVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    windowed: bool | None = False

    @nn.compact
    def __call__(self, x: Array, angles: Array, frames: Array, windows: Array | None = None,
                 window: Array | None = None) -> Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        norm = _norm(c)
        x = shard_rows(x)
        h = norm(c.norm_eps, self.dtype, self.param_dtype, name="norm1")(x)
        qkv = Linear((3, c.num_heads, c.head_dim), ("embed", None, "heads", "head_dim"), name="qkv", **kw)(h)
        q, k, vv = (qkv[:, :, i] for i in range(3))
        q, k = rotate(q, angles), rotate(k, angles)

        def attend(windowed: bool) -> Array:
            if windowed:
                return segment_attention(q, k, vv, windows, c.window_units ** 2 * c.merge_unit, band=True)
            return segment_attention(q, k, vv, frames, min(FULL_ATTENTION_BLOCK, x.shape[1]))

        if self.windowed is None:
            a = jax.lax.cond(window, lambda: attend(True), lambda: attend(False))
        else:
            a = attend(self.windowed)
        x = x + Linear(c.hidden_size, ("heads", "head_dim", "embed"), num_in=2, name="proj", **kw)(a)
        h = norm(c.norm_eps, self.dtype, self.param_dtype, name="norm2")(x)
        act = _activation(c.hidden_act)
        if c.gated_mlp:
            gate = Linear(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(h)
            up = Linear(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(h)
            return x + Linear(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(act(gate) * up)
        h = act(Linear(c.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(h))
        return x + Linear(c.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


class PatchMerger(nn.Module):
    """`ln_q`, then each `merge_unit` consecutive patches concatenated (`[B, P, D] -> [B, P/4, 4D]`), then
    Linear-GELU(erf)-Linear to `out_hidden_size` (HF `Qwen2_5_VLPatchMerger` / `PatchMerger` /
    `Qwen3VLVisionPatchMerger`). `postshuffle_norm` (Qwen3-VL's DeepStack mergers): `ln_q` normalises the
    concatenated `4D` values instead of each patch."""

    config: QwenVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    postshuffle_norm: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        norm = _norm(c)(c.norm_eps, self.dtype, self.param_dtype, name="ln_q")
        b, p, d = x.shape
        if not self.postshuffle_norm:
            x = norm(x)
        x = x.reshape(b, p // c.merge_unit, d * c.merge_unit)
        if self.postshuffle_norm:
            x = norm(x)
        x = gelu_exact(Linear(d * c.merge_unit, ("embed", "mlp"), name="mlp_0", **kw)(x))
        return Linear(c.out_hidden_size, ("mlp", "embed"), name="mlp_2", **kw)(x)


def position_interpolation(row: Array, col: Array, grid_h: Array, grid_w: Array, side: int) -> tuple[Array, Array]:
    """Bilinear (align_corners) taps into a `side x side` table of learned position embeddings for patches at
    `(row, col)` (int `[B, P]`) of a `grid_h x grid_w` grid (int `[B, P]` or broadcastable, the patch's
    item's): indices int32 `[B, P, 4]` into the
    flattened table and weights float32 `[B, P, 4]` (summing to 1). Equal to HF
    `vision_utils.get_vision_interpolation_indices_and_weights(mode="bilinear", align_corners=True)`, i.e.
    `F.interpolate` of the table to the grid."""
    def axis(index, size):
        src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
        floor = jnp.floor(src)
        taps = floor[..., None] + jnp.arange(2, dtype=jnp.float32)
        weights = jnp.maximum(1 - jnp.abs(src[..., None] - taps), 0)
        return jnp.clip(taps, 0, side - 1).astype(jnp.int32), weights

    h_taps, h_w = axis(row, grid_h)
    w_taps, w_w = axis(col, grid_w)
    b, p = row.shape
    indices = (h_taps[..., :, None] * side + w_taps[..., None, :]).reshape(b, p, 4)
    return indices, (h_w[..., :, None] * w_w[..., None, :]).reshape(b, p, 4)


class QwenVisionTower(nn.Module):
    """Qwen-VL vision encoder: patch embedding (+ learned position embeddings, Qwen3-VL), `depth` blocks
    (windowed or full attention), patch merger (+ DeepStack mergers, Qwen3-VL).

    Call: `(patches float [B, P, patch_dim], grid_thw int [B, 3] or [B, K, 3])` -> `(merged features
    [B, P / merge_unit,
    out_hidden_size], deepstack [B, k, P / merge_unit, out_hidden_size] or None)` (compute dtype; zero on
    padding slots). The patch embedding is a linear map of the flattened `(C, temporal_patch_size, patch_size,
    patch_size)` patch (with a bias when `patch_bias`), equal to HF's Conv3d. With `num_position_embeddings`,
    the square table is resampled bilinearly to each item's grid (`position_interpolation`) and added. Attention
    never crosses frames, items, rows or into padding; windowed blocks attend within their window only. The
    outputs of the blocks in `deepstack_visual_indexes` pass their own `PatchMerger` (post-shuffle norm).
    `remat`: each block under `nn.remat` (`remat_policy`); `scan`: the blocks as one `nn.scan` with params stacked
    under `blocks` (`rftjax.models.hf.stack_layers`), else `blocks_{i}`. Unrolled, XLA's TPU schedule can hold
    many blocks' float32 matmul outputs at once (Qwen2.5-VL-3B's RL update on v5e-8 at 2 rows per device: 8.7 GB
    of the qkv and MLP outputs of about 20 blocks live at its peak, 15.0 GB of temporaries; scanned: 7.7 GB).

    Raises:
      ValueError: patches whose last dim is not `patch_dim` or whose count is not a multiple of `merge_unit`.
    """

    config: QwenVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    remat_policy: Any = None
    scan: bool = False

    def _block(self, **kw) -> nn.Module:
        block = nn.remat(QwenVisionBlock, policy=self.remat_policy) if self.remat else QwenVisionBlock
        return block(self.config, self.dtype, self.param_dtype, **kw)

    def _blocks(self, x: Array, angles: Array, frames: Array, windows: Array | None) -> tuple[Array, list]:
        """The blocks one after the other (params `blocks_{i}`): the output and the DeepStack levels."""
        c, levels = self.config, []
        for i in range(c.depth):
            x = self._block(windowed=c.is_windowed(i), name=f"blocks_{i}")(x, angles, frames, windows)
            if i in c.deepstack_visual_indexes:
                levels.append(x)
        return x, levels

    def _scanned_blocks(self, x: Array, angles: Array, frames: Array, windows: Array | None) -> tuple[Array, list]:
        """The blocks as one `nn.scan` (params stacked on axis 0 under `blocks`; compile time and the live
        activations independent of depth): a per-block flag picks windowed or full attention (`lax.cond`) when
        the tower has both, and a `[k, B, P, D]` carry collects the k DeepStack levels (one slot written per
        block; a linear update, so the backward pass saves no copy of it per block)."""
        c = self.config
        kinds = [c.is_windowed(i) for i in range(c.depth)]
        mixed = len(set(kinds)) > 1
        slots = [c.deepstack_visual_indexes.index(i) if i in c.deepstack_visual_indexes else -1
                 for i in range(c.depth)]
        k = len(c.deepstack_visual_indexes)

        def body(block, carry, window, slot, angles, frames, windows):
            x, levels = carry
            x = block(x, angles, frames, windows, window if mixed else None)
            if k:
                at = jnp.maximum(slot, 0)
                level = jnp.where(slot >= 0, x, jax.lax.dynamic_index_in_dim(levels, at, keepdims=False))
                levels = jax.lax.dynamic_update_index_in_dim(levels, level, at, 0)
            return (x, levels), None

        scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.depth,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        levels = jnp.zeros((k, *x.shape), x.dtype) if k else None
        (x, levels), _ = scan(self._block(windowed=None if mixed else kinds[0], name="blocks"), (x, levels),
                              jnp.asarray(kinds), jnp.asarray(slots, jnp.int32), angles, frames, windows)
        return x, (list(levels) if k else [])

    @nn.compact
    def __call__(self, patches: Array, grid_thw: Array) -> Array:
        c = self.config
        b, p = patches.shape[:2]
        if patches.ndim != 3 or patches.shape[2] != c.patch_dim or p % c.merge_unit:
            raise ValueError(f"patches must be [B, P, {c.patch_dim}] with P a multiple of {c.merge_unit}, got "
                             f"{tuple(patches.shape)}")
        layout = patch_layout(grid_thw, p, c)
        valid = layout["valid"]
        frames = jnp.where(valid, layout["frame"], -1)
        angles = vision_rope_angles(layout["row"], layout["col"], c)
        x = Linear(c.hidden_size, (None, "embed"), use_bias=c.patch_bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="patch_embed")(patches)
        if c.num_position_embeddings is not None:
            table = self.param("position_embedding", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, "embed")), (c.num_position_embeddings, c.hidden_size),
                self.param_dtype).astype(jnp.float32)
            indices, weights = position_interpolation(layout["row"], layout["col"], layout["grid_h"],
                                                      layout["grid_w"], c.position_grid_side)
            pos = sum(jnp.take(table, indices[..., j], axis=0) * weights[..., j, None] for j in range(4))
            x = (x.astype(jnp.float32) + pos).astype(self.dtype)
        if c.window_units is not None:  # window order (HF's get_window_index): each window a contiguous run
            order = jnp.argsort(jnp.where(valid, layout["window"], p * p), axis=1, stable=True)
            take = lambda a: jnp.take_along_axis(a, order.reshape(b, p, *[1] * (a.ndim - 2)), axis=1)  # noqa: E731
            x, angles, frames = take(x), take(angles), take(frames)
            windows = jnp.where(take(valid), take(layout["window"]), -1)
        else:
            windows = None
        token_valid = valid.reshape(b, p // c.merge_unit, c.merge_unit)[:, :, 0]
        merged = lambda merger, x: jnp.where(token_valid[..., None], merger(x), 0).astype(self.dtype)  # noqa: E731
        # Qwen3-VL's DeepStack levels: the outputs of blocks `deepstack_visual_indexes` (no windows: HF's order)
        x, levels = (self._scanned_blocks if self.scan else self._blocks)(x, angles, frames, windows)
        deepstack = [merged(PatchMerger(c, self.dtype, self.param_dtype, postshuffle_norm=True,
                                        name=f"deepstack_merger_{j}"), level) for j, level in enumerate(levels)]
        if c.window_units is not None:  # back to HF's patch order (merge units are contiguous in both)
            x = jnp.take_along_axis(x, jnp.argsort(order, axis=1)[..., None], axis=1)
        out = merged(PatchMerger(c, self.dtype, self.param_dtype, name="merger"), x)
        return out, (jnp.stack(deepstack, axis=1) if deepstack else None)


def vision_token_mask(input_ids: Array, config: QwenVLConfig) -> Array:
    """bool `[B, T]`: the media placeholders of `input_ids` (image and video tokens; the model fills both with its
    media features in order)."""
    return (input_ids == config.image_token_id) | (input_ids == config.video_token_id)


def mrope_positions(input_ids: Array, attention_mask: Array, grid_thw: Array | None, config: QwenVLConfig,
                    time_interval: Array | None = None) -> Array:
    """M-RoPE position ids int32 `[3, B, T]` (temporal, height, width) of left-padded rows with media items.

    Over each row's real tokens (mask True): text tokens count up from 0 on all three axes; the placeholders of
    item k (its contiguous run of `t*h*w/4` image or video tokens; items in row order, `grid_thw` `[B, K, 3]`
    or `[B, 3]`) get `start + (floor(frame * time_interval[k]) , merged row, merged column)` with `start` the
    position the next text token would have had; text after the item continues from `start + max(h, w) / 2`
    (with `config.text_after_video="max"`: from `start + max(h / 2, w / 2, floor((t - 1) * time_interval) + 1)`,
    Qwen's reference rule). Padding gets 0. Equal to HF's `Qwen2_5_VLModel.get_rope_index` /
    `Qwen3VLModel.get_rope_index` (Qwen3-VL video frames are separate `t = 1` items) in transformers 5.
    With `grid_thw=None` (no media) every axis is `cumsum(mask) - 1`, plain 1-D RoPE.
    """
    mask = attention_mask.astype(bool)
    is_vis = vision_token_mask(input_ids, config) & mask
    is_text = mask & ~is_vis
    text_before = jnp.cumsum(is_text, axis=1, dtype=jnp.int32) - is_text
    if grid_thw is None:
        return jnp.broadcast_to(jnp.where(mask, text_before, 0), (3, *input_ids.shape)).astype(jnp.int32)
    grids, step = media_items(grid_thw, time_interval)
    m = config.vision.spatial_merge_size
    gh, gw = grids[..., 1] // m, grids[..., 2] // m  # [B, K]
    tokens = grids[..., 0] * gh * gw
    ends = jnp.cumsum(tokens, axis=1)
    extent = jnp.maximum(gh, gw)
    if config.text_after_video == "max":  # one past the video's last temporal position too
        last = jnp.floor((grids[..., 0] - 1).astype(jnp.float32) * step).astype(jnp.int32) + 1
        extent = jnp.maximum(extent, jnp.where(grids[..., 0] > 0, last, 0))  # absent items take no place
    seen = jnp.cumsum(is_vis, axis=1, dtype=jnp.int32)  # placeholders up to and including each token
    k = seen - 1  # ordinal of each placeholder
    done = seen - is_vis  # placeholders strictly before each token
    # positions taken by the items that ended before each token: sum of their extents
    before = ((ends[:, None, :] <= done[..., None]) * extent[:, None, :]).sum(-1)
    j, _, at = locate_items(k, tokens)
    per_frame = jnp.maximum(at(gh * gw), 1)
    width = jnp.maximum(at(gw), 1)
    frame = jnp.floor((j // per_frame).astype(jnp.float32) * at(step)).astype(jnp.int32)
    start = text_before + before
    img = jnp.stack([frame, (j % per_frame) // width, j % width])
    pos = jnp.where(is_vis[None], start[None] + img, start[None])
    return jnp.where(mask[None], pos, 0).astype(jnp.int32)


def image_token_counts(grid_thw, config: QwenVLConfig) -> np.ndarray:
    """LM tokens per media item `t*h*w / merge_unit`, int `[B, K]` (`[B]` for `[B, 3]` grids), from a concrete
    `grid_thw`."""
    g = np.asarray(grid_thw).astype(np.int64)
    return g.prod(axis=-1) // config.vision.merge_unit


def check_image_tokens(input_ids, config: QwenVLConfig, grid_thw) -> None:
    """Raise a ValueError unless row b of `input_ids` `[B, T]` holds, for each of its media items (`grid_thw`
    `[B, K, 3]` or `[B, 3]`, zero grids absent), one contiguous run of exactly `t*h*w / 4` image or video tokens,
    in item order, and no other media placeholders (none at all for `grid_thw=None`).

    Call it on host data before jitting (the model calls it itself when `input_ids` is concrete). The usual
    cause of a mismatch is a prompt truncated through its media tokens, or a grid from another resize.
    """
    ids = local_rows(input_ids)
    is_vis = np.asarray(vision_token_mask(np.asarray(ids), config))
    if grid_thw is None:
        want = np.zeros((len(ids), 0), np.int64)
    else:
        want = image_token_counts(local_rows(grid_thw), config)
        want = want[:, None] if want.ndim == 1 else want
    for row in range(len(ids)):
        edges = np.diff(np.concatenate([[0], is_vis[row].astype(np.int8), [0]]))
        runs = (np.nonzero(edges == -1)[0] - np.nonzero(edges == 1)[0]).tolist()
        items = [int(n) for n in want[row] if n > 0]
        if runs != items:
            grids = None if grid_thw is None else np.asarray(local_rows(grid_thw))[row].tolist()
            raise ValueError(
                f"media tokens and media features do not match: row {row} of input_ids has runs of {runs} image/"
                f"video tokens (ids {config.image_token_id}/{config.video_token_id}) but its media items give "
                f"{items} features (grid_thw {grids} / {config.vision.merge_unit}). A prompt truncated through its "
                f"media tokens does this: raise the maximum prompt length, or shorten the text.")


class QwenVL(ModelStateMixin, nn.Module):
    """Qwen2-VL / Qwen2.5-VL policy model: `visual` (vision tower + merger) and `language_model` (Qwen2
    decoder with M-RoPE). Same call contract as `VLM`, with images as `QwenImages`.

    Call:
      `QwenVL(config).apply({'params': params}, images, input_ids, attention_mask=None, state=None,
      image_features=None, return_hidden=False)`

      - images: `QwenImages` (each row's media items, packed patches + grids) or None (text only).
      - input_ids: int32 `[B, T]`, left-padded; row b holds one run of `t*h*w/4` image (or video) tokens per
        media item, in item order (each between `<|vision_start|>` and `<|vision_end|>` in the chat template).
      - attention_mask: `[B, T]`, False on padding.
      - state: a `DecoderState` to continue from (the output then holds the new state); the prompt with its image
        is written from the state's `next_pos`, and later tokens continue from its largest M-RoPE position + 1.
      - image_features: `QwenImageFeatures` from `encode_images` instead of images.
      - return_hidden: the decoder's final hidden states `[B, T, D]` instead of logits.

    Returns:
      `ModelOutput`: logits float32 `[B, T, V]` (or hidden), and the new state when given one.

    Raises:
      ValueError: (when input_ids is concrete) media tokens that do not match the media grids; both images
        and image_features given.
    """

    config: QwenVLConfig

    def setup(self):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        self.visual = QwenVisionTower(c.vision, dt, pdt, remat=c.remat, remat_policy=c.checkpoint_policy,
                                      scan=c.scan_layers)
        self.language_model = DecoderLM(c.text, dt, pdt, scan_layers=c.scan_layers, remat=c.remat,
                                        remat_policy=c.checkpoint_policy)

    def encode_images(self, images: QwenImages) -> QwenImageFeatures:
        """Merged media features of `images` (see `QwenImageFeatures`)."""
        features, deepstack = self.visual(images.patches, images.grid_thw)
        return QwenImageFeatures(features, images.grid_thw, deepstack, images.time_interval)

    def __call__(self, pixel_values: QwenImages | None, input_ids, attention_mask=None,
                 state: DecoderState | None = None, image_features: QwenImageFeatures | None = None,
                 return_hidden: bool = False) -> ModelOutput:
        if pixel_values is not None and image_features is not None:
            raise ValueError("give pixel_values or image_features, not both")
        source = pixel_values if pixel_values is not None else image_features
        grid = None if source is None else source.grid_thw
        if not isinstance(input_ids, jax.core.Tracer) and not isinstance(grid, jax.core.Tracer):
            check_image_tokens(input_ids, self.config, grid)
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        embeds = self.language_model.embed(input_ids)
        positions = deepstack = None
        if image_features is not None:
            is_image = vision_token_mask(input_ids, self.config)
            embeds = merge_image_features(embeds, is_image, image_features.features)
            positions = mrope_positions(input_ids, attention_mask, image_features.grid_thw, self.config,
                                        image_features.time_interval)
            if state is not None:
                positions = positions + state.next_pos[None, :, None]
            if image_features.deepstack is not None:
                deepstack = DeepStack(is_image, image_features.deepstack)
        return self.language_model(None, attention_mask, inputs_embeds=embeds, state=state,
                                   return_hidden=return_hidden, positions=positions, deepstack=deepstack)


def dummy_inputs(config: QwenVLConfig, batch_size: int = 1, text_len: int = 4):
    """`(images, input_ids)` for `QwenVL.init`: one 2x2-token image (4 x 4 patches) + `text_len` text tokens."""
    v = config.vision
    n = 4 * v.merge_unit
    images = QwenImages(jnp.zeros((batch_size, n, v.patch_dim), jnp.float32),
                        jnp.tile(jnp.asarray([[1, 2 * v.spatial_merge_size, 2 * v.spatial_merge_size]], jnp.int32),
                                 (batch_size, 1)))
    ids = jnp.concatenate([jnp.full((batch_size, 4), config.image_token_id, jnp.int32),
                           jnp.zeros((batch_size, text_len), jnp.int32)], axis=1)
    return images, ids


def _media_input(config: QwenVLConfig):
    from rftjax.data.pipeline import QwenPatchImages
    from rftjax.data.qwen_image import QwenImageProcessor

    return QwenPatchImages(QwenImageProcessor.for_model(config), config.max_image_tokens, config.vision.merge_unit,
                           config.buckets, config.compute_dtype, max_items=config.max_media_items,
                           split_frames=config.model_type in QWEN3_MODEL_TYPES,
                           tokens_per_second=config.vision.tokens_per_second)


def _vision_dims(c: QwenVLConfig) -> VisionDims:
    v = c.vision
    return VisionDims(c.max_image_tokens * v.merge_unit, v.hidden_size, v.depth, v.num_heads, v.intermediate_size,
                      remat=True)


def _media_shapes(c: QwenVLConfig, n: int) -> QwenImages:
    v = c.vision
    return QwenImages(jax.ShapeDtypeStruct((n, c.max_image_tokens * v.merge_unit, v.patch_dim), c.compute_dtype),
                      jax.ShapeDtypeStruct((n, c.max_media_items, 3), jnp.int32),
                      jax.ShapeDtypeStruct((n, c.max_media_items), jnp.float32))


QWEN_VL = register(Family(
    name="qwen_vl", config_cls=QwenVLConfig, module=QwenVL, dummy_inputs=dummy_inputs, media_input=_media_input,
    placeholder_ids=lambda c: (c.image_token_id, c.video_token_id),
    check_media_tokens=lambda ids, c, images: check_image_tokens(ids, c, None if images is None else images.grid_thw),
    media_param_count=lambda c: qwen_vision_param_count(c.vision),
    media_flops=lambda c, image_tokens: qwen_vision_flops(c.vision, image_tokens or c.max_image_tokens),
    vision_dims=_vision_dims, vision_modules=("visual",),
    lora_vision_targets=r"visual/blocks(_\d+)?/(qkv|proj|gate_proj|up_proj|down_proj|fc1|fc2)",
    hf=hf.QWEN_VL, needs_checkpoint_tokenizer=True, augmentable=False, media_shapes=_media_shapes))
"""The Qwen2-VL / Qwen2.5-VL family: dynamic-resolution patches, M-RoPE, the checkpoint's own tokenizer."""

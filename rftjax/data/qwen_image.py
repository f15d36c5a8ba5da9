"""Image processor of Qwen2-VL / Qwen2.5-VL / Qwen3-VL: aspect-preserving resize, normalisation, patches, padding.

Equal to transformers' `Qwen2VLImageProcessorPil` (the processor the three families ship): RGB conversion (alpha
composited onto white), `smart_resize` to multiples of `patch_size * merge_size` px with the area between
`min_pixels` and `max_pixels`, PIL bicubic resize of the uint8 image, rescale by 1/255 (float64, then
float32), normalise with the checkpoint's mean/std (OpenAI CLIP's for Qwen2.x, 0.5 for Qwen3-VL), and HF's
patch order: the image viewed as `(C, h/2, 2, p, w/2, 2, p)`, transposed so each 2x2 merge unit is contiguous,
each patch repeated over the `temporal_patch_size` frames and flattened `(C, t, p, p)`.

Videos (`QwenImageProcessor.video`) follow transformers' `Qwen2VLVideoProcessor` / `Qwen3VLVideoProcessor`
arithmetic: every frame resized to one size (`smart_resize` of the first frame's size under the per-frame pixel
budget; PIL bicubic per frame where transformers uses torchvision's), the last frame repeated to a multiple of
`temporal_patch_size`, rescale and normalise as images, and the patches of `temporal_patch_size` consecutive
frames flattened `(C, t, p, p)` in the images' merge-unit order.

`pad_images` then pads a batch to a static patch budget (`QwenVLConfig.buckets`), the layout the model
takes under jit (`rftjax.models.QwenImages`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image

from rftjax.models.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """The `(height, width)` an image is resized to: both multiples of `factor`, area within
    `[min_pixels, max_pixels]` (unless one side alone exceeds it), aspect ratio kept as closely as possible.

    Same arithmetic as HF `transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`.

    Raises:
      ValueError: an aspect ratio above 200, or a side of 0 px.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image of {height}x{width} px has no pixels")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height}x{width} px: aspect ratio {max(height, width) / min(height, width):.0f} "
                         f"is above 200, which Qwen-VL's resize does not accept; crop or pad it first")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image) -> Image.Image:
    """A PIL RGB image from a PIL image or a uint8 array `[H, W]` / `[H, W, 3|4]`; transparency is composited
    onto white (as HF's `convert_to_rgb`)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 [H, W(, C)], got {image.dtype}")
        image = Image.fromarray(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class QwenImageProcessor:
    """Qwen-VL image preprocessing (see the module docstring); defaults are the published checkpoints'.

    Attributes:
      patch_size, temporal_patch_size, merge_size: the vision tower's (`QwenVisionConfig`).
      min_pixels, max_pixels: area bounds of the resized image (HF `size.shortest_edge` / `longest_edge`).
      mean, std: per-channel normalisation (OpenAI CLIP).
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def for_model(cls, config) -> "QwenImageProcessor":
        """The processor of a `QwenVLConfig`: its patch geometry and normalisation, `min_pixels` (capped at
        `max_pixels`), and `max_pixels` so the largest image fits `config.max_image_tokens`."""
        v = config.vision
        return cls(v.patch_size, v.temporal_patch_size, v.spatial_merge_size,
                   min(config.min_pixels, config.max_pixels), config.max_pixels, config.image_mean, config.image_std)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """`smart_resize` with this processor's bounds."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_image_tokens(self, height: int, width: int) -> int:
        """LM tokens an image of `height x width` px becomes (`grid_h * grid_w / merge_size ** 2`)."""
        h, w = self.resized_size(height, width)
        return (h // self.factor) * (w // self.factor)

    def _normalised(self, pixels: np.ndarray) -> np.ndarray:
        """float32 `[..., C, H, W]` of uint8 `[..., H, W, C]`: rescale by 1/255 (float64, then float32), normalise."""
        x = np.moveaxis((pixels.astype(np.float64) * (1 / 255)).astype(np.float32), -1, -3)
        return (x - np.asarray(self.mean, np.float32)[:, None, None]) / np.asarray(self.std, np.float32)[:, None, None]

    def video(self, frames: np.ndarray, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
        """Patches float32 `[t*h*w, C * temporal_patch_size * patch_size ** 2]` and `grid_thw` int64 `[3]` of
        sampled video frames uint8 `[F, H, W, 3]` (module docstring), each frame at most `max_pixels` px
        (`min_pixels` capped there), `t = ceil(F / temporal_patch_size)`.

        Raises:
          ValueError: no frames, frames that are not `[F, H, W, 3]` uint8, an aspect ratio above 200.
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
            raise ValueError(f"video frames must be uint8 [F, H, W, 3] with F > 0, got {frames.dtype} {frames.shape}")
        height, width = smart_resize(*frames.shape[1:3], self.factor, min(self.min_pixels, max_pixels), max_pixels)
        if (height, width) != frames.shape[1:3]:
            frames = np.stack([np.asarray(Image.fromarray(f).resize((width, height), resample=Image.BICUBIC))
                               for f in frames])
        frames = np.concatenate([frames, np.repeat(frames[-1:], -len(frames) % self.temporal_patch_size, axis=0)])
        x = self._normalised(frames)  # [F, C, H, W]
        tp, c, m, p = self.temporal_patch_size, x.shape[1], self.merge_size, self.patch_size
        t, gh, gw = len(frames) // tp, height // p, width // p
        x = x.reshape(t, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(t * gh * gw, -1)), np.asarray([t, gh, gw], np.int64)

    def frame_size(self, height: int, width: int, max_pixels: int) -> tuple[int, int]:
        """`(height, width)` the frames of a `height x width` video are resized to under `max_pixels` per frame."""
        return smart_resize(height, width, self.factor, min(self.min_pixels, max_pixels), max_pixels)

    def __call__(self, image) -> tuple[np.ndarray, np.ndarray]:
        """Patches float32 `[t*h*w, C * temporal_patch_size * patch_size ** 2]` and `grid_thw` int64 `[3]`
        (t = 1) of one image (PIL or uint8 array).

        Raises:
          ValueError: an image whose aspect ratio is above 200 or that has no pixels.
        """
        image = to_rgb(image)
        height, width = self.resized_size(image.height, image.width)
        x = self._normalised(np.asarray(image.resize((width, height), resample=Image.BICUBIC)))  # [C, H, W]
        c, m, p = x.shape[0], self.merge_size, self.patch_size
        gh, gw = height // p, width // p
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], self.temporal_patch_size, p, p))
        return np.ascontiguousarray(x.reshape(gh * gw, -1)), np.asarray([1, gh, gw], np.int64)


def choose_bucket(num_tokens: int, buckets: Sequence[int]) -> int:
    """The smallest budget in `buckets` (ascending) holding an image of `num_tokens` LM tokens.

    Raises:
      ValueError: the image is larger than the largest budget (names both and the fix).
    """
    for b in buckets:
        if num_tokens <= b:
            return b
    raise ValueError(f"an image of {num_tokens} tokens does not fit max_image_tokens={buckets[-1]}: resize it with "
                     f"QwenImageProcessor.for_model(config) (max_pixels), or raise model max_image_tokens")


def pad_images(items: Sequence[tuple[np.ndarray, np.ndarray] | None], buckets: Sequence[int],
               merge_unit: int = 4) -> dict[str, np.ndarray]:
    """Stack processed images (one per row; None for a row without an image) into the static layout of
    `rftjax.models.QwenImages`: `{"patches": float32 [B, P, patch_dim], "grid_thw": int32 [B, 3]}` with
    `P = merge_unit * bucket`, the bucket being the smallest of `buckets` that holds the batch's largest image.

    Raises:
      ValueError: an image larger than the largest bucket; no image in the batch at all.
    """
    present = [it for it in items if it is not None]
    if not present:
        raise ValueError("pad_images got no image; pass images=None to the model for text-only batches")
    largest = max(len(patches) for patches, _ in present) // merge_unit
    budget = choose_bucket(largest, sorted(buckets)) * merge_unit
    patch_dim = present[0][0].shape[1]
    out = np.zeros((len(items), budget, patch_dim), np.float32)
    grids = np.zeros((len(items), 3), np.int32)
    for row, item in enumerate(items):
        if item is not None:
            out[row, :len(item[0])] = item[0]
            grids[row] = item[1]
    return {"patches": out, "grid_thw": grids}

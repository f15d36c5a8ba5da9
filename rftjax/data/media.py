"""The media items of an example: images and videos, in the order the question's placeholders name them.

An example holds `image` (one image), `images` (a list, several), `video` (one video: a `VideoRef`, an in-memory
`Clip`, or a path/bytes) and/or `videos` (a list, several); each image is a uint8 array `[H, W, 3]` or an
`ImageRef` (decoded when the row is read). `example_media` orders them as the question's placeholders do
(`<image>`/`<imageN>` take the images in list order, `<video>` the videos likewise); a question without
placeholders takes its images first, then its videos. A video given as a path or bytes is probed there once
(`probe_video`), so later steps see a `VideoRef` or a `Clip`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from rftjax.data.tokenizer import PLACEHOLDER, placeholder_kinds
from rftjax.data.video import Clip, VideoMeta, VideoRef, VideoSampling, probe_video, sample_clip


def example_media(ex: dict) -> list[tuple[str, Any]]:
    """`[(kind, value)]` of `ex`'s media items in placeholder order (module docstring).

    Raises:
      ValueError: more `<image>` placeholders than images, or a `<video>` without a video (or the reverse); a
        video path or bytes that cannot be probed.
    """
    images = ([ex["image"]] if ex.get("image") is not None else []) + list(ex.get("images") or ())
    videos = [_as_video(v) for v in ([ex["video"]] if ex.get("video") is not None else []) +
              list(ex.get("videos") or ())]
    want = placeholder_kinds(ex.get("question", ""))
    if not want:
        return [("image", im) for im in images] + [("video", v) for v in videos]
    if want.count("image") != len(images) or want.count("video") != len(videos):
        raise ValueError(f"example {ex.get('id')}: the question's placeholders {PLACEHOLDER.findall(ex['question'])} "
                         f"do not match its {len(images)} image(s) and {len(videos)} video(s)")
    pools = {"image": iter(images), "video": iter(videos)}
    return [(kind, next(pools[kind])) for kind in want]


def _as_video(value: Any) -> VideoRef | Clip:
    """A video item as a `VideoRef` (a path or bytes, probed) or the `Clip` it is."""
    return value if isinstance(value, (VideoRef, Clip)) else probe_video(value)


def media_meta(kind: str, value: Any) -> tuple[int, int] | VideoMeta:
    """An image's `(height, width)` px or a video's `VideoMeta`, from the header (refs) or the pixels."""
    if kind == "video":
        return _as_video(value).meta
    if hasattr(value, "height") and not isinstance(value, np.ndarray):
        return value.height, value.width
    return tuple(np.asarray(value).shape[:2])


def load_media(kind: str, value: Any, sampling: VideoSampling):
    """The pixels of an item: an image as uint8 `[H, W, 3]`, a video as the `Clip` of the frames `sampling`
    chooses (a `Clip` already sampled as it is).

    Raises:
      ValueError: an image or video that cannot be decoded.
    """
    if kind == "image":
        if isinstance(value, Image.Image):
            return np.asarray(value.convert("RGB"))
        return value.load() if hasattr(value, "load") else np.asarray(value)
    value = _as_video(value)
    if isinstance(value, VideoRef):
        return value.load(sampling)
    return value if value.indices is not None else sample_clip(value, sampling)


def preview_image(ex: dict) -> np.ndarray:
    """uint8 `[H, W, 3]`: the example's first image, or its video's first sampled frame (for showing a row)."""
    kind, value = example_media(ex)[0]
    if kind == "image":
        return np.asarray(load_media(kind, value, VideoSampling()))
    return load_media(kind, value, VideoSampling()).frames[0]

"""Videos: decoding with PyAV, frame sampling, and writing (for procedural tasks and tests).

Frame sampling (`frame_indices`), the rule of transformers' `Qwen3VLVideoProcessor.sample_frames` (and
qwen-vl-utils): a video of `total` frames at `video_fps` frames per second gives

    n = min(max(floor(total / video_fps * fps), min_frames), max_frames, total)
    indices = round(linspace(0, total - 1, n))

and frame i of the sample is shown at `indices[i] / video_fps` seconds. The Qwen processors then group the frames
into temporal patches of `temporal_patch_size` (the last frame repeated when n is not a multiple): a temporal patch's
timestamp is the mean of its first and last frame's (`temporal_patch_times`, Qwen3-VL's `<t seconds>` text) and
its duration `temporal_patch_size * total / (n * video_fps)` (`second_per_grid_t`, Qwen2.5-VL's temporal M-RoPE
step: qwen-vl-utils' `temporal_patch_size / sample_fps`).

Unreadable or missing files raise a ValueError naming the file (a data row with one is skipped, not fatal).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class VideoSampling:
    """How frames are taken from a video (the data config's `data.video`).

    Attributes:
      fps: frames sampled per second of video.
      min_frames, max_frames: bounds of the number of sampled frames (a clip shorter than `min_frames` frames
        gives all its frames).
      frame_max_tokens: the largest frame, in LM tokens (merged patches): frames are resized (aspect kept) to at
        most `frame_max_tokens * (patch_size * merge_size) ** 2` px, as the Qwen video processors' per-frame
        `max_pixels`.
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 16
    frame_max_tokens: int = 64

    def __post_init__(self):
        if not self.fps > 0:
            raise ValueError(f"video fps={self.fps} must be > 0")
        if not 0 < self.min_frames <= self.max_frames:
            raise ValueError(f"video frames need 0 < min_frames={self.min_frames} <= max_frames={self.max_frames}")
        if self.frame_max_tokens <= 0:
            raise ValueError(f"video frame_max_tokens={self.frame_max_tokens} must be > 0")


@dataclasses.dataclass(frozen=True)
class VideoMeta:
    """What a video's header says: `total_frames`, `fps` (frames per second), `height`, `width` (px)."""

    total_frames: int
    fps: float
    height: int
    width: int

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.total_frames / self.fps


@dataclasses.dataclass(frozen=True)
class Clip:
    """Decoded video frames uint8 `[F, H, W, 3]` at `fps` frames per second (frame i at `i / fps` s): a
    procedural task's video, or a file's after `read_video` (then already sampled: see `indices`).

    Attributes:
      frames: uint8 `[F, H, W, 3]`.
      fps: the source's frames per second.
      indices: int `[F]`, each frame's index in the source (None: `0..F-1`, all frames).
      total_frames: frames of the source (None: F).
    """

    frames: np.ndarray
    fps: float
    indices: np.ndarray | None = None
    total_frames: int | None = None

    @property
    def meta(self) -> VideoMeta:
        f, h, w = self.frames.shape[:3]
        return VideoMeta(self.total_frames or f, float(self.fps), h, w)


@dataclasses.dataclass(frozen=True)
class VideoRef:
    """A video not decoded yet: `value` (an absolute path or encoded bytes) and its `meta` (from the header).
    `load(sampling)` decodes the sampled frames (`read_video`)."""

    value: Any
    meta: VideoMeta

    def load(self, sampling: VideoSampling) -> Clip:
        return read_video(self.value, sampling, meta=self.meta)


def frame_indices(total_frames: int, video_fps: float, sampling: VideoSampling) -> np.ndarray:
    """Indices int64 `[n]` of the frames sampled from a video of `total_frames` at `video_fps` (module docstring).

    Raises:
      ValueError: a video without frames or with a non-positive frame rate.
    """
    if total_frames <= 0 or not video_fps > 0:
        raise ValueError(f"a video of {total_frames} frames at {video_fps} fps has nothing to sample")
    n = math.floor(total_frames / video_fps * sampling.fps)
    n = min(max(n, sampling.min_frames), sampling.max_frames, total_frames)
    return np.linspace(0, total_frames - 1, n).round().astype(np.int64)


def temporal_patch_times(indices: np.ndarray, video_fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch of the frames `indices` (the last repeated to fill the last patch): the mean
    of its first and last frame's time (transformers' `Qwen3VLProcessor._calculate_timestamps`)."""
    idx = [int(i) for i in indices]
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    t = [i / video_fps for i in idx]
    return [(t[i] + t[i + temporal_patch_size - 1]) / 2 for i in range(0, len(t), temporal_patch_size)]


def second_per_grid_t(meta: VideoMeta, num_frames: int, temporal_patch_size: int) -> float:
    """Seconds of video one temporal patch spans: `temporal_patch_size / sample_fps` with `sample_fps =
    num_frames / duration` (qwen-vl-utils; transformers' `Qwen2_5_VLProcessor` `second_per_grid_ts`)."""
    return temporal_patch_size * meta.duration / num_frames


def sample_clip(clip: Clip, sampling: VideoSampling) -> Clip:
    """The frames of an in-memory `clip` (all of its source's frames) that `sampling` takes."""
    idx = frame_indices(len(clip.frames), clip.fps, sampling)
    return Clip(clip.frames[idx], clip.fps, idx, len(clip.frames))


def encoded_file(value: Any, base_dir: str | None = None, kind: str = "video") -> str | bytes:
    """The encoded image or video (`kind`, for messages) a dataset field names: a path (joined to `base_dir` when
    relative; it must exist) or bytes, from a path, bytes or a `{"bytes", "path"}` dict (HF `datasets`' layout).

    Raises:
      ValueError: a missing file or an unsupported type.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"{kind} must be a path, bytes or {{'bytes', 'path'}} dict, got {type(value).__name__}")
    path = value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
    if not os.path.exists(path):
        raise ValueError(f"{kind} file {path} does not exist")
    return path


def _what(encoded: str | bytes) -> str:
    return f"video bytes ({len(encoded)} bytes)" if isinstance(encoded, bytes) else f"video file {encoded}"


def _open(encoded: str | bytes):
    """`(container, its first video stream)` of an encoded video; unreadable data raises a ValueError."""
    import av

    try:
        container = av.open(io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded)
        return container, container.streams.video[0]
    except (av.error.FFmpegError, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"{_what(encoded)} is not a readable video: {e}") from None


def probe_video(value: Any, base_dir: str | None = None) -> VideoRef:
    """A `VideoRef` of a path, bytes or `{"bytes", "path"}` dict: its header's frame count, rate and size (the
    frames are counted by decoding when the container does not store the count).

    Raises:
      ValueError: a missing file, data that is not a video, a video without frames.
    """
    import av

    encoded = encoded_file(value, base_dir)
    container, stream = _open(encoded)
    with container:
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        total, height, width = int(stream.frames or 0), stream.codec_context.height, stream.codec_context.width
        if total <= 0:
            try:
                total = sum(1 for _ in container.decode(stream))
            except av.error.FFmpegError as e:
                raise ValueError(f"{_what(encoded)} is not a readable video: {e}") from None
    if total <= 0 or fps <= 0 or not height or not width:
        raise ValueError(f"{_what(encoded)}: {total} frames at {fps} fps of {height}x{width} px has nothing to sample")
    return VideoRef(encoded, VideoMeta(total, fps, height, width))


def read_video(value: Any, sampling: VideoSampling, base_dir: str | None = None,
               meta: VideoMeta | None = None) -> Clip:
    """The frames `sampling` takes from a video file or bytes (decoded with PyAV), as a `Clip` with their
    indices; `meta`: its header, when probed already (`VideoRef`).

    Raises:
      ValueError: a missing or unreadable file, or one that ends before its header's frame count.
    """
    import av

    encoded = encoded_file(value, base_dir)
    meta = meta or probe_video(encoded).meta
    idx = frame_indices(meta.total_frames, meta.fps, sampling)
    wanted = {int(i): k for k, i in enumerate(idx)}  # the indices are distinct: n <= total
    frames: list[np.ndarray | None] = [None] * len(idx)
    container, stream = _open(encoded)
    with container:
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[wanted[i]] = frame.to_ndarray(format="rgb24")
                if i >= idx[-1]:
                    break
        except av.error.FFmpegError as e:
            raise ValueError(f"{_what(encoded)} is not a readable video: {e}") from None
    if any(f is None for f in frames):
        raise ValueError(f"{_what(encoded)} ended before frame {int(idx[-1])} of the {meta.total_frames} its header "
                         f"promised")
    return Clip(np.stack(frames), meta.fps, idx, meta.total_frames)


def write_video(path: str, frames: np.ndarray, fps: float, codec: str = "mpeg4") -> str:
    """Write uint8 frames `[F, H, W, 3]` (H, W even) to `path` (mp4 / webm / mkv by its extension) at `fps`;
    returns `path`."""
    import fractions

    import av

    frames = np.asarray(frames, np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path

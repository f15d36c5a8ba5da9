"""grain input pipelines: examples -> batches of model inputs.

    source (TFDS array_record / a task / imported rows)
      -> seeded shuffle, repeat (reshuffled every epoch) -> this process's shard (every k-th element)
      -> preprocess: the model's image input (LLaVA: square resize + normalise; Qwen-VL: aspect-preserving
         resize + patches padded to a static budget), chat template with the image's token count, tokenise,
         left-pad the prompt (+ right-padded completion for SFT), rescale box answers to the model's image frame
      -> batch -> (threads / worker processes) prefetch

The iterator's state is checkpointable (`get_state` / `set_state`, a small dict): a resumed run sees
exactly the batches an uninterrupted run would. Batches are dicts of numpy arrays:

  pixel_values   float32 [B, H, W, 3]  in [-1, 1] (LLaVA, SigLIP normalisation: (x/255 - 0.5) / 0.5), or a
                 `QwenImages` (patches [B, P, 1176], grid_thw int32 [B, K, 3], time_interval float32 [B, K]:
                 each row's images and video, `rftjax.data.media`) for Qwen-VL
  prompt_ids     int32 [B, P]          left-padded with <pad>
  prompt_mask    bool  [B, P]
  completion_ids int32 [B, C], completion_mask bool [B, C]   (with_completion only: trace + <eos>)
  answer, answer_type, id, question    str [B]
  skipped_rows   int32 [B]             unreadable rows skipped in this row's place (`importers.LazyExamples`)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image

from rftjax.data.media import example_media, load_media, media_meta
from rftjax.data.qwen_image import QwenImageProcessor, choose_bucket
from rftjax.data.tasks import Task
from rftjax.data.tasks.grounding import format_box
from rftjax.data.tokenizer import MediaSpan, TextTokenizer, pad_left, pad_right, spans_text
from rftjax.data.video import VideoMeta, VideoSampling, frame_indices, second_per_grid_t, temporal_patch_times
from rftjax.models.family import family_of
from rftjax.models.qwen_vl import QwenImages
from rftjax.rewards.boxes import parse_box


class TaskSource:
    """Random-access source of a procedural task split (`len`, `[i]`), for grain or for tests.

    Generates on the fly (no files): the fast path when TFDS is not wanted (e.g. on an accelerator host).
    Element i is the task's example `offset + i` of `split` (disjoint ranges give disjoint example sets).
    """

    def __init__(self, task: Task, split: str, num_examples: int | None = None, offset: int = 0):
        self.task, self.split, self.offset = task, split, int(offset)
        self.n = task.default_sizes[split] if num_examples is None else int(num_examples)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.task.example(self.split, self.offset + int(index))

    def __repr__(self):
        return f"TaskSource({self.task.name}, {self.split}, n={self.n}, offset={self.offset})"


class TfdsSource:
    """Adapts a `tfds.data_source` split (text fields come back as bytes) to example dicts."""

    def __init__(self, data_source):
        self.source = data_source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        rec = self.source[int(index)]
        return {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in rec.items()}


@dataclasses.dataclass(frozen=True)
class SquareImages:
    """LLaVA-layout image input: resize to `size x size` (bilinear), SigLIP normalisation to [-1, 1].

    Calling it on a uint8 `[H, W, 3]` image gives float32 `[size, size, 3]`; every image becomes
    `num_tokens` image tokens.
    """

    size: int
    num_tokens: int

    def tokens(self, height: int, width: int) -> int:
        """Image tokens of an image of `height x width` px (always `num_tokens`)."""
        return self.num_tokens

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """`(height, width)` in px of the model's view of the image."""
        return self.size, self.size

    def fit_batch(self, pixel_values: np.ndarray) -> np.ndarray:
        """A batch as it is (square images have one shape)."""
        return pixel_values

    def to_unit(self, pixel_values: np.ndarray) -> np.ndarray:
        """The images of a batch `[B, size, size, 3]` as float32 pixels in [0, 1], `[B, size, size, 3]`."""
        return (np.asarray(pixel_values, np.float32) + 1.0) * 0.5

    def from_unit(self, unit: np.ndarray, pixel_values: np.ndarray) -> np.ndarray:
        """The batch `pixel_values` with its images replaced by `unit` (`to_unit`'s layout)."""
        return (np.asarray(unit, np.float32) * 2.0 - 1.0).astype(np.asarray(pixel_values).dtype)

    def spans(self, metas: list) -> list[MediaSpan]:
        """The prompt spans of a row's media (`media_meta`s): one image of `num_tokens`.

        Raises:
          ValueError: anything but exactly one image.
        """
        if len(metas) != 1 or isinstance(metas[0], VideoMeta):
            raise ValueError(f"this model takes exactly one image per prompt, got {len(metas)} media items; several "
                             f"images and videos need a Qwen-VL model")
        return [MediaSpan("image", self.num_tokens)]

    def pack(self, items: list) -> np.ndarray:
        """The pixel values of a row's one loaded image (`spans` checked the row)."""
        return self(items[0][1])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image must be [H, W, 3], got {img.shape}")
        if img.shape[:2] != (self.size, self.size):
            img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((self.size, self.size), Image.BILINEAR))
        return (img.astype(np.float32) / 255.0 - 0.5) / 0.5


@dataclasses.dataclass(frozen=True)
class QwenPatchImages:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL media input: images by the aspect-preserving `QwenImageProcessor`, videos
    sampled (`rftjax.data.video`) and patched by its `video`, a row's items packed into the model's
    `max_image_tokens` budget.

    `pack(items)` of a row's loaded items gives a `QwenImages` of one row, unbatched: patches `[P, patch_dim]` in
    `dtype` (`P = max_image_tokens * merge_unit`), grid_thw int32 `[max_items, 3]` and time_interval float32
    `[max_items]`; grain's batching stacks them to `[B, ...]`, then `fit_batch` cuts the batch's padding down to the
    smallest of `buckets` that holds its largest row (one compilation per bucket,
    `QwenVLConfig.image_token_buckets`).

    Attributes:
      processor, max_image_tokens, merge_unit, buckets: the model's (`QwenVLConfig`).
      dtype: the model's compute dtype, the dtype its patch embedding casts the patches to before anything else
        reads them: storing them in it changes no result and halves every host and device copy in bfloat16 (a
        batch of 16 photo-sized images is 308 MB of float32 patches).
      max_items: grid rows per row (`QwenVLConfig.max_media_items`): images, videos, and with `split_frames`
        each temporal patch of a video.
      video: frame sampling and per-frame size (`VideoSampling`).
      split_frames: Qwen3-VL: each temporal patch of a video is its own item behind a `<t seconds>` timestamp.
      tokens_per_second: Qwen2.5-VL's temporal M-RoPE rate (a video's step per temporal patch is
        `tokens_per_second * second_per_grid_t`); None: 1 per temporal patch (Qwen2-VL).
    """

    processor: QwenImageProcessor
    max_image_tokens: int
    merge_unit: int = 4
    buckets: tuple[int, ...] = ()
    dtype: Any = np.float32
    max_items: int = 1
    video: VideoSampling = VideoSampling()
    split_frames: bool = False
    tokens_per_second: float | None = None

    def fit_batch(self, images: QwenImages) -> QwenImages:
        """`images` (patches `[B, max_image_tokens * merge_unit, D]`) with patches cut to
        `[B, bucket * merge_unit, D]`, the bucket the smallest of `buckets` (and `max_image_tokens`) holding the
        batch's largest row; only zero padding is removed."""
        largest = int(_row_patches(images.grid_thw).max()) // self.merge_unit
        budget = choose_bucket(largest, sorted({*self.buckets, self.max_image_tokens})) * self.merge_unit
        return images.replace(patches=images.patches[:, :budget])

    def _per_channel(self):
        p = self.processor
        shape = (1, 1, len(p.mean), 1, 1)  # [B, P, C, temporal_patch_size, patch_size ** 2]
        return np.reshape(np.asarray(p.mean, np.float32), shape), np.reshape(np.asarray(p.std, np.float32), shape)

    def to_unit(self, images: QwenImages) -> np.ndarray:
        """The pixels of a batch's patches as float32 in [0, 1], `[B, P, C, temporal_patch_size, patch_size ** 2]`
        (every frame of a temporal patch: a video's two frames, an image's two copies of itself; the padding past
        a row's items included)."""
        p = self.processor
        x = np.asarray(images.patches, np.float32)
        b, n = x.shape[:2]
        mean, std = self._per_channel()
        return x.reshape(b, n, len(p.mean), p.temporal_patch_size, -1) * std + mean

    def from_unit(self, unit: np.ndarray, images: QwenImages) -> QwenImages:
        """`images` with its pixels replaced by `unit` (`to_unit`'s layout), normalised again. A temporal patch
        whose frames were equal in `images` (an image, repeated over the temporal patch by the processor) takes
        its first frame's new pixels for every copy, as an image distorted before processing would; a video's
        frames keep their own. The padding past each row's items stays as it was."""
        mean, std = self._per_channel()
        x = (np.asarray(unit, np.float32) - mean) / std
        b, n, c, t = x.shape[:4]
        old = np.asarray(images.patches).reshape(b, n, c, t, -1)
        still = np.all(old == old[:, :, :, :1], axis=(2, 3, 4))
        x = np.where(still[:, :, None, None, None], x[:, :, :, :1], x).reshape(b, n, -1)
        real = np.arange(n)[None, :] < _row_patches(images.grid_thw)[:, None]
        patches = np.where(real[..., None], x, np.asarray(images.patches, np.float32))
        return images.replace(patches=patches.astype(np.asarray(images.patches).dtype))

    def tokens(self, height: int, width: int) -> int:
        """Image tokens of an image of `height x width` px (`grid_h * grid_w / merge_unit` after resizing)."""
        return self.processor.num_image_tokens(height, width)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return self.processor.resized_size(height, width)

    @property
    def frame_max_pixels(self) -> int:
        return self.video.frame_max_tokens * self.processor.factor ** 2

    def spans(self, metas: list) -> list[MediaSpan]:
        """The prompt spans of a row's media (`rftjax.data.media.media_meta`s: `(height, width)` or `VideoMeta`),
        computed from sizes alone.

        Raises:
          ValueError: a row over its budgets: more than `max_items` grid rows, or more than `max_image_tokens`
            tokens in all (names both and the config fields to raise).
        """
        out, rows = [], 0
        tp = self.processor.temporal_patch_size
        for meta in metas:
            if not isinstance(meta, VideoMeta):
                out.append(MediaSpan("image", self.tokens(*meta)))
                rows += 1
                continue
            idx = frame_indices(meta.total_frames, meta.fps, self.video)
            h, w = self.processor.frame_size(meta.height, meta.width, self.frame_max_pixels)
            per_frame, t = (h // self.processor.factor) * (w // self.processor.factor), -(-len(idx) // tp)
            if self.split_frames:
                out.append(MediaSpan("video", per_frame, tuple(temporal_patch_times(idx, meta.fps, tp))))
            else:
                out.append(MediaSpan("video", per_frame * t))
            rows += t if self.split_frames else 1
        total = sum(s.total_tokens for s in out)
        if rows > self.max_items or total > self.max_image_tokens:
            raise ValueError(f"a row of {len(metas)} media items needs {rows} grid rows and {total} image/video "
                             f"tokens, over its budget of max_media_items={self.max_items} and max_image_tokens="
                             f"{self.max_image_tokens}: raise model.max_media_items / model.max_image_tokens, or "
                             f"lower data.video.max_frames / frame_max_tokens")
        return out

    def _items(self, kind: str, value) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """`[(patches, grid_thw [3], time_interval)]` of one loaded item (a video split per temporal patch when
        `split_frames`)."""
        if kind == "image":
            return [(*self.processor(value), 1.0)]
        patches, grid = self.processor.video(value.frames, self.frame_max_pixels)
        if self.split_frames:
            n = int(grid[1] * grid[2])
            return [(patches[i * n:(i + 1) * n], np.asarray([1, grid[1], grid[2]]), 1.0) for i in range(grid[0])]
        step = 1.0 if self.tokens_per_second is None else self.tokens_per_second * second_per_grid_t(
            value.meta, len(value.frames), self.processor.temporal_patch_size)
        return [(patches, grid, step)]

    def pack(self, items: list) -> QwenImages:
        """One row's loaded media items (`[(kind, uint8 image [H, W, 3] or sampled Clip)]`, checked by `spans`)
        packed into the static layout (class docstring).

        Raises:
          ValueError: the row is over its budgets (as `spans`), or has no media.
        """
        parts = [part for kind, value in items for part in self._items(kind, value)]
        if not parts:
            raise ValueError("a row without images or video: every prompt needs its media")
        n = sum(len(p) for p, _, _ in parts)
        if len(parts) > self.max_items or n > self.max_image_tokens * self.merge_unit:
            raise ValueError(f"a row needs {len(parts)} grid rows and {n // self.merge_unit} tokens, over "
                             f"max_media_items={self.max_items} / max_image_tokens={self.max_image_tokens}")
        patches = np.zeros((self.max_image_tokens * self.merge_unit, parts[0][0].shape[1]), self.dtype)
        grids = np.zeros((self.max_items, 3), np.int32)
        steps = np.ones((self.max_items,), np.float32)
        start = 0
        for k, (p, g, step) in enumerate(parts):
            patches[start:start + len(p)] = p
            grids[k], steps[k] = g, step
            start += len(p)
        return QwenImages(patches, grids, steps)

    def __call__(self, image) -> QwenImages:
        """`pack` of one image."""
        return self.pack([("image", image)])


def _row_patches(grid_thw) -> np.ndarray:
    """Patches of each row's items, int `[B]`, from `grid_thw` `[B, K, 3]` (or `[B, 3]`)."""
    g = np.asarray(grid_thw).astype(np.int64).prod(-1)
    return g.sum(-1) if g.ndim == 2 else g


def image_input_for(config, video: VideoSampling | None = None) -> SquareImages | QwenPatchImages:
    """The media input of a model config (its family's `media_input`: `SquareImages` for LLaVA,
    `QwenPatchImages` for Qwen-VL), with the frame sampling `video` where the family reads videos."""
    media = family_of(config).media_input(config)
    return dataclasses.replace(media, video=video) if video is not None and hasattr(media, "video") else media


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The per-example transform (a pure function of the example; `augment` gets its own seeded rng).

    Attributes:
      tokenizer: the text tokenizer (`TextTokenizer` or a checkpoint's `CheckpointTokenizer`).
      images: the model's image input (`image_input_for(model_config)`): pixel values and image-token count.
      max_prompt_len: P; longer prompts raise `PromptTooLongError` naming the example (file datasets drop such
        rows before training: `rftjax.data.importers.drop_long_prompts`).
      with_completion: also emit the tokenised reasoning trace (SFT).
      max_completion_len: C.
      extra_media: `((key, image input), ...)`: the media again as other models read them (a reward model or judge
        of another family, `rftjax.rewards.models.media_of`), emitted as `{key}_pixel_values` and
        `{key}_media_spans`; the image inputs sample videos as `images` does.

    Each example also carries `image_tokens` (int32), the policy's count of its media tokens (all items), and
    `media_spans`, its items' `MediaSpan`s as text (`rftjax.data.tokenizer.spans_text`) for models that render the
    prompt again.
    The media are the example's `image`, `images`, `video` and `videos` (`rftjax.data.media.example_media`).
    """

    tokenizer: TextTokenizer
    images: SquareImages | QwenPatchImages
    max_prompt_len: int
    with_completion: bool = False
    max_completion_len: int = 64
    extra_media: tuple = ()

    def finish_batch(self, batch: dict) -> dict:
        """A batch of preprocessed examples with its images fitted to their bucket (`fit_batch`)."""
        extra = {f"{k}_pixel_values": m.fit_batch(batch[f"{k}_pixel_values"]) for k, m in self.extra_media}
        return {**batch, "pixel_values": self.images.fit_batch(batch["pixel_values"]), **extra}

    def prompt_len(self, question: str, metas: list) -> int:
        """Tokens of the rendered prompt of `question` with media of `metas` (`rftjax.data.media.media_meta`:
        an image's `(height, width)`, a video's `VideoMeta`).

        Raises:
          ValueError: media over the row's budgets (`QwenPatchImages.spans`) or that the model cannot take.
        """
        return len(self.tokenizer.prompt_ids(question, self.images.spans(metas)))

    def answer(self, ex: dict) -> str:
        """Box answers rescaled from the stored image to the model's view of it."""
        if ex["answer_type"] != "box":
            return ex["answer"]
        h, w = np.asarray(ex["image"]).shape[:2]
        box = parse_box(ex["answer"])
        if box is None:
            raise ValueError(f"example {ex.get('id')}: box answer {ex['answer']!r} is not [x1, y1, x2, y2]")
        rh, rw = self.images.resized_size(h, w)
        sx, sy = rw / w, rh / h
        return format_box([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])

    def __call__(self, ex: dict) -> dict:
        items = example_media(ex)
        metas = [media_meta(kind, value) for kind, value in items]
        spans = self.images.spans(metas)
        sampling = getattr(self.images, "video", None)
        loaded = [(kind, load_media(kind, value, sampling)) for kind, value in items]
        prompt = self.tokenizer.prompt_ids(ex["question"], spans, self.max_prompt_len, ex.get("id", ""))
        prompt_ids, prompt_mask = pad_left(prompt, self.max_prompt_len, self.tokenizer.pad_id)
        out = {"pixel_values": self.images.pack(loaded), "prompt_ids": np.asarray(prompt_ids, np.int32),
               "prompt_mask": np.asarray(prompt_mask, bool), "answer": self.answer(ex),
               "answer_type": ex["answer_type"], "id": ex.get("id", ""), "question": ex["question"],
               "skipped_rows": np.int32(ex.get("skipped_rows", 0)),
               "image_tokens": np.int32(sum(s.total_tokens for s in spans)), "media_spans": spans_text(spans)}
        for key, media in self.extra_media:
            try:
                extra = media.spans(metas)
            except ValueError as e:
                raise ValueError(f"example {ex.get('id')}: the {key} reads its media differently from the policy "
                                 f"and cannot take this row: {e}") from e
            out[f"{key}_pixel_values"] = media.pack(loaded)
            out[f"{key}_media_spans"] = spans_text(extra)
        if self.with_completion:
            if not ex.get("reasoning"):
                raise ValueError(f"example {ex.get('id')} has no reasoning trace: SFT needs one")
            completion = ex["reasoning"]
            if ex["answer_type"] == "box":  # the trace's box must be in the model's frame too
                completion = completion.replace(f"<answer>{ex['answer']}</answer>", f"<answer>{out['answer']}</answer>")
            ids, mask = pad_right(self.tokenizer.completion_ids(completion), self.max_completion_len,
                                  self.tokenizer.pad_id)
            out["completion_ids"], out["completion_mask"] = np.asarray(ids, np.int32), np.asarray(mask, bool)
        return out


def make_dataset(source: Sequence[dict], preprocess: Preprocess | Callable[[dict], dict], *, batch_size: int,
                 seed: int = 0, shuffle: bool = True, num_epochs: int | None = None, shard: tuple[int, int] = (0, 1),
                 augment: Callable[[dict, np.random.Generator], dict] | None = None, num_threads: int = 2,
                 num_workers: int = 0) -> grain.IterDataset:
    """The grain pipeline of the module docstring.

    Args:
      source: random-access examples (`TaskSource`, `TfdsSource`, a list of imported examples).
      preprocess: usually a `Preprocess` (its `finish_batch`, when it has one, maps each batch).
      batch_size: per-process batch size.
      seed: shuffle seed (and augmentation seed).
      shuffle: shuffle (per epoch) or keep source order (evaluation).
      num_epochs: None repeats forever (training); 1 for one pass (evaluation).
      shard: `(process_index, process_count)`, this process's shard (`jax.process_index()`, `jax.process_count()`):
        global batch j is elements `[j * B, (j + 1) * B)` of the shuffled stream (`B = batch_size * count`), as
        in a one-process run with batch size B, and process i reads its block of it, elements
        `j * B + i * batch_size + [0, batch_size)`; shards are disjoint and the process-order concatenation of
        their batches is the one-process batch (`rftjax.sharding.Placement`). A final partial batch is dropped.
      augment: `f(example, rng) -> example` applied after preprocessing, with a seeded per-element rng
        (see `rftjax.data.augment`); off when None.
      num_threads: grain's in-process read-ahead threads (8 batches ahead).
      num_workers: > 0 moves preprocessing to that many worker processes (`mp_prefetch`).

    Returns:
      a `grain.IterDataset`; `iter(ds)` gives a checkpointable iterator of batch dicts.

    Raises:
      ValueError: bad sharding arguments or an empty source.
    """
    if len(source) == 0:
        raise ValueError("the data source is empty")
    process_index, process_count = shard
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.seed(seed).shuffle()
    ds = ds.repeat(num_epochs).map(preprocess)
    if augment is not None:
        ds = ds.seed(seed + 1).random_map(augment)  # seeded by the global index: the same for any process count
    if process_count > 1:  # lazy: a process preprocesses only its own elements
        ds = grain.MapDataset.source(_ProcessBlocks(ds, batch_size, process_index, process_count))
    ds = ds.batch(batch_size, drop_remainder=True)
    if hasattr(preprocess, "finish_batch"):
        ds = ds.map(preprocess.finish_batch)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8))
    if num_workers > 0:
        _mark_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


class _ProcessBlocks:
    """Process `index`'s elements of `parent` (random access): block `index` of every global batch of
    `batch_size * count` elements (`make_dataset`)."""

    def __init__(self, parent, batch_size: int, index: int, count: int):
        self.parent, self.b, self.index, self.count = parent, batch_size, index, count

    def __len__(self) -> int:
        return len(self.parent) // (self.b * self.count) * self.b

    def __getitem__(self, j: int):
        j = int(j)
        return self.parent[(j // self.b) * self.b * self.count + self.index * self.b + j % self.b]


def _mark_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside `app.run` they must be marked parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def iterator_state(it) -> dict[str, Any]:
    """JSON-able state of a pipeline iterator (for checkpoints)."""
    state = it.get_state()
    return json.loads(json.dumps(state, default=lambda o: o.decode() if isinstance(o, bytes) else str(o)))

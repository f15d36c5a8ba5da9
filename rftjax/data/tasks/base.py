"""What every task provides: seeded, deterministic examples by (split, index).

An example is a plain dict (the record TFDS writes and grain reads):

  id           str   unique within the task, e.g. "digits/test/17"
  task         str   task name
  image        uint8 [H, W, 3] (or absent: `images`, a list of them, and/or `video`, a `rftjax.data.video.Clip`;
               `rftjax.data.media`)
  question     str   the question, without the image placeholder or chat template
  answer       str   the verifiable answer ("11", "B", "[3, 5, 17, 19]", a LaTeX expression); "" for `open`
  answer_type  str   one of ANSWER_TYPES: how rewards compare a prediction with `answer`; `open`: no gold answer
                     (open-ended: only a reward model or judge scores it, `rftjax.rewards.sources.gate_rows`)
  reasoning    str   a short trace "<think>...</think><answer>...</answer>" for the SFT cold start ("" if none)
  meta         str   JSON with what generated the example (scene description, source ids)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from rftjax.rewards.accuracy import ANSWER_TYPES  # noqa: F401  (re-exported: the types an example may have)

SPLITS = ("train", "validation", "test", "test_ood")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example `index` of `split`: independent streams per (seed, split, index)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if index < 0:
        raise ValueError(f"example index must be >= 0, got {index}")
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def trace(thought: str, answer: str) -> str:
    """The cold-start completion format: `<think>thought</think><answer>answer</answer>`."""
    return f"<think>{thought}</think><answer>{answer}</answer>"


def make_example(task: str, split: str, index: int, image: np.ndarray | None, question: str, answer: str,
                 answer_type: str, thought: str = "", meta: dict[str, Any] | None = None, **media) -> dict:
    """Assemble and check one example dict (see the module docstring). `image` is uint8 `[H, W, 3]`, or an
    object with `load()` returning one (`rftjax.data.importers.ImageRef`, decoded when the row is read), or None
    when `media` holds the example's `images` and/or `video`.

    Raises:
      ValueError: an unknown answer type, a malformed image, no media at all.
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type {answer_type!r} not in {ANSWER_TYPES}")
    if image is None and not media:
        raise ValueError("an example needs an image, images or a video")
    if image is not None and not hasattr(image, "load") and (
            image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3):
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    out = {"id": f"{task}/{split}/{index}", "task": task, "question": question, "answer": answer,
           "answer_type": answer_type, "reasoning": trace(thought, answer) if thought else "",
           "meta": json.dumps(meta or {}, sort_keys=True), **media}
    return out if image is None else {**out, "image": image}


class Task:
    """Base class: subclasses set `name`, `default_sizes` and implement `example(split, index)`."""

    name = "task"
    default_sizes = {"train": 5000, "validation": 500, "test": 1000, "test_ood": 500}

    def __init__(self, seed: int = 0, image_size: int = 64):
        self.seed = int(seed)
        self.image_size = int(image_size)

    def example(self, split: str, index: int) -> dict:
        raise NotImplementedError

    def examples(self, split: str, n: int | None = None):
        """The first `n` examples of `split` (default: `default_sizes[split]`)."""
        for i in range(self.default_sizes[split] if n is None else n):
            yield self.example(split, i)

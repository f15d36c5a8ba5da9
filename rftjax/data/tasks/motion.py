"""`motion`: short procedural videos of CLEVR-like objects (Video-R1-style questions about what happens over time).

Each example is a `Clip` of `num_frames` frames at `fps` (no still image). Two question kinds:

- direction (multiple choice): one object moves in a straight line across the frames, others stand still; "In
  which direction does the red circle move?" with options (A) left (B) right (C) up (D) down; answer the letter.
- count (int): objects appear one after another, each from its own frame on; "How many objects appear in the
  video?"; answering needs the last frames, not the first.

The cold-start trace names the object's first and last position (direction) or each object as it appears
(count). `test_ood` uses twice as many frames (a longer clip).
"""

from __future__ import annotations

import numpy as np

from rftjax.data.tasks.base import Task, example_rng, make_example
from rftjax.data.tasks.scenes import describe, render, sample_scene, where
from rftjax.data.video import Clip

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPTIONS = "(A) left (B) right (C) up (D) down"


def _shifted(o: dict, dx: int, dy: int) -> dict:
    x1, y1, x2, y2 = o["box"]
    return {**o, "box": [x1 + dx, y1 + dy, x2 + dx, y2 + dy]}


class MotionTask(Task):
    """See the module docstring. `num_frames` frames (8 by default; `test_ood`: 16) at `fps` (4)."""

    name = "motion"
    default_sizes = {"train": 5000, "validation": 200, "test": 200, "test_ood": 100}

    def __init__(self, seed: int = 0, image_size: int = 64, num_frames: int = 8, fps: float = 4.0):
        super().__init__(seed, image_size)
        if num_frames < 2:
            raise ValueError(f"motion: num_frames={num_frames} must be >= 2 (motion needs two frames)")
        self.num_frames, self.fps = int(num_frames), float(fps)

    def _direction(self, rng, frames: int):
        size = self.image_size
        name = str(rng.choice(list(DIRECTIONS)))
        dx, dy = DIRECTIONS[name]
        travel = size // 2  # the mover crosses half the frame
        objects = sample_scene(rng, int(rng.integers(2, 4)), size // 2, margin=1)
        # objects are placed in a quarter of the frame: the mover starts in the half it moves away from and
        # travels along one band (top for horizontal moves, left for vertical ones); the others stand in the other
        mover = _shifted(objects[0], size // 2 if dx < 0 else 0, size // 2 if dy < 0 else 0)
        others = [_shifted(o, 0 if dx else size // 2, size // 2 if dx else 0) for o in objects[1:]]
        steps = [round(travel * i / (frames - 1)) for i in range(frames)]
        video = np.stack([render([_shifted(mover, dx * s, dy * s)] + others, size) for s in steps])
        first, last = mover["box"], _shifted(mover, dx * travel, dy * travel)["box"]
        letter = "ABCD"[list(DIRECTIONS).index(name)]
        thought = (f"In the first frame the {describe(mover)} is at the {where(first, size)}; in the last frame it is "
                   f"at the {where(last, size)}. It moves {name}.")
        question = f"In which direction does the {describe(mover)} move?\nOptions: {OPTIONS}"
        return video, question, letter, "choice", thought, {"kind": "direction", "direction": name,
                                                               "object": describe(mover)}

    def _count(self, rng, frames: int):
        n = int(rng.integers(1, min(frames, 5) + 1))
        objects = sample_scene(rng, n, self.image_size)
        starts = sorted(rng.choice(frames, n, replace=False).tolist())
        video = np.stack([render([o for o, t in zip(objects, starts) if t <= f], self.image_size)
                          for f in range(frames)])
        seen = "; ".join(f"at {t / self.fps:.1f} s a {describe(o)} appears" for o, t in zip(objects, starts))
        return video, "How many objects appear in the video?", str(n), "int", f"{seen.capitalize()}. That is {n}.", \
            {"kind": "count", "starts": starts}

    def example(self, split: str, index: int) -> dict:
        rng = example_rng(self.seed, split, index)
        frames = self.num_frames * (2 if split == "test_ood" else 1)
        make = self._direction if rng.random() < 0.5 else self._count
        video, question, answer, answer_type, thought, meta = make(rng, frames)
        return make_example(self.name, split, index, None, question, answer, answer_type, thought, meta,
                            video=Clip(video, self.fps))

"""`digits`: 1-4 real handwritten digits on a canvas; sum, count or largest digit.

Digit images are scikit-learn's bundled `load_digits` (1,797 8x8 scans from UCI, shipped in the wheel,
works offline), upscaled 2x. The image pool is split once: train, validation and test draw from disjoint
images, so test problems only show digit images never seen in training. `test_ood` shows 5-6 digits (more
than training ever shows) drawn from the test pool. `data.num_digits` changes the counts per split (e.g. traces
for 1-3 digits only, RL and test on 1-5, OOD 6).
"""

from __future__ import annotations

import functools

import numpy as np

from rftjax.data.tasks.base import Task, example_rng, make_example

CELL = 16  # each digit occupies a 16x16 cell of the canvas grid
QUESTIONS = {
    "sum": "What is the sum of the digits in the image?",
    "count": "How many digits are in the image?",
    "largest": "What is the largest digit in the image?",
}


def running_sum(digits: list[int]) -> str:
    """The sum written one two-operand addition at a time: `[8, 1, 9]` -> `"8 + 1 = 9. 9 + 9 = 18."`.

    Each step adds one digit to the running total, so the model learns ~280 two-operand facts (total 0-27 plus
    a digit) that every sum reuses, instead of a separate `a + b + c + d` fact per digit combination, and a
    policy-gradient update credits the step that went wrong.
    """
    total, steps = digits[0], []
    for d in digits[1:]:
        steps.append(f"{total} + {d} = {total + d}.")
        total += d
    return " ".join(steps)


@functools.lru_cache(maxsize=1)
def digit_pool() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """`(images uint8 [1797, 16, 16], labels [1797], {split: source indices})`, pools disjoint by split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    imgs = np.clip(np.asarray(data.images) * (255.0 / 16.0), 0, 255).astype(np.uint8)
    imgs = imgs.repeat(2, axis=1).repeat(2, axis=2)
    perm = np.random.default_rng(1234).permutation(len(imgs))
    pools = {"train": perm[:1200], "validation": perm[1200:1400], "test": perm[1400:], "test_ood": perm[1400:]}
    return imgs, np.asarray(data.target), pools


NUM_DIGITS = {"train": (1, 4), "validation": (1, 4), "test": (1, 4), "test_ood": (5, 6)}
"""Digits per image of each split, `(fewest, most)`: the default task (`DigitsTask(num_digits=...)` changes them)."""


def parse_range(text: str) -> tuple[int, int]:
    """"1-4" -> (1, 4), "6" -> (6, 6).

    Raises:
      ValueError: not N or N-M with 1 <= N <= M.
    """
    lo, _, hi = str(text).partition("-")
    try:
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise ValueError(f"digits per image {text!r}: write N or N-M with 1 <= N <= M (e.g. 1-3)")
    return lo, hi


class DigitsTask(Task):
    """See the module docstring. `image_size` must be a multiple of 16 and at least 48 (a 3x3 grid).
    `num_digits` overrides the digits per image of some splits (`{split: (fewest, most)}`, see `NUM_DIGITS`), e.g.
    scarce traces: `{"train": (1, 3)}` for the SFT examples; at most one digit per 16 px cell of the canvas.

    Raises:
      ValueError: a bad image size, an unknown split or more digits than cells.
    """

    name = "digits"

    def __init__(self, seed: int = 0, image_size: int = 64, num_digits: dict | None = None):
        super().__init__(seed, image_size)
        if image_size % CELL or image_size < 3 * CELL:
            raise ValueError(f"digits: image_size={image_size} must be a multiple of {CELL} and >= {3 * CELL}")
        self.num_digits = {**NUM_DIGITS, **(num_digits or {})}
        cells = (image_size // CELL) ** 2
        if set(self.num_digits) - set(NUM_DIGITS) or max(hi for _, hi in self.num_digits.values()) > cells:
            raise ValueError(f"digits: num_digits={num_digits} must map splits {sorted(NUM_DIGITS)} to at most "
                             f"{cells} digits (the cells of a {image_size} px canvas)")

    def example(self, split: str, index: int) -> dict:
        rng = example_rng(self.seed, split, index)
        imgs, labels, pools = digit_pool()
        grid = self.image_size // CELL
        lo, hi = self.num_digits[split]
        n = int(rng.integers(lo, hi + 1))
        cells = np.sort(rng.choice(grid * grid, size=n, replace=False))  # row-major reading order
        sources = rng.choice(pools[split], size=n, replace=False)
        canvas = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        for cell, src in zip(cells, sources):
            r, c = divmod(int(cell), grid)
            canvas[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = imgs[src][..., None]
        digits = [int(labels[s]) for s in sources]
        kind = str(rng.choice(list(QUESTIONS)))
        listed = ", ".join(map(str, digits))
        seen = f"I see {n} digit{'s' if n > 1 else ''}: {listed}."
        if kind == "sum":
            answer = sum(digits)
            thought = f"{seen} {running_sum(digits)}" if n > 1 else f"{seen} The sum is {answer}."
        elif kind == "count":
            answer, thought = n, f"{seen} That is {n}."
        else:
            answer = max(digits)
            thought = f"{seen} The largest is {answer}."
        meta = {"digits": digits, "cells": cells.tolist(), "sources": sources.tolist(), "question": kind}
        return make_example(self.name, split, index, canvas, QUESTIONS[kind], str(answer), "int", thought, meta)

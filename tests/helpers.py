"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def set_by_path(target, dotted_key: str, value) -> None:
    """`set_by_path(cfg, "a.b.c", v)` does `cfg["a"]["b"]["c"] = v` (dicts and ConfigDicts alike)."""
    *parents, last = dotted_key.split(".")
    for p in parents:
        target = target[p]
    target[last] = value


LONG_WORDS = (20, 45, 90, 300)  # rows 0, 4, 8, ... get this many extra words: some fit, some exceed by various amounts
QUESTION = "How many red cubes are there?"


def write_easyr1(path: str, n: int, rng: np.random.Generator, long_every: int = 0) -> str:
    """An EasyR1 jsonl of `n` rows (`<image>` first in `problem`, a digit answer, `images: [png]`) with images of
    random size and aspect ratio written next to it; every `long_every`-th row gets `LONG_WORDS` extra words."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = []
    for i in range(n):
        h, w = int(rng.integers(40, 140)), int(rng.integers(40, 140))
        name = f"{os.path.basename(path)}.{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(os.path.dirname(path), name))
        extra = " red" * LONG_WORDS[(i // long_every) % len(LONG_WORDS)] if long_every and i % long_every == 0 else ""
        rows.append({"problem": f"<image>{QUESTION}{extra}", "answer": str(int(rng.integers(0, 10))), "images": [name]})
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path

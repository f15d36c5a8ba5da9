"""CLEVR-like 2-D scenes (coloured circles, squares, triangles) for the `shapes` and `grounding` tasks.

Objects never overlap (rejection sampling with a margin); each is drawn filled, inside its box
`[x1, y1, x2, y2]` (pixels, x2/y2 exclusive). Source of the idea: Johnson et al. 2017 (CLEVR) and
R1-V's CLEVR counting; rendered in 2-D here so it is fast and exact.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (24, 24, 24)


def sample_scene(rng: np.random.Generator, n_objects: int, image_size: int, min_size: int = 9,
                 max_size: int = 14, margin: int = 2) -> list[dict]:
    """`n_objects` non-overlapping objects `{"shape", "colour", "box": [x1, y1, x2, y2]}`.

    Raises:
      ValueError: the objects do not fit (after 2,000 placement attempts per object).
    """
    objects: list[dict] = []
    for _ in range(n_objects):
        for _attempt in range(2000):
            s = int(rng.integers(min_size, max_size + 1))
            x, y = (int(v) for v in rng.integers(1, image_size - s - 1, size=2))
            box = [x, y, x + s, y + s]
            if all(box[0] >= o["box"][2] + margin or o["box"][0] >= box[2] + margin or
                   box[1] >= o["box"][3] + margin or o["box"][1] >= box[3] + margin for o in objects):
                break
        else:
            raise ValueError(f"cannot place {n_objects} objects on a {image_size}px canvas; use a larger image")
        objects.append({"shape": str(rng.choice(SHAPES)), "colour": str(rng.choice(list(COLOURS))), "box": box})
    return objects


def render(objects: list[dict], image_size: int) -> np.ndarray:
    """uint8 `[image_size, image_size, 3]` image of the scene."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
        else:
            draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)
    return np.asarray(img, dtype=np.uint8)


def describe(o: dict) -> str:
    return f"{o['colour']} {o['shape']}"


def where(box: list[int], image_size: int) -> str:
    """Coarse location of a box: "top left", "centre", "bottom" ..."""
    cx, cy = (box[0] + box[2]) / 2 / image_size, (box[1] + box[3]) / 2 / image_size
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return f"{v} {h}".strip() or "centre"

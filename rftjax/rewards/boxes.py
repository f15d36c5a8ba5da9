"""Boxes `[x1, y1, x2, y2]` (pixels, x2/y2 exclusive): parsing, IoU and GIoU.

Sources: IoU as the grounding reward of Visual-RFT (Liu et al. 2025) and VLM-R1 (Shen et al. 2025); GIoU from
Rezatofighi et al. 2019, "Generalized Intersection over Union", Algorithm 1.
"""

from __future__ import annotations

import math
import re

_NUM = r"\s*([-+]?\d{1,7}(?:\.\d{1,6})?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
MAX_BOX_TEXT = 10_000  # only the tail of a longer text is searched (bounded time)


def parse_box(text) -> list[float] | None:
    """The last `[x1, y1, x2, y2]` in `text` as 4 floats, or None (no box, non-finite, or x2 < x1 / y2 < y1).

    Never raises; linear time (the regex has no nested quantifiers, numbers are length-bounded).
    """
    if not isinstance(text, str):
        return None
    matches = _BOX.findall(text[-MAX_BOX_TEXT:])
    if not matches:
        return None
    box = [float(v) for v in matches[-1]]
    if not all(math.isfinite(v) for v in box) or box[2] < box[0] or box[3] < box[1]:
        return None
    return box


def _area(b) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def iou(a, b) -> float:
    """Intersection over union of two boxes, in [0, 1] (0 when either is degenerate)."""
    inter = _area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def giou(a, b) -> float:
    """Generalized IoU in [-1, 1]: `IoU - |C \\ (A u B)| / |C|`, C the smallest enclosing box."""
    inter = _area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = _area(a) + _area(b) - inter
    hull = _area([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])])
    if union <= 0 or hull <= 0:
        return -1.0
    return inter / union - (hull - union) / hull

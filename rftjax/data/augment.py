"""Optional image augmentation for rollouts, off by default.

`gaussian_noise` is NoisyRollout's (Liu et al. 2025, "NoisyRollout: Reinforcing Visual Reasoning with Data
Augmentation") distortion; `random_crop` crops and resizes back, shifting box answers with the image.
Each returns `f(example, rng) -> example` for `make_dataset(augment=...)`, acting on the preprocessed
example (`pixel_values` float [H, W, 3] in [-1, 1]).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from rftjax.data.tasks.grounding import format_box
from rftjax.rewards.boxes import parse_box


def gaussian_noise(std: float = 0.1):
    """Add N(0, std^2) noise (in the [-1, 1] pixel scale), clipped to [-1, 1]."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")

    def f(ex: dict, rng: np.random.Generator) -> dict:
        x = ex["pixel_values"]
        noisy = np.clip(x + rng.normal(0.0, std, x.shape).astype(np.float32), -1.0, 1.0)
        return {**ex, "pixel_values": noisy}

    return f


def random_crop(min_scale: float = 0.8):
    """Crop a random square of side in [min_scale, 1] x the image, resize back; box answers follow."""
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")

    def f(ex: dict, rng: np.random.Generator) -> dict:
        x = ex["pixel_values"]
        size = x.shape[0]
        side = int(round(size * rng.uniform(min_scale, 1.0)))
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        crop = x[y0:y0 + side, x0:x0 + side]
        out = {**ex}
        if side != size:
            channels = [np.asarray(Image.fromarray(crop[..., c]).resize((size, size), Image.BILINEAR))
                        for c in range(crop.shape[2])]
            out["pixel_values"] = np.stack(channels, -1).astype(np.float32)
        else:
            out["pixel_values"] = crop
        if ex.get("answer_type") == "box":
            box = parse_box(ex["answer"])
            if box is not None:
                s = size / side
                b = [(box[0] - x0) * s, (box[1] - y0) * s, (box[2] - x0) * s, (box[3] - y0) * s]
                out["answer"] = format_box([min(max(v, 0), size) for v in b])
        return out

    return f

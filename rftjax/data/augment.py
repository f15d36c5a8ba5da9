"""Image augmentation of RL prompts and NoisyRollout's distorted rollouts, off by default.

Per prompt (`data.augment`): `gaussian_noise` adds pixel noise and `random_crop` crops and resizes back, shifting
box answers with the image; each returns `f(example, rng) -> example` for `make_dataset(augment=...)`, acting on
the preprocessed example (`pixel_values` float [H, W, 3] in [-1, 1]); the update sees the augmented image.

Per rollout group (`rl.noisy_rollout`): `NoisyRollout` (Liu et al. 2025, "NoisyRollout: Reinforcing Visual
Reasoning with Data Augmentation", arXiv 2504.13055) samples half of each group on a distorted copy of the image
(DDPM forward noise or a rotation), with a strength annealed over training; the update sees the clean image.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

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


DDPM_STEPS = 1000


def ddpm_alphas_cumprod(num_steps: int = DDPM_STEPS, beta_min: float = 1e-5, beta_max: float = 5e-3) -> np.ndarray:
    """`abar_t = prod_{s <= t} (1 - beta_s)`, float64 `[num_steps]`, of the sigmoid beta schedule
    `beta = sigmoid(linspace(-6, 6, num_steps)) * (beta_max - beta_min) + beta_min` (NoisyRollout's
    `_add_gaussian_noise`)."""
    x = np.linspace(-6.0, 6.0, num_steps)
    betas = 1.0 / (1.0 + np.exp(-x)) * (beta_max - beta_min) + beta_min
    return np.cumprod(1.0 - betas)


def ddpm_forward(x0: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """DDPM's forward noise `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`, eps ~ N(0, I), float32 like `x0`
    (pixels in [0, 1]; not clipped: `NoisyRollout.distort` clips). Step `t` in `[0, DDPM_STEPS)`.

    Raises:
      ValueError: t outside `[0, DDPM_STEPS)`.
    """
    if not 0 <= t < DDPM_STEPS:
        raise ValueError(f"DDPM step {t} must be in [0, {DDPM_STEPS})")
    abar = ddpm_alphas_cumprod()[t]
    eps = rng.standard_normal(np.shape(x0), dtype=np.float32)
    return (math.sqrt(abar) * np.asarray(x0, np.float32) + math.sqrt(1.0 - abar) * eps).astype(np.float32)


def rotate_expand(images: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Each image of `images` float `[B, H, W, C]` (pixels in [0, 1]) rotated by its angle (degrees,
    counter-clockwise) on a canvas expanded to hold all of it (black corners), resized back to `H x W`, bilinear:
    PIL's `rotate(expand=True)` as NoisyRollout's `apply_rotation`, then the model's resize."""
    out = np.empty_like(images, dtype=np.float32)
    h, w = images.shape[1:3]
    for i, (image, angle) in enumerate(zip(images, angles_deg)):
        for c in range(images.shape[3]):
            rotated = Image.fromarray(np.asarray(image[..., c], np.float32), mode="F").rotate(
                float(angle), resample=Image.BILINEAR, expand=True)
            out[i, ..., c] = np.asarray(rotated.resize((w, h), Image.BILINEAR))
    return out


@dataclasses.dataclass(frozen=True)
class NoisyRollout:
    """NoisyRollout's distortion of the noisy half of each group (Liu et al. 2025, arXiv 2504.13055, Sec. 3 and
    the authors' `image_aug.py`): at RL step t (0-based) of `total_steps`, the strength is `a0 * decay(t)` with
    `decay(t) = 1 - sigmoid(decay_coef * (t - decay_mid_step) / total_steps)`.

    Attributes:
      media: the model's media input (`rftjax.data.pipeline.SquareImages` / `QwenPatchImages`): `to_unit` /
        `from_unit` move a media batch to pixels in [0, 1] and back.
      total_steps: t_max, the RL stage's steps.
      kind: `gaussian`: DDPM forward noise at step `int(noise_step * decay)` (`ddpm_forward`), clipped to [0, 1];
        `rotate`: a rotation by an angle uniform in `+-max_angle * decay` degrees with expansion (square images).
      noise_step: a0 of `gaussian` (of `DDPM_STEPS`; the paper's 500).
      max_angle: a0 of `rotate`, degrees.
      decay_coef: lambda (the paper's 30); decay_mid_step: gamma (40).

    Raises:
      ValueError: an unknown kind, a strength out of range, total_steps < 1.
    """

    media: Any
    total_steps: int
    kind: str = "gaussian"
    noise_step: int = 500
    max_angle: float = 30.0
    decay_coef: float = 30.0
    decay_mid_step: float = 40.0

    def __post_init__(self):
        if self.kind not in ("gaussian", "rotate"):
            raise ValueError(f"rl.noisy_rollout.kind={self.kind!r}; choose gaussian or rotate (or '' for off)")
        if not 0 <= self.noise_step < DDPM_STEPS or self.max_angle < 0 or self.total_steps < 1:
            raise ValueError(f"rl.noisy_rollout: noise_step={self.noise_step} must be in [0, {DDPM_STEPS}), "
                             f"max_angle={self.max_angle} >= 0 and the RL steps {self.total_steps} >= 1")

    def decay(self, step: int) -> float:
        """The annealing factor in (0, 1) at RL step `step` (0-based)."""
        x = self.decay_coef * (step - self.decay_mid_step) / self.total_steps
        return 1.0 - 1.0 / (1.0 + math.exp(-x))

    def strength(self, step: int) -> float:
        """The DDPM step (gaussian; an integer) or the largest angle in degrees (rotate) at RL step `step`."""
        if self.kind == "gaussian":
            return float(int(self.noise_step * self.decay(step)))
        return self.max_angle * self.decay(step)

    def distort(self, media, step: int, rng: np.random.Generator):
        """The distorted copy of a host media batch (one item per prompt) at RL step `step`, drawn from `rng`.

        Raises:
          ValueError: `rotate` on media that are not square `[B, H, W, C]` images.
        """
        unit = self.media.to_unit(media)
        if self.kind == "gaussian":
            noisy = np.clip(ddpm_forward(unit, int(self.strength(step)), rng), 0.0, 1.0)
        else:
            if unit.ndim != 4 or unit.shape[1] != unit.shape[2]:
                raise ValueError("rl.noisy_rollout.kind='rotate' rotates square images (LLaVA); use 'gaussian' for "
                                 "patch-layout media (Qwen-VL)")
            bound = self.strength(step)
            noisy = np.clip(rotate_expand(unit, rng.uniform(-bound, bound, unit.shape[0])), 0.0, 1.0)
        return self.media.from_unit(noisy, media)

"""Weighted composition of reward components; every component is returned for logging.

    total = accuracy_weight * accuracy + format_weight * format + overlong (DAPO soft punishment)

Source of the recipe: R1-V / Visual-RFT (accuracy + format rewards), DAPO Eq. 13 (overlong shaping, see
`rftjax.rewards.overlong_penalty`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rftjax.rewards.accuracy import accuracy
from rftjax.rewards.parsing import check_answer_format, extract_answer, format_ok
from rftjax.rewards.overlong import overlong_penalty


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Weights of the components. `max_len`/`overlong_buffer_len` enable DAPO's overlong penalty (0: off).
    `box_iou`: box answers score their IoU (graded) instead of IoU >= 0.5. `answer_format`: where answers are
    read from and which format is rewarded, `tags` or `boxed` (`rftjax.rewards.parsing`)."""

    accuracy_weight: float = 1.0
    format_weight: float = 0.5
    overlong_buffer_len: int = 0
    max_len: int = 0
    box_iou: bool = True
    answer_format: str = "tags"

    def __post_init__(self):
        check_answer_format(self.answer_format)
        if self.overlong_buffer_len and not 0 < self.overlong_buffer_len <= self.max_len:
            raise ValueError(f"overlong_buffer_len={self.overlong_buffer_len} needs 0 < it <= max_len={self.max_len}")


def score(completions: Sequence[str], answers: Sequence[str], answer_types: Sequence[str],
          lengths: Sequence[int] | None = None, config: RewardConfig = RewardConfig()) -> dict[str, np.ndarray]:
    """Reward components of N completions, each float32 `[N]`: `accuracy` (in [0, 1]; IoU for boxes),
    `correct` (accuracy >= 0.5 for boxes, = accuracy otherwise), `format` (0/1), `overlong` (<= 0), and
    `total`. Never raises on model output.

    Raises:
      ValueError: the argument lists differ in length, or an unknown answer_type.
    """
    n = len(completions)
    if len(answers) != n or len(answer_types) != n or (lengths is not None and len(lengths) != n):
        raise ValueError(f"completions ({n}), answers ({len(answers)}), answer_types ({len(answer_types)}) and "
                         f"lengths must have one entry per completion")
    acc = np.zeros(n, np.float32)
    correct = np.zeros(n, np.float32)
    fmt = np.zeros(n, np.float32)
    for i, (text, gold, kind) in enumerate(zip(completions, answers, answer_types)):
        pred = extract_answer(text, config.answer_format)
        acc[i] = accuracy(pred, gold, kind, box_iou=config.box_iou)
        correct[i] = float(acc[i] >= 0.5) if kind == "box" else acc[i]
        fmt[i] = float(format_ok(text, config.answer_format))
    overlong = np.zeros(n, np.float32)
    if config.overlong_buffer_len and lengths is not None:
        overlong = overlong_penalty(lengths, config.max_len, config.overlong_buffer_len).astype(np.float32)
    total = config.accuracy_weight * acc + config.format_weight * fmt + overlong
    return {"accuracy": acc, "correct": correct, "format": fmt, "overlong": overlong, "total": total.astype(np.float32)}

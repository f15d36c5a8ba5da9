"""DAPO's soft overlong punishment: a length-dependent reward added to the task reward.

Source: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", Sec. 3.4, Eq. 13.
"""

from __future__ import annotations

import numpy as np


def overlong_penalty(lengths, max_len: int, buffer_len: int) -> np.ndarray:
    """Soft overlong punishment (DAPO Eq. 13), float `[N]`, added to the task reward.

    `0` for `|y| <= L_max - L_cache`; `((L_max - L_cache) - |y|) / L_cache` in the buffer
    `(L_max - L_cache, L_max]` (linear from 0 to -1); `-1` beyond `L_max`. `buffer_len = 0` disables it.

    Raises:
      ValueError: buffer_len not in [0, max_len].
    """
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"overlong buffer_len={buffer_len} must be in [0, max_len={max_len}]")
    y = np.asarray(lengths, dtype=np.float64)
    if buffer_len == 0:
        return np.zeros_like(y)
    start = max_len - buffer_len
    return np.where(y <= start, 0.0, np.where(y <= max_len, (start - y) / buffer_len, -1.0))

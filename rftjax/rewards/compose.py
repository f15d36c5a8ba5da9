"""The rule rewards of one completion; every component is returned for logging.

    score = accuracy_weight * accuracy + format_weight * format

or, with a user reward function (`RewardConfig.function`), its `overall`. Source of the recipe: R1-V /
Visual-RFT (accuracy + format rewards). `score` runs in the calling process without a time limit;
`rftjax.rewards.runner.RewardScorer` runs the same `score_one` per completion under a time limit in worker
processes (what training and evaluation use, as `rftjax.rewards.sources.RuleSource`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from typing import Callable, Sequence

import numpy as np

from rftjax.rewards.accuracy import accuracy
from rftjax.rewards.parsing import check_answer_format, extract_answer, format_ok

ON_ERROR = ("raise", "zero")
COMPONENTS = ("accuracy", "correct", "format", "score")  # per completion


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Weights of the components and how they are computed.

    Attributes:
      accuracy_weight, format_weight: weights of the built-in components.
      box_iou: box answers score their IoU (graded) instead of IoU >= 0.5.
      answer_format: where answers are read from and which format is rewarded, `tags` or `boxed`
        (`rftjax.rewards.parsing`).
      function: a user reward function instead of the built-in components, `PATH.py:NAME` (or `PATH.py` for
        `compute_score`), EasyR1's batch signature: `NAME(reward_inputs: list[dict]) -> list[dict]`, each input
        `{"response": str, "response_length": int, "ground_truth": str, "answer_type": str}`, each output
        `{"overall": float, "accuracy": float (default overall), "format": float (default 0)}`. It is called with
        one completion at a time, so that the time limit and errors are per completion.
      timeout_s: the time limit of one completion's reward, seconds (> 0); past it the completion scores 0 and
        counts as a timeout (`rftjax.rewards.runner`).
      num_workers: worker processes that score in parallel (each completion in its own task); 0 scores in the
        calling process with no time limit (debugging).
      on_error: what an exception in the user function does: `raise` (a RuntimeError naming the function and the
        row) or `zero` (reward 0, counted).
    """

    accuracy_weight: float = 1.0
    format_weight: float = 0.5
    box_iou: bool = True
    answer_format: str = "tags"
    function: str = ""
    timeout_s: float = 1.0
    num_workers: int = 0
    on_error: str = "raise"

    def __post_init__(self):
        check_answer_format(self.answer_format)
        if not self.timeout_s > 0 or self.num_workers < 0:
            raise ValueError(f"reward timeout_s={self.timeout_s} must be > 0 and num_workers={self.num_workers} >= 0")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"reward on_error={self.on_error!r}: choose one of {ON_ERROR}")
        if self.function:
            load_function(self.function)  # a bad path or name fails at configuration time


@functools.lru_cache(maxsize=None)
def load_function(spec: str, setting: str = "reward.function") -> Callable:
    """The function of `spec`, `PATH.py:NAME` or `PATH.py` (NAME = `compute_score`), from the Python file PATH;
    cached per process. `setting` names the config field in error messages.

    Raises:
      ValueError: the file does not exist or cannot be imported, or has no callable NAME.
    """
    path, _, name = spec.partition(":")
    name = name or "compute_score"
    if not os.path.isfile(path):
        raise ValueError(f"file {path!r} ({setting}={spec!r}) does not exist")
    module_spec = importlib.util.spec_from_file_location(f"rftjax_user_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - reported with the file's name
        raise ValueError(f"file {path!r} ({setting}={spec!r}) failed to import: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"file {path!r} has no function {name!r} ({setting}={spec!r})")
    return fn


def _user_components(text: str, gold: str, kind: str, length: int, spec: str) -> dict[str, float]:
    out = load_function(spec)([{"response": text, "response_length": int(length), "ground_truth": gold,
                                "answer_type": kind}])
    if not isinstance(out, (list, tuple)) or len(out) != 1 or not isinstance(out[0], dict) or "overall" not in out[0]:
        raise TypeError(f"must return a list with one dict holding 'overall' per input, got {str(out)[:200]}")
    overall = float(out[0]["overall"])
    acc = float(out[0].get("accuracy", overall))
    return {"accuracy": acc, "correct": float(acc >= 0.5) if math.isfinite(acc) else acc,
            "format": float(out[0].get("format", 0.0)), "score": overall}


def score_one(text, gold: str, kind: str, length: int = 0, config: RewardConfig = RewardConfig()) -> dict[str, float]:
    """The reward components (`COMPONENTS`) of one completion: `accuracy` (in [0, 1]; IoU for boxes), `correct`
    (accuracy >= 0.5 for boxes, = accuracy otherwise), `format` (0/1) and `score`, the weighted sum (or the user
    function's `overall`). The built-in components never raise on model output.

    Raises:
      ValueError: an unknown answer_type; anything the user function raises, or TypeError for what it returns.
    """
    if config.function:
        return _user_components(text, gold, kind, length, config.function)
    acc = accuracy(extract_answer(text, config.answer_format), gold, kind, box_iou=config.box_iou)
    fmt = float(format_ok(text, config.answer_format))
    return {"accuracy": acc, "correct": float(acc >= 0.5) if kind == "box" else acc, "format": fmt,
            "score": config.accuracy_weight * acc + config.format_weight * fmt}


def as_arrays(rows: Sequence[dict[str, float]], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-completion dicts -> float32 `[N]` per name of `names`."""
    return {k: np.asarray([r[k] for r in rows], np.float32) for k in names}


def check_lengths(completions: Sequence, answers: Sequence, answer_types: Sequence, lengths=None) -> None:
    """Raise a ValueError unless there is one answer, answer type (and length) per completion."""
    n = len(completions)
    if len(answers) != n or len(answer_types) != n or (lengths is not None and len(lengths) != n):
        raise ValueError(f"completions ({n}), answers ({len(answers)}), answer_types ({len(answer_types)}) and "
                         f"lengths must have one entry per completion")


def score(completions: Sequence[str], answers: Sequence[str], answer_types: Sequence[str],
          lengths: Sequence[int] | None = None, config: RewardConfig = RewardConfig()) -> dict[str, np.ndarray]:
    """The rule components (`COMPONENTS`) of N completions in this process, without a time limit, each float32
    `[N]`; `lengths` (tokens per completion) reach a user function as `response_length`. Never raises on model
    output (the built-in components).

    Raises:
      ValueError: the argument lists differ in length, or an unknown answer_type.
    """
    check_lengths(completions, answers, answer_types, lengths)
    rows = [score_one(t, g, k, 0 if lengths is None else lengths[i], config)
            for i, (t, g, k) in enumerate(zip(completions, answers, answer_types))]
    return as_arrays(rows, COMPONENTS)

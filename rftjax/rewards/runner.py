"""Reward scoring under a per-completion time limit, spread over worker processes.

One completion's reward can take seconds: math-verify on `10^{10^{10^{10}}}` computes the power, and a user
reward function may call a sandbox. `RewardScorer` runs `rftjax.rewards.compose.score_one` for each completion
as its own task in a `pebble.ProcessPool` (a maintained process pool whose per-task timeout terminates the
worker running it and starts a new one, which a thread or `concurrent.futures` cannot do for C code such as a
big-integer power). So a step's rewards take about `completions x mean time / num_workers`, and no completion
takes longer than `timeout_s` (plus the worker restart).

A completion past the limit scores 0 in every component and is flagged in the `timeout` component; an exception
in a user reward function raises a RuntimeError naming the function and the row, or with `on_error="zero"`
scores 0 and is flagged in `error`. The trainer logs their sums as `reward_timeouts` / `reward_errors`.
Workers start lazily (the first `score`) from a `forkserver` (never forked from the JAX process, whose threads
make `fork` unsafe) and stop at `close()` or interpreter exit. The forkserver preloads this module and the
program's main module (`rftjax.train`), which every worker would otherwise import afresh (multiprocessing's
main-module fixup: seconds of JAX imports per worker start and per restart after a timeout).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import multiprocessing
import sys
import warnings
from typing import Sequence

import numpy as np

from rftjax.rewards.compose import COMPONENTS, RewardConfig, as_arrays, check_lengths, score_one

FLAGS = ("timeout", "error")  # per-completion 0/1 components added by the scorer

# A worker re-runs the program's main module (multiprocessing's fixup) that the forkserver preloaded, and runpy warns
# that `pkg.mod` is already imported: expected there. The forkserver imports this module, so its workers inherit it.
warnings.filterwarnings("ignore", r"'.*' found in sys\.modules after import of package", RuntimeWarning)


class RewardScorer:
    """Scores completions with `config` (`RewardConfig`: weights, user function, `timeout_s`, `num_workers`,
    `on_error`). `num_workers=0` scores in this process without a time limit. Call `close()` (or let the
    interpreter exit) to stop the workers."""

    def __init__(self, config: RewardConfig = RewardConfig()):
        self.config = config
        self._pool = None

    def _workers(self):
        if self._pool is None:
            import pebble

            context = multiprocessing.get_context("forkserver")
            main = getattr(sys.modules["__main__"].__spec__, "name", None) or "__main__"
            # (a `pkg.__main__` main module is not re-imported by workers, and importing it would run it)
            context.set_forkserver_preload(["rftjax.rewards.runner", "math_verify",  # restarts need not import it
                                            *([] if main.endswith("__main__") else [main])])
            self._pool = pebble.ProcessPool(max_workers=self.config.num_workers, context=context)
            atexit.register(self.close)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (a later `score` starts new ones)."""
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def score(self, completions: Sequence[str], answers: Sequence[str], answer_types: Sequence[str],
              lengths: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Rule components of N completions, float32 `[N]` each: `COMPONENTS` and the 0/1 flags `timeout` (past `timeout_s`: every component 0) and `error` (the user function raised, with
        `on_error="zero"`: every component 0). `lengths` (tokens per completion) reach a user function as
        `response_length`.

        Raises:
          ValueError: the argument lists differ in length.
          RuntimeError: the user reward function raised on a row (with `on_error="raise"`), naming both.
        """
        check_lengths(completions, answers, answer_types, lengths)
        c, n = self.config, len(completions)
        lengths_or_0 = [0] * n if lengths is None else [int(x) for x in lengths]
        args = list(zip(completions, answers, answer_types, lengths_or_0))
        rows, flags = [], {k: np.zeros(n, np.float32) for k in FLAGS}
        if c.num_workers:
            pool = self._workers()
            futures = [pool.schedule(score_one, (*a, c), timeout=c.timeout_s) for a in args]
        for i, a in enumerate(args):
            try:
                rows.append(futures[i].result() if c.num_workers else score_one(*a, c))
            except concurrent.futures.TimeoutError:
                rows.append(dict.fromkeys(COMPONENTS, 0.0))
                flags["timeout"][i] = 1
            except Exception as e:  # noqa: BLE001 - reported with the function and the row, or counted
                if c.on_error == "raise":
                    if c.num_workers:
                        self.close()
                    what = f"reward function {c.function!r}" if c.function else "the built-in reward"
                    raise RuntimeError(
                        f"{what} failed on row {i} (answer {a[1]!r}, answer_type {a[2]!r}, response "
                        f"{a[0][:200]!r}): {type(e).__name__}: {e}. Fix the function, or set "
                        f"reward.on_error=zero to score such rows 0 (counted in reward_errors)") from e
                rows.append(dict.fromkeys(COMPONENTS, 0.0))
                flags["error"][i] = 1
        return {**as_arrays(rows, COMPONENTS), **flags}

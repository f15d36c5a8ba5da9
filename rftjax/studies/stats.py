"""Statistics of a study's runs: the mean and two-sided t-interval over seeds (`scipy.stats.t`), paired gains, and
bands of curves."""

from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95


def mean_ci(values, confidence: float = CONFIDENCE) -> dict:
    """Mean and two-sided t-interval of the mean of `values` (floats; None and NaN are left out): `{"mean", "lo",
    "hi", "n", "sd", "values"}`, `lo`/`hi` None below 2 values (`mean` None with none).

    The interval is `mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n)` (Student's t, `scipy.stats.t.interval`),
    the usual interval for a handful of seeds; for a paired comparison pass the per-seed differences.
    """
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    out = {"mean": None, "lo": None, "hi": None, "n": int(v.size), "sd": None, "values": v.tolist()}
    if v.size == 0:
        return out
    out["mean"] = float(v.mean())
    if v.size >= 2:
        out["sd"] = float(v.std(ddof=1))
        lo, hi = stats.t.interval(confidence, df=v.size - 1, loc=v.mean(), scale=stats.sem(v))
        out["lo"], out["hi"] = (float(lo), float(hi)) if out["sd"] > 0 else (out["mean"], out["mean"])
    return out


def paired_gains(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """A seed's `(rl_step, accuracy)` curve as gains over its own step 0 (the cold start): seed-to-seed differences
    of the cold starts do not widen the band."""
    start = dict(curve).get(0)
    return [] if start is None else [(step, acc - start) for step, acc in curve]


def difference(a, b):
    return None if a is None or b is None else a - b


def band(curves: list[list[float]]) -> dict | None:
    """Mean and t-interval per position of equal-length curves (None without any)."""
    if not curves or len({len(c) for c in curves}) > 1:
        return None
    cis = [mean_ci(col) for col in zip(*curves)]
    return {key: [ci[key] for ci in cis] for key in ("mean", "lo", "hi")}


def curve_band(curves: list[list[tuple[int, float]]]) -> dict:
    """Per RL step, the mean and t-interval of the seeds evaluated at that step."""
    steps = sorted({s for c in curves for s, _ in c})
    cis = [mean_ci([dict(c).get(step) for c in curves]) for step in steps]
    return {"steps": steps, **{key: [ci[key] for ci in cis] for key in ("mean", "lo", "hi")}}

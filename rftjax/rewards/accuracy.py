"""Answer checking by answer type: int, float (tolerance), multiple-choice letter, math (math-verify), box.

`accuracy(prediction, gold, answer_type)` returns a float reward in [0, 1] and never raises: malformed
or hostile predictions score 0. Source for the math path: HF `math-verify` (the verifier of Open-R1).
"""

from __future__ import annotations

import math
import re
import threading

from rftjax.rewards.boxes import iou, parse_box

_NUMBER = re.compile(r"[-+]?(?:\d{1,30}(?:\.\d{0,30})?|\.\d{1,30})(?:[eE][-+]?\d{1,3})?")
_CHOICE = re.compile(r"\(?([A-Z])\)?(?:[.:)]\s*.*)?", re.DOTALL)
_WRAPPERS = ("\\boxed{", "$", "\\(", "\\)", "\\[", "\\]", "}")


def _clean(s: str) -> str:
    s = s.strip()
    for w in _WRAPPERS:
        s = s.replace(w, "")
    return s.strip().rstrip(".").replace(",", "").strip()


def parse_number(s) -> float | None:
    """The number `s` consists of (after removing `$`, `\\boxed{}`, thousands commas, a final period), else
    None. `"The answer is 5"` is not a number: answers must be the number alone."""
    if not isinstance(s, str) or len(s) > 100:
        return None
    s = _clean(s)
    if not _NUMBER.fullmatch(s):
        return None
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def parse_choice(s) -> str | None:
    """The option letter of `"B"`, `"(B)"`, `"B."`, `"B) text"`, else None."""
    if not isinstance(s, str) or len(s) > 200:
        return None
    m = _CHOICE.fullmatch(_clean(s))
    return m.group(1) if m else None


def math_equal(prediction: str, gold: str) -> bool:
    """Mathematical equivalence by math-verify (LaTeX, fractions, expressions, sets). Bounded: inputs over
    200 characters are rejected; in the main thread math-verify's own 5 s alarm applies, elsewhere the
    length bound is the only guard (its alarm-based timeout does not work off the main thread)."""
    if not isinstance(prediction, str) or len(prediction) > 200 or len(gold) > 200:
        return False
    try:
        from math_verify import parse, verify

        main = threading.current_thread() is threading.main_thread()
        kw = {} if main else {"parsing_timeout": None}
        g = parse(gold if "$" in gold or "\\" in gold else f"${gold}$", **kw)
        p = parse(prediction if "$" in prediction or "\\" in prediction else f"${prediction}$", **kw)
        return bool(verify(g, p, **({} if main else {"timeout_seconds": None})))
    except Exception:  # noqa: BLE001 - model output must never crash a reward
        return False


def accuracy(prediction, gold: str, answer_type: str, float_rel_tol: float = 1e-4, box_iou: bool = True) -> float:
    """Reward in [0, 1] for an extracted answer `prediction` (None scores 0) against `gold`.

    int: equal as numbers. float: `|p - g| <= float_rel_tol * max(1, |g|)`. choice: same option letter.
    math: math-verify equivalence (with a numeric shortcut). box: IoU of the boxes when `box_iou` (a graded
    reward, Visual-RFT), else 1 if IoU >= 0.5. open: no gold answer to match, 0.

    Raises:
      ValueError: unknown answer_type (a config error, not model output).
    """
    if answer_type not in ("int", "float", "choice", "math", "box", "open"):
        raise ValueError(f"unknown answer_type {answer_type!r}")
    if prediction is None or answer_type == "open":
        return 0.0
    try:
        if answer_type in ("int", "float"):
            p, g = parse_number(prediction), parse_number(gold)
            if p is None or g is None:
                return 0.0
            tol = 1e-9 if answer_type == "int" else float_rel_tol * max(1.0, abs(g))
            return float(abs(p - g) <= tol)
        if answer_type == "choice":
            p = parse_choice(prediction)
            return float(p is not None and p == parse_choice(gold))
        if answer_type == "math":
            p, g = parse_number(prediction), parse_number(gold)
            if p is not None and g is not None:
                return float(abs(p - g) <= 1e-6 * max(1.0, abs(g)))
            return float(math_equal(prediction, gold))
        pb, gb = parse_box(prediction), parse_box(gold)
        if pb is None or gb is None:
            return 0.0
        v = iou(pb, gb)
        return v if box_iou else float(v >= 0.5)
    except Exception:  # noqa: BLE001 - model output must never crash a reward
        return 0.0

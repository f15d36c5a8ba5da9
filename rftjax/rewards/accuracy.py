"""Answer checking by answer type: int, float (tolerance), multiple-choice letter, math (math-verify), box, and
Video-R1's question types: numerical (equal to 2 decimals), ocr (1 - word error rate), free-form (mean ROUGE-1/2/L
F1), regression (1 - relative error).

`accuracy(prediction, gold, answer_type)` returns a float reward in [0, 1] and never raises: malformed
or hostile predictions score 0. Source for the math path: HF `math-verify` (the verifier of Open-R1); for the
Video-R1 types, Video-R1's `accuracy_reward` (Feng et al. 2025, `src/r1-v/src/open_r1/grpo.py`): ROUGE as
`rouge_score`'s default tokeniser (lower case, runs of a-z0-9) without stemming.
"""

from __future__ import annotations

import math
import re
import threading

from rftjax.rewards.boxes import iou, parse_box

ANSWER_TYPES = ("int", "float", "choice", "math", "box", "open", "numerical", "ocr", "free-form", "regression")
"""What `accuracy` checks (an example's `answer_type`)."""
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


def _words(s: str, limit: int = 400) -> list[str]:
    """Lower-case runs of letters and digits (ROUGE's tokeniser), at most `limit` of them."""
    return re.findall(r"[a-z0-9]+", s.lower()[:4000])[:limit]


def _edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences (insertions, deletions, substitutions of one cost)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def word_error_rate(prediction: str, gold: str) -> float:
    """Word-level edit distance / words of `gold` (whitespace words, as Video-R1's `wer`); `inf` for an empty
    gold with a non-empty prediction, 0 when both are empty."""
    g, p = gold.split()[:400], prediction.split()[:400]
    if not g:
        return 0.0 if not p else math.inf
    return _edit_distance(g, p) / len(g)


def _f1(overlap: int, n_pred: int, n_gold: int) -> float:
    return 0.0 if overlap == 0 else 2 * overlap / (n_pred + n_gold)


def rouge(prediction: str, gold: str) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F1 (Video-R1's free-form reward; `rouge_score` tokenisation)."""
    p, g = _words(prediction), _words(gold)

    def ngrams(w, n):
        out = {}
        for i in range(len(w) - n + 1):
            out[tuple(w[i:i + n])] = out.get(tuple(w[i:i + n]), 0) + 1
        return out

    scores = []
    for n in (1, 2):
        pn, gn = ngrams(p, n), ngrams(g, n)
        scores.append(_f1(sum(min(c, gn.get(k, 0)) for k, c in pn.items()), sum(pn.values()), sum(gn.values())))
    lcs = [0] * (len(g) + 1)
    for x in p:
        prev = 0
        for j, y in enumerate(g, 1):
            prev, lcs[j] = lcs[j], prev + 1 if x == y else max(lcs[j], lcs[j - 1])
    scores.append(_f1(lcs[-1], len(p), len(g)))
    return sum(scores) / 3


def accuracy(prediction, gold: str, answer_type: str, float_rel_tol: float = 1e-4, box_iou: bool = True) -> float:
    """Reward in [0, 1] for an extracted answer `prediction` (None scores 0) against `gold`.

    int: equal as numbers. float: `|p - g| <= float_rel_tol * max(1, |g|)`. choice: same option letter.
    math: math-verify equivalence (with a numeric shortcut). box: IoU of the boxes when `box_iou` (a graded
    reward, Visual-RFT), else 1 if IoU >= 0.5. open: no gold answer to match, 0. Video-R1's: numerical: both
    with a decimal point or both without, and equal rounded to 2 decimals; ocr: `1 - min(1, word_error_rate)`;
    free-form: `rouge`; regression: `1 - min(1, |p - g| / |g|)` (with 1e-9 added to both).

    Raises:
      ValueError: unknown answer_type (a config error, not model output).
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}")
    if prediction is None or answer_type == "open":
        return 0.0
    try:
        if answer_type == "ocr":
            return 1.0 - min(1.0, word_error_rate(str(prediction), gold))
        if answer_type == "free-form":
            return max(0.0, min(1.0, rouge(str(prediction), gold)))
        if answer_type in ("numerical", "regression"):
            p, g = parse_number(prediction), parse_number(gold)
            if p is None or g is None:
                return 0.0
            if answer_type == "regression":
                return 1.0 - min(1.0, (abs(p - g) + 1e-9) / (abs(g) + 1e-9))
            if ("." in prediction) != ("." in gold):
                return 0.0
            return float(round(p, 2) == round(g, 2))
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

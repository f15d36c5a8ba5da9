"""Parsing model output: the strict `<think>...</think><answer>...</answer>` format and the answer.

Everything here takes any object, never raises, and runs in time linear in the input (plain `str.find`
/ `count`, no backtracking regexes), so hostile completions (megabyte strings, nested or repeated tags)
cost little.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
MAX_ANSWER_CHARS = 1000  # an extracted answer longer than this is treated as no answer


def format_ok(text) -> bool:
    """True iff `text` is exactly `<think>X</think>` then `<answer>Y</answer>` (whitespace around and between
    allowed), each tag once, X and Y free of tags, Y not blank. R1-style strict format reward."""
    if not isinstance(text, str):
        return False
    s = text.strip()
    if any(s.count(t) != 1 for t in TAGS):
        return False
    if not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
        return False
    think_end = s.find(THINK_CLOSE)
    answer_start = s.find(ANSWER_OPEN)
    if answer_start < think_end or s[think_end + len(THINK_CLOSE):answer_start].strip():
        return False
    return bool(s[answer_start + len(ANSWER_OPEN):-len(ANSWER_CLOSE)].strip())


def extract_answer(text) -> str | None:
    """The stripped content of the last `<answer>...</answer>`, or None (missing, empty or too long)."""
    if not isinstance(text, str):
        return None
    start = text.rfind(ANSWER_OPEN)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, start)
    if end < 0:
        return None
    answer = text[start:end].strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS or any(t in answer for t in TAGS):
        return None
    return answer

"""Parsing model output: the strict R1 format and the answer, in two answer styles (`ANSWER_FORMATS`):

- `tags`: `<think>...</think><answer>...</answer>` (R1-V, Visual-RFT);
- `boxed`: `<think>...</think>` then text with the final answer in `\\boxed{...}` (EasyR1's `math` format
  prompt and reward, DeepSeek-R1's math evaluation).

`INSTRUCTIONS` holds the sentence each style appends to the question, so the prompt asks for exactly what the
format reward checks.

Everything here takes any object, never raises, and runs in time linear in the input (plain `str.find`
/ `count`, no backtracking regexes), so hostile completions (megabyte strings, nested or repeated tags)
cost little.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
MAX_ANSWER_CHARS = 1000  # an extracted answer longer than this is treated as no answer
BOXED = "\\boxed{"
INSTRUCTIONS = {
    "tags": "Reason in <think></think>, then answer in <answer></answer>.",
    "boxed": "Reason in <think></think>, then put the final answer in \\boxed{}.",
}
ANSWER_FORMATS = tuple(INSTRUCTIONS)


def check_answer_format(answer_format: str) -> str:
    """`answer_format` if it is one of `ANSWER_FORMATS`; else a ValueError that lists them."""
    if answer_format not in INSTRUCTIONS:
        raise ValueError(f"answer format {answer_format!r}: choose one of {ANSWER_FORMATS}")
    return answer_format


def format_ok(text, answer_format: str = "tags") -> bool:
    """The R1-style strict format reward of `answer_format`:

    - `tags`: `text` is exactly `<think>X</think>` then `<answer>Y</answer>` (whitespace around and between
      allowed), each tag once, X and Y free of tags, Y not blank;
    - `boxed`: `text` is `<think>X</think>` (each think tag once, no answer tags) followed by text with a
      non-blank `\\boxed{Y}` (EasyR1's `<think>.*</think>.*\\boxed{.*}.*` check, without its regex).

    Raises:
      ValueError: an unknown `answer_format` (a config error, not model output).
    """
    if check_answer_format(answer_format) == "boxed":
        return _boxed_format_ok(text)
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


def _boxed_format_ok(text) -> bool:
    if not isinstance(text, str):
        return False
    s = text.strip()
    if s.count(THINK_OPEN) != 1 or s.count(THINK_CLOSE) != 1 or ANSWER_OPEN in s or ANSWER_CLOSE in s:
        return False
    think_end = s.find(THINK_CLOSE)
    return s.startswith(THINK_OPEN) and extract_boxed(s[think_end:]) is not None


def extract_boxed(text) -> str | None:
    """The stripped content of the last `\\boxed{...}` with balanced braces (`\\boxed{\\frac{1}{2}}` ->
    `\\frac{1}{2}`), or None (missing, unclosed, empty or longer than `MAX_ANSWER_CHARS`). One linear scan."""
    if not isinstance(text, str):
        return None
    start = text.rfind(BOXED)
    if start < 0:
        return None
    start += len(BOXED)
    depth, end = 1, start
    limit = min(len(text), start + MAX_ANSWER_CHARS + 1)
    while end < limit:
        ch = text[end]
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            break
        end += 1
    if depth:
        return None
    answer = text[start:end].strip()
    return answer or None


def extract_answer(text, answer_format: str = "tags") -> str | None:
    """The answer of a completion: for `tags` the stripped content of the last `<answer>...</answer>`, for
    `boxed` that of the last `\\boxed{...}` (`extract_boxed`); None when missing, empty or too long.

    Raises:
      ValueError: an unknown `answer_format`.
    """
    if check_answer_format(answer_format) == "boxed":
        return extract_boxed(text)
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

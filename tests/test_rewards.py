"""Rewards: table-driven cases, and hostile model output that must neither raise nor take long."""

import time

import numpy as np
import pytest

from rftjax.rewards import (INSTRUCTIONS, RewardConfig, accuracy, extract_answer, extract_boxed, format_ok, giou, iou,
                            parse_box, parse_choice, parse_number, score)

GOOD = "<think>3 + 4 = 7</think><answer>7</answer>"


@pytest.mark.parametrize("text,ok", [
    (GOOD, True),
    ("  <think>a</think>\n<answer> 7 </answer>\n", True),
    ("<think>a</think><answer>7</answer> trailing", False),
    ("<answer>7</answer>", False),
    ("<think>a</think>", False),
    ("<think>a</think><answer></answer>", False),
    ("<think>a</think><answer>   </answer>", False),
    ("<answer>7</answer><think>a</think>", False),
    ("<think>a</think>junk<answer>7</answer>", False),
    ("<think><think>a</think></think><answer>7</answer>", False),
    ("<think>a</think><answer>7</answer><answer>8</answer>", False),
    ("<think>a<answer>7</answer></think>", False),
    ("", False), (None, False), (7, False), (b"<think>a</think><answer>7</answer>", False),
])
def test_format(text, ok):
    assert format_ok(text) is ok


@pytest.mark.parametrize("text,answer", [
    (GOOD, "7"), ("<answer> [1, 2, 3, 4] </answer>", "[1, 2, 3, 4]"), ("<answer>1</answer> <answer>2</answer>", "2"),
    ("no tags", None), ("<answer>unclosed", None), ("<answer></answer>", None), (None, None),
    ("<answer>" + "9" * 2000 + "</answer>", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text,answer", [
    ("so \\boxed{7}.", "7"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("\\boxed{1} then \\boxed{ 2 }", "2"),
    ("\\boxed{{a}{b}}", "{a}{b}"), ("\\boxed{}", None), ("\\boxed{ }", None), ("\\boxed{\\frac{1}{2}", None),
    ("no box", None), ("boxed{7}", None), (None, None), ("\\boxed{" + "9" * 2000 + "}", None),
])
def test_extract_boxed(text, answer):
    assert extract_boxed(text) == answer == extract_answer(text, "boxed")


@pytest.mark.parametrize("text,ok", [
    ("<think>3 + 4</think> The answer is \\boxed{7}.", True),
    ("  <think>a</think>\\boxed{7}", True),
    ("<think>a</think>", False),
    ("\\boxed{7}", False),
    ("\\boxed{7}<think>a</think>", False),
    ("<think>a</think>\\boxed{}", False),
    ("<think>a \\boxed{7}</think> so 7", False),
    ("<think>a</think><answer>7</answer> \\boxed{7}", False),
    ("<think><think>a</think></think>\\boxed{7}", False),
    (None, False), (7, False),
])
def test_boxed_format(text, ok):
    assert format_ok(text, "boxed") is ok


def test_answer_format_is_chosen_by_config_and_matches_the_instruction():
    """`boxed` reads and rewards `\\boxed{}`, `tags` reads `<answer>`; each instruction names what its check wants."""
    texts = ["<think>a</think> so \\boxed{7}", GOOD]
    boxed = score(texts, ["7", "7"], ["int", "int"], config=RewardConfig(answer_format="boxed"))
    tags = score(texts, ["7", "7"], ["int", "int"], config=RewardConfig(answer_format="tags"))
    assert boxed["correct"].tolist() == [1.0, 0.0] and boxed["format"].tolist() == [1.0, 0.0]
    assert tags["correct"].tolist() == [0.0, 1.0] and tags["format"].tolist() == [0.0, 1.0]
    assert "\\boxed{}" in INSTRUCTIONS["boxed"] and "<answer></answer>" in INSTRUCTIONS["tags"]
    with pytest.raises(ValueError, match="answer format"):
        RewardConfig(answer_format="json")


@pytest.mark.parametrize("pred,gold,kind,reward", [
    ("7", "7", "int", 1.0), ("7.0", "7", "int", 1.0), ("$7$", "7", "int", 1.0), ("\\boxed{7}", "7", "int", 1.0),
    ("1,000", "1000", "int", 1.0), ("7.", "7", "int", 1.0), ("8", "7", "int", 0.0), ("seven", "7", "int", 0.0),
    ("The answer is 7", "7", "int", 0.0), ("-3", "-3", "int", 1.0), ("nan", "7", "int", 0.0), ("inf", "7", "int", 0.0),
    ("4.8", "4.8", "float", 1.0), ("4.80001", "4.8", "float", 1.0), ("4.9", "4.8", "float", 0.0),
    ("B", "B", "choice", 1.0), ("(B)", "B", "choice", 1.0), ("B) 8 m", "B", "choice", 1.0), ("b", "B", "choice", 0.0),
    ("C", "B", "choice", 0.0), ("BC", "B", "choice", 0.0),
    ("\\frac{1}{2}", "0.5", "math", 1.0), ("1/2", "\\frac{1}{2}", "math", 1.0), ("(x+1)^2", "x^2+2x+1", "math", 1.0),
    ("x^2", "x^3", "math", 0.0), ("(3,-4)", "(3,-4)", "math", 1.0),
    ("[1, 2, 5, 6]", "[1, 2, 5, 6]", "box", 1.0), ("[10, 10, 20, 20]", "[1, 2, 5, 6]", "box", 0.0),
    ("[0, 0, 2, 2]", "[0, 0, 2, 4]", "box", 0.5), ("[5, 5, 1, 1]", "[1, 1, 5, 5]", "box", 0.0),
    (None, "7", "int", 0.0),
])
def test_accuracy_table(pred, gold, kind, reward):
    assert accuracy(pred, gold, kind) == pytest.approx(reward)


def test_accuracy_rejects_unknown_type():
    with pytest.raises(ValueError, match="answer_type"):
        accuracy("1", "1", "text")


def test_iou_and_giou_by_hand():
    assert iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)  # intersection 1, union 4 + 4 - 1
    assert giou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    # Disjoint: IoU 0, hull [0, 0, 3, 3] area 9, union 2 -> -(9 - 2) / 9.
    assert giou([0, 0, 1, 1], [2, 2, 3, 3]) == pytest.approx(-7 / 9)
    assert iou([1, 1, 1, 5], [0, 0, 5, 5]) == 0.0  # degenerate box


def test_parsers():
    assert parse_box("box: [1.5, 2, 3, 4.25] and [5, 6, 7, 8]") == [5, 6, 7, 8]
    assert parse_box("[1, 2, 3]") is None and parse_box(None) is None
    assert parse_number(" 12 ") == 12 and parse_number("1e3") == 1000 and parse_number("12a") is None
    assert parse_choice("(D)") == "D" and parse_choice("D and E") is None


def test_score_composes_components():
    out = score([GOOD, "<answer>7</answer>", "<think>x</think><answer>[0, 0, 2, 2]</answer>", "garbage"],
                ["7", "7", "[0, 0, 2, 4]", "7"], ["int", "int", "box", "int"], lengths=[10, 20, 30, 40],
                config=RewardConfig(accuracy_weight=1.0, format_weight=0.5))
    np.testing.assert_allclose(out["accuracy"], [1, 1, 0.5, 0])
    np.testing.assert_allclose(out["correct"], [1, 1, 1, 0])
    np.testing.assert_allclose(out["format"], [1, 0, 1, 0])
    np.testing.assert_allclose(out["score"], [1.5, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="one entry per completion"):
        score(["a"], ["1", "2"], ["int"])


MB = 1 << 20
HOSTILE = [
    "a" * MB,
    "<think>" * (MB // 7),
    "<answer>" * (MB // 8) + "7" + "</answer>" * (MB // 9),
    "<think>" + "x" * MB + "</think><answer>7</answer>",
    "<think>a</think><answer>" + "1" * MB + "</answer>",
    "<answer>[" + "1," * (MB // 2) + "1]</answer>",
    "<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>",
    "<answer>" + "\\frac{" * 60 + "1" + "}" * 60 + "</answer>",
    "<answer>" + "9" * 150 + "</answer>",
    "<answer>1" + "e9" * 40 + "</answer>",
    "<think>ünïcödé 漢字 🙂\u202e\x00</think><answer>７</answer>",
    "<answer>" + "[1, 2, 3, 4" * 20000 + "</answer>",
    "\x00" * MB,
    "<answer>" + " " * MB + "7</answer>",
]


@pytest.mark.parametrize("kind,gold", [("int", "7"), ("float", "7.5"), ("choice", "B"), ("math", "\\frac{1}{2}"),
                                       ("box", "[1, 2, 3, 4]")])
@pytest.mark.parametrize("answer_format", ["tags", "boxed"])
def test_hostile_output_never_raises_and_is_fast(kind, gold, answer_format):
    hostile = HOSTILE + ["\\boxed{" * 100_000 + "7", "<think>a</think>" + "\\boxed{" + "{" * MB + "7" + "}" * MB]
    for text in hostile:
        t0 = time.perf_counter()
        out = score([text], [gold], [kind], config=RewardConfig(answer_format=answer_format))
        elapsed = time.perf_counter() - t0
        assert np.isfinite(out["score"]).all() and 0.0 <= out["accuracy"][0] <= 1.0
        assert elapsed < 2.0, (kind, text[:40], elapsed)

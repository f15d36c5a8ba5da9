"""Verifiable rewards: format, answer extraction, accuracy by answer type, IoU/GIoU, overlong shaping, composition,
and scoring under a time limit in worker processes (`RewardScorer`)."""

from rftjax.rewards.accuracy import accuracy, math_equal, parse_choice, parse_number
from rftjax.rewards.boxes import giou, iou, parse_box
from rftjax.rewards.compose import RewardConfig, score, score_one
from rftjax.rewards.overlong import overlong_penalty
from rftjax.rewards.parsing import ANSWER_FORMATS, INSTRUCTIONS, extract_answer, extract_boxed, format_ok
from rftjax.rewards.runner import RewardScorer

__all__ = ["accuracy", "math_equal", "parse_choice", "parse_number", "giou", "iou", "parse_box", "RewardConfig",
           "overlong_penalty", "score", "score_one", "RewardScorer", "extract_answer", "extract_boxed", "format_ok",
           "ANSWER_FORMATS", "INSTRUCTIONS"]

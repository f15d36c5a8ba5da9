"""Verifiable rewards: format, answer extraction, accuracy by answer type, IoU/GIoU, overlong shaping, composition."""

from rftjax.rewards.accuracy import accuracy, math_equal, parse_choice, parse_number
from rftjax.rewards.boxes import giou, iou, parse_box
from rftjax.rewards.compose import RewardConfig, score
from rftjax.rewards.overlong import overlong_penalty
from rftjax.rewards.parsing import ANSWER_FORMATS, INSTRUCTIONS, extract_answer, extract_boxed, format_ok

__all__ = ["accuracy", "math_equal", "parse_choice", "parse_number", "giou", "iou", "parse_box", "RewardConfig",
           "overlong_penalty", "score", "extract_answer", "extract_boxed", "format_ok", "ANSWER_FORMATS",
           "INSTRUCTIONS"]

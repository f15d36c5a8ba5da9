"""Rewards: format, answer extraction, accuracy by answer type, IoU/GIoU, overlong shaping, rule scoring under a
time limit in worker processes (`RewardScorer`), and the reward sources a run adds up (`Rewards`)."""

from rftjax.rewards.accuracy import accuracy, math_equal, parse_choice, parse_number
from rftjax.rewards.boxes import giou, iou, parse_box
from rftjax.rewards.compose import RewardConfig, score, score_one
from rftjax.rewards.overlong import overlong_penalty
from rftjax.rewards.parsing import ANSWER_FORMATS, INSTRUCTIONS, extract_answer, extract_boxed, format_ok
from rftjax.rewards.runner import FLAGS, RewardScorer
from rftjax.rewards.sources import (DeviceSource, OverlongSource, Rewards, RewardSource, RewardView, RuleSource,
                                    SourceContext, build_rewards)

__all__ = ["accuracy", "math_equal", "parse_choice", "parse_number", "giou", "iou", "parse_box", "RewardConfig",
           "overlong_penalty", "score", "score_one", "RewardScorer", "extract_answer", "extract_boxed", "format_ok",
           "ANSWER_FORMATS", "INSTRUCTIONS", "FLAGS", "DeviceSource", "OverlongSource", "Rewards", "RewardSource",
           "RewardView", "RuleSource", "SourceContext", "build_rewards"]

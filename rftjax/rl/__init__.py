"""RL objectives: advantage estimators, policy/value losses, rollout correction, DAPO helpers, the algorithm config."""

from rftjax.rl import advantages, correction, dapo, kl, losses, masking
from rftjax.rl.advantages import compute_advantages
from rftjax.rl.correction import rollout_weights
from rftjax.rl.config import PRESETS, SCHEDULE_DEFAULTS, AlgorithmConfig, get_algorithm, preset_settings
from rftjax.rl.kl import kl_penalised_rewards, kl_penalty
from rftjax.rl.losses import aggregate, denominator, policy_loss, value_loss

__all__ = ["advantages", "correction", "dapo", "kl", "losses", "masking", "compute_advantages", "PRESETS",
           "AlgorithmConfig", "get_algorithm", "preset_settings", "SCHEDULE_DEFAULTS", "aggregate", "denominator",
           "kl_penalised_rewards", "kl_penalty", "policy_loss", "rollout_weights", "value_loss"]

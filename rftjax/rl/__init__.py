"""RL objectives: advantage estimators, policy/value losses, DAPO helpers, the algorithm config."""

from rftjax.rl import advantages, dapo, losses
from rftjax.rl.config import PRESETS, AlgorithmConfig, get_algorithm
from rftjax.rl.losses import aggregate, kl_penalised_rewards, kl_penalty, policy_loss, value_loss

__all__ = ["advantages", "dapo", "losses", "PRESETS", "AlgorithmConfig", "get_algorithm", "aggregate",
           "kl_penalised_rewards", "kl_penalty", "policy_loss", "value_loss"]

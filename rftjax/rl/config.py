"""The objective of the GRPO/PPO family, validated, with the presets of the papers.

`AlgorithmConfig` selects the advantage estimator, the ratio level, clipping, KL, entropy bonus and loss
aggregation by name; `get_algorithm(name, **overrides)` returns a preset. The config is a frozen
dataclass: hashable, so it can be a static argument of a jitted update step. A preset may also set the rollout
schedule and the reward shaping (`preset_settings`: DAPO's dynamic sampling and overlong shaping), which live in
`rftjax.rollout.RolloutConfig` and `rftjax.rewards.OverlongSource`.
"""

from __future__ import annotations

import dataclasses

from rftjax.rl.correction import CORRECTION_LEVELS, CORRECTION_MODES

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
RATIO_LEVELS = ("token", "sequence", "sequence_token")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """Every knob of the objective. Field names are the field's (TRL, verl, the papers).

    Attributes:
      name: preset name, for logs.
      advantage_estimator: one of `ADVANTAGE_ESTIMATORS`.
      group_size: G, completions per prompt (>= 2 for the group estimators).
      adv_eps: eps of GRPO's `(r - mean) / (std + eps)`.
      clip_eps_low, clip_eps_high: ratio clipped to `[1 - clip_eps_low, 1 + clip_eps_high]` (clip-higher
        when they differ).
      dual_clip_c: dual-clip bound for negative advantages (Ye et al. 2020), None to disable; must be > 1.
      ratio_level: `token` (PPO/GRPO), `sequence` (GSPO: length-normalised sequence ratio, clipped per
        sequence), `sequence_token` (GSPO-token: the sequence ratio's value with per-token gradients).
      kl_coef: beta. 0 disables the KL term (and the reference model).
      kl_estimator: `k1`, `k2` or `k3` (Schulman's estimators of KL(pi || pi_ref); k3 clamped as verl's
        low_var_kl).
      kl_in_reward: fold the KL penalty into the token rewards (REINFORCE++, PPO) instead of the loss.
      kl_bias_correction: multiply the in-loss KL by the importance ratio (TRL's `use_bias_correction_kl`).
      entropy_coef: entropy bonus coefficient (loss -= entropy_coef * aggregated entropy).
      loss_agg_mode: one of `LOSS_AGG_MODES`.
      norm_len: the constant length of `seq-mean-token-sum-norm` (Dr.GRPO); None uses the padded T.
      num_iterations: mu, optimisation passes over each batch of rollouts.
      gamma, lam: discount and GAE lambda (token-level estimators).
      clip_eps_value: value clipping of the critic loss (PPO).
      value_coef: weight of the value loss.
      rollout_correction: importance weights from the sampler to the trainer on each token's policy loss
        (`rftjax.rl.correction`): `off`, `token` or `sequence`.
      rollout_correction_mode: `truncate` (TIS: clip the weights to the bounds) or `mask` (MIS: zero outside).
      rollout_correction_min, rollout_correction_max: the bounds C_min, C_max (None: that side open; at least one
        set when the correction is on). verl's default is token / truncate / max 2, TRL's sequence / mask / [0, 3].
    """

    name: str = "custom"
    advantage_estimator: str = "grpo"
    group_size: int = 8
    adv_eps: float = 1e-6
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float | None = None
    ratio_level: str = "token"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    kl_bias_correction: bool = False
    entropy_coef: float = 0.0
    loss_agg_mode: str = "token-mean"
    norm_len: int | None = None
    num_iterations: int = 1
    gamma: float = 1.0
    lam: float = 1.0
    clip_eps_value: float = 0.2
    value_coef: float = 0.5
    rollout_correction: str = "off"
    rollout_correction_mode: str = "truncate"
    rollout_correction_min: float | None = None
    rollout_correction_max: float | None = 2.0

    def __post_init__(self):
        def choice(field, options):
            if getattr(self, field) not in options:
                raise ValueError(f"AlgorithmConfig.{field}={getattr(self, field)!r}; choose one of {list(options)}")

        choice("advantage_estimator", ADVANTAGE_ESTIMATORS)
        choice("ratio_level", RATIO_LEVELS)
        choice("kl_estimator", KL_ESTIMATORS)
        choice("loss_agg_mode", LOSS_AGG_MODES)
        choice("rollout_correction", CORRECTION_LEVELS)
        choice("rollout_correction_mode", CORRECTION_MODES)
        if self.group_size < 1:
            raise ValueError(f"AlgorithmConfig.group_size={self.group_size} must be >= 1")
        if self.advantage_estimator in GROUP_ESTIMATORS and self.group_size < 2:
            raise ValueError(f"advantage_estimator={self.advantage_estimator!r} compares the samples of a group: "
                             f"set group_size >= 2 (got {self.group_size})")
        for field in ("clip_eps_low", "clip_eps_high"):
            if not 0 <= getattr(self, field) < 1:
                raise ValueError(f"AlgorithmConfig.{field}={getattr(self, field)} must be in [0, 1)")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"AlgorithmConfig.dual_clip_c={self.dual_clip_c} must be > 1 (or None to disable)")
        if self.kl_coef < 0 or self.entropy_coef < 0 or self.value_coef < 0:
            raise ValueError("kl_coef, entropy_coef and value_coef must be >= 0")
        if self.kl_in_reward and self.advantage_estimator not in ("reinforce_pp", "gae"):
            raise ValueError(f"kl_in_reward needs token-level rewards: advantage_estimator 'reinforce_pp' or 'gae', "
                             f"not {self.advantage_estimator!r}")
        if self.num_iterations < 1:
            raise ValueError(f"AlgorithmConfig.num_iterations={self.num_iterations} must be >= 1")
        if self.norm_len is not None and self.norm_len < 1:
            raise ValueError(f"AlgorithmConfig.norm_len={self.norm_len} must be >= 1 (or None for the padded T)")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma={self.gamma} and lam={self.lam} must be in [0, 1]")
        low, high = self.rollout_correction_min, self.rollout_correction_max
        if self.rollout_correction != "off":
            if low is None and high is None:
                raise ValueError(f"rollout_correction={self.rollout_correction!r} needs a bound: set "
                                 f"rollout_correction_max (verl: 2, TRL: 3) or rollout_correction_min")
            if (low is not None and low < 0) or (high is not None and high <= 0) or \
                    (low is not None and high is not None and low >= high):
                raise ValueError(f"rollout_correction bounds [{low}, {high}] must satisfy 0 <= min < max")

    @property
    def uses_reference(self) -> bool:
        """Whether a frozen reference policy is needed (any KL term)."""
        return self.kl_coef > 0

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    def replace(self, **kwargs) -> "AlgorithmConfig":
        return dataclasses.replace(self, **kwargs)


PRESETS: dict[str, AlgorithmConfig] = {
    # DeepSeekMath (Shao et al. 2024, Sec. 4.1 and 4.2): group-normalised advantages, token-level clipped
    # ratio with eps 0.2, k3 KL in the loss with beta 0.04, per-sequence token mean (Eq. 3).
    "grpo": AlgorithmConfig(name="grpo", advantage_estimator="grpo", clip_eps_low=0.2, clip_eps_high=0.2,
                            kl_coef=0.04, kl_estimator="k3", loss_agg_mode="seq-mean-token-mean"),
    # Dr.GRPO (Liu et al. 2025, Sec. 3.2): no std normalisation, no 1/|o_i| (a constant length instead),
    # no KL (their R1-Zero recipe uses beta 0).
    "dr_grpo": AlgorithmConfig(name="dr_grpo", advantage_estimator="dr_grpo", kl_coef=0.0,
                               loss_agg_mode="seq-mean-token-sum-norm"),
    # DAPO (Yu et al. 2025, Sec. 3 and Algorithm 1): clip-higher eps_low 0.2 / eps_high 0.28, token-level
    # policy-gradient loss (token-mean), dynamic sampling, overlong reward shaping, no KL, G = 16.
    "dapo": AlgorithmConfig(name="dapo", advantage_estimator="grpo", group_size=16, clip_eps_low=0.2,
                            clip_eps_high=0.28, kl_coef=0.0, loss_agg_mode="token-mean"),
    # GSPO (Zheng et al. 2025, Sec. 4 and 5.1): sequence-level length-normalised ratio clipped with
    # eps_low 3e-4 / eps_high 4e-4, sequence-level averaging, no KL.
    "gspo": AlgorithmConfig(name="gspo", advantage_estimator="grpo", ratio_level="sequence", clip_eps_low=3e-4,
                            clip_eps_high=4e-4, kl_coef=0.0, loss_agg_mode="seq-mean-token-mean"),
    # RLOO (Ahmadian et al. 2024): leave-one-out baseline; verl's RLOO recipe keeps the PPO clip (0.2) and a
    # token-mean loss, no KL in the loss.
    "rloo": AlgorithmConfig(name="rloo", advantage_estimator="rloo", kl_coef=0.0, loss_agg_mode="token-mean"),
    # REINFORCE++ (Hu 2025, Sec. 3): token-level k1 KL penalty in the reward (beta 0.01, OpenRLHF's default
    # init_kl_coef for it), gamma 1, batch-whitened returns, PPO clip 0.2, token-mean.
    "reinforce_pp": AlgorithmConfig(name="reinforce_pp", advantage_estimator="reinforce_pp", kl_coef=0.01,
                                    kl_estimator="k1", kl_in_reward=True, loss_agg_mode="token-mean"),
    # PPO (Schulman et al. 2017; Ouyang et al. 2022): critic + GAE, KL in the reward. verl's defaults:
    # gamma 1.0, lam 1.0, clip 0.2, value clip 0.5 (cliprange_value), kl_coef 0.001 (k1, kl_ctrl fixed).
    "ppo": AlgorithmConfig(name="ppo", advantage_estimator="gae", group_size=1, kl_coef=0.001, kl_estimator="k1",
                           kl_in_reward=True, gamma=1.0, lam=1.0, clip_eps_value=0.5, loss_agg_mode="token-mean"),
}


def get_algorithm(name: str, **overrides) -> AlgorithmConfig:
    """The preset `name` with fields replaced by `overrides` (validated again).

    Raises:
      ValueError: unknown preset, or an override that makes the config invalid.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown algorithm preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


SCHEDULE_DEFAULTS = {"dynamic_sampling": False, "gen_prompts_per_round": 0, "dynamic_sampling_rounds": 4,
                     "overlong_buffer_len": 0}
"""The rollout schedule (`rl.NAME`: DAPO's dynamic sampling, Yu et al. 2025, Sec. 3.2) and reward shaping
(`reward.overlong_buffer_len`: DAPO's L_cache, Sec. 3.4) that a preset may set, with their defaults."""

_PRESET_SCHEDULES = {"dapo": {"dynamic_sampling": True, "overlong_buffer_len": 64}}


def preset_settings(name: str) -> dict:
    """The rollout schedule and reward shaping of preset `name` (`SCHEDULE_DEFAULTS` keys).

    Raises:
      ValueError: unknown preset.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown algorithm preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**SCHEDULE_DEFAULTS, **_PRESET_SCHEDULES.get(name, {})}

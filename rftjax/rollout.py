"""Rollouts: generate completions for prompt batches, decode and score them, and assemble one RL step's batch.

    prompts (host) ──Policy.generate──► completions + texts ──Rewards.score(RewardView)──► reward components
          └─ collect_rollouts: DAPO's dynamic sampling (oversample, keep groups with signal, refill)
                               ──► Rollouts (host): a RolloutBatch of arrays + texts, rewards, statistics

The `RolloutBatch` is the only thing an RL update reads from the rollouts; the trainer moves it to the
devices in one transfer (`rftjax.rl_update`). Evaluation generates through `Policy.generate` and scores with
the same `Rewards`, so training and evaluation decode and score the same way.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from rftjax import rewards, sampling
from rftjax.data.tokenizer import TextTokenizer
from rftjax.models import ModelConfig, placeholder_ids
from rftjax.rl.dapo import groups_with_signal
from rftjax.sharding import HOST, Placement
from rftjax.batches import RolloutBatch, SequenceBatch


@dataclasses.dataclass
class Rollouts:
    """A `RolloutBatch` and what stays on the host: per-row reward components (every component of the run's
    `rftjax.rewards.Rewards` and `total`, float32 `[N]`), `lengths` int
    `[N]`, `truncated` bool `[N]`, decoded `texts` and gold `answers` (`[N]` lists), and `stats` (the `rollout_*`
    metrics of the step; `rollout_time_s` is generation, `reward_time_s` scoring, both in seconds).

    With several processes, `batch`, `texts` and `answers` hold this process's rows (`[N / P]`), while `rewards`,
    `lengths` and `truncated` hold every process's (`[N]`, gathered), so the metrics are the whole step's."""

    batch: RolloutBatch
    rewards: dict[str, np.ndarray]
    lengths: np.ndarray
    truncated: np.ndarray
    texts: list[str]
    answers: list[str]
    stats: dict[str, float]

    @property
    def time_s(self) -> float:
        """Host seconds of the step's rollouts: generation (`rollout_time_s`) + reward scoring (`reward_time_s`)."""
        return self.stats["rollout_time_s"] + self.stats["reward_time_s"]

    @property
    def finite(self) -> bool:
        """Whether every reward of the step (all processes) is finite; a step with a NaN/inf reward is not
        trained on (the trainer counts it in `updates_skipped_nonfinite`)."""
        return bool(np.all(np.isfinite(self.rewards["total"])))

    def metrics(self) -> dict[str, float]:
        """Rewards, accuracy, lengths and truncation of the rows trained on, plus the rollout statistics: `reward_mean`
        and `reward_std` of the total, `reward_{component}_mean` and `_std` of every component (the 0/1 flags as
        counts `reward_{flag}s`), `accuracy` and `format_rate` (the rules' `correct` and `format`); the stats
        include each source's scoring seconds, `reward_time_{source}_s`."""
        r, lengths = self.rewards, self.lengths
        per_component = {}
        for k, v in r.items():
            if k in rewards.FLAGS:
                per_component[f"reward_{k}s"] = int(v.sum())
            elif k != "total":
                per_component.update({f"reward_{k}_mean": float(v.mean()), f"reward_{k}_std": float(v.std())})
        rules = {"accuracy": float(r["correct"].mean()), "format_rate": float(r["format"].mean())} \
            if "correct" in r else {}
        return {"reward_mean": float(r["total"].mean()), "reward_std": float(r["total"].std()), **rules,
                **per_component, "completion_len_mean": float(lengths.mean()),
                "completion_len_max": int(lengths.max()), "truncation_rate": float(self.truncated.mean()),
                **self.stats}


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How one RL step samples: the rollout schedule.

    Attributes:
      sampling: the `rftjax.sampling.SamplingParams` of the rollouts (G = `sampling.group_size`, the budget, the
        distribution; the EOS, pad and suppressed ids are the tokenizer's: `Policy.generate`).
      prompts_per_step: B, prompts (groups) trained on per step.
      dynamic_sampling: DAPO's filter: keep only groups whose rewards differ (Yu et al. 2025, Sec. 3.2).
      gen_prompts_per_round: prompts generated per round with dynamic sampling (verl's `gen_batch_size`, a
        multiple of `prompts_per_step`); 0 = `prompts_per_step`.
      dynamic_sampling_rounds: rounds at most (verl's `max_num_gen_batches`); a batch still short of B groups is
        filled with groups without signal (counted in `dynamic_sampling_filled`).
      noisy_rollout: NoisyRollout (`rftjax.data.augment.NoisyRollout`): each group of G holds G/2 rollouts of the
        clean image and G/2 of a distorted copy, the update conditioning all G on the clean one; None = off.

    Raises:
      ValueError: B < 1, rounds < 1, `gen_prompts_per_round` not a multiple of B or set without dynamic
        sampling, NoisyRollout with an odd G.
    """

    sampling: sampling.SamplingParams
    prompts_per_step: int
    dynamic_sampling: bool = False
    gen_prompts_per_round: int = 0
    dynamic_sampling_rounds: int = 4
    noisy_rollout: Any = None

    def __post_init__(self):
        gen, b = self.gen_prompts_per_round, self.prompts_per_step
        if b < 1 or self.dynamic_sampling_rounds < 1 or gen < 0:
            raise ValueError(f"prompts_per_step={b} and dynamic_sampling_rounds={self.dynamic_sampling_rounds} "
                             f"must be >= 1 and gen_prompts_per_round={gen} >= 0")
        if gen % b:
            raise ValueError(f"rl.gen_prompts_per_round={gen} must be a multiple of rl.prompts_per_step={b}; or set "
                             f"it to 0")
        if gen and not self.dynamic_sampling:
            raise ValueError(f"rl.gen_prompts_per_round={gen} oversamples for dynamic sampling: it needs dynamic "
                             f"sampling (rl.dynamic_sampling=True); or set it to 0")
        if self.noisy_rollout is not None and self.group_size % 2:
            raise ValueError(f"NoisyRollout splits each group into clean and noisy halves: set an even group_size "
                             f"(got {self.group_size})")

    @property
    def group_size(self) -> int:
        """G, samples per prompt."""
        return self.sampling.group_size


def concat_rows(*parts):
    """Row-wise `np.concatenate` of batch arrays (or image pytrees); Qwen-VL patches `[B, P, D]` of different
    buckets are zero-padded to the largest `P` first (padding past a row's grid is ignored by the model)."""
    def concat(*xs):
        if len(xs) == 1:
            return xs[0]
        width = max(x.shape[1] for x in xs) if xs[0].ndim == 3 else None
        if width is not None:
            xs = [np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0))) for x in xs]
        return np.concatenate(xs)

    return jax.tree.map(concat, *parts)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A policy to sample from: its `params` (possibly sharded), `config` (the model config of any family) and
    `tokenizer`, whose EOS ids end completions and whose pad/BOS ids (`never_ids`) and the model's media
    placeholders are never sampled."""

    params: Any
    config: ModelConfig
    tokenizer: TextTokenizer

    def generate(self, batch: dict, rng, params: sampling.SamplingParams,
                 place: Placement = HOST) -> tuple[sampling.SamplingOutput, list[str]]:
        """`params.group_size` completions for each prompt of a host batch (`pixel_values`, `prompt_ids`,
        `prompt_mask`: this process's rows); `place` moves the prompt arrays to the devices and brings this
        process's completions back. Returns `(SamplingOutput as numpy, decoded texts)`, `[B * G]` rows of this
        process."""
        tok = self.tokenizer
        params = params.replace(eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                                suppress_ids=placeholder_ids(self.config) + tok.never_ids)
        out = sampling.generate(self.params, self.config, *place.put((batch["pixel_values"], batch["prompt_ids"],
                                                                      batch["prompt_mask"])), rng, params)
        out = place.local(out)
        return out, [tok.decode(ids[:n]) for ids, n in zip(out.completion_ids, out.lengths)]


NOISE_STREAM = 1 << 29  # fold_in data of a round's key for NoisyRollout's distortion (the sampler uses the key itself)


def generate_noisy(policy: Policy, batch: dict, key, config: RolloutConfig, step: int,
                   place: Placement = HOST) -> tuple[sampling.SamplingOutput, list[str], np.ndarray]:
    """NoisyRollout's sampling: G/2 completions of each prompt of `batch` on its clean image and G/2 on a copy
    distorted by `config.noisy_rollout` at RL step `step` (drawn from `fold_in(key, NOISE_STREAM)` and the process
    index: resumed runs redraw the same). Returns `(SamplingOutput as numpy, texts, noisy)` in group order (rows
    `b*G .. b*G+G-1` of prompt b: its clean half, then its noisy half) and `noisy` bool `[B * G]`."""
    n, b = config.group_size // 2, len(batch["prompt_ids"])
    data = np.asarray(jax.random.key_data(jax.random.fold_in(key, NOISE_STREAM))).ravel().tolist()
    rng = np.random.default_rng(data + [jax.process_index()])
    distorted = config.noisy_rollout.distort(batch["pixel_values"], step, rng)
    both = {"pixel_values": concat_rows(batch["pixel_values"], distorted),
            **{k: np.concatenate([batch[k], batch[k]]) for k in ("prompt_ids", "prompt_mask")}}
    out, texts = policy.generate(both, key, config.sampling.replace(group_size=n), place)
    order = (np.arange(b)[:, None, None] * n + np.arange(2)[None, :, None] * b * n
             + np.arange(n)[None, None, :]).reshape(-1)  # [prompt, clean | noisy, sample] -> sampler row
    return (jax.tree.map(lambda x: x[order], out), [texts[i] for i in order],
            np.tile(np.repeat([False, True], n), b))


def score_groups(reward: rewards.Rewards, texts: list[str], out, batch: dict, group_size: int
                 ) -> dict[str, np.ndarray]:
    """Every reward component and `total` (`rftjax.rewards.Rewards.score`) of `len(batch) * group_size`
    completions (`out`, host `SamplingOutput`; `texts`), each prompt's answer repeated for its group."""
    return reward.score(rewards.RewardView.of_groups(texts, out, batch, group_size))


def trim_completions(seq: SequenceBatch, multiple: int = 16, longest: int | None = None) -> SequenceBatch:
    """`seq` with completions `[N, T]` cut to the batch's longest completion (`longest`, default the longest of
    `seq`'s rows: with several processes, the longest of the whole step's), rounded up to `multiple` tokens (at
    most `T`), so the update does not compute on padding past every row's end.

    Rounding keeps the number of distinct shapes (each a compilation of the update) at `T / multiple`.
    Exact: positions past every row's end are masked out of every loss and metric (Dr.GRPO's constant
    `norm_len` is the generation budget, not T: see `rftjax.configs.algorithm`).
    """
    mask = np.asarray(seq.completion_mask)
    t = mask.shape[1]
    if longest is None:
        longest = int(mask.sum(1).max()) if mask.size else 0
    keep = min(t, max(multiple, -(-longest // multiple) * multiple))
    return seq.replace(completion_ids=seq.completion_ids[:, :keep], completion_mask=seq.completion_mask[:, :keep])


def collect_rollouts(policy: Policy, prompts, key, config: RolloutConfig, reward: rewards.Rewards,
                     place: Placement = HOST, step: int = 0) -> Rollouts:
    """One RL step's rollouts: generate and score G samples per prompt from the `prompts` iterator (host
    batches of this process's rows), with DAPO's dynamic sampling when `config.dynamic_sampling` (rounds of
    `gen_prompts_per_round` prompts until B groups with differing rewards are kept; kept groups first, then
    groups without signal fill a short batch). Round r samples with `fold_in(key, r)`. With
    `config.noisy_rollout`, half of each group is sampled on a distorted image (`generate_noisy`, annealed by the
    RL step `step`, 0-based) and flagged in `RolloutBatch.noisy`; every row keeps its clean image.

    With several processes each scores its own rows; the reward components, lengths and truncation flags are
    gathered (`place.gather`) so every process takes the same decisions (rounds, trimming) and logs the whole
    step's metrics; dynamic sampling keeps each process's share of the B groups among its own prompts.
    Non-finite rewards (a reward function returned NaN/inf) do not raise: `Rollouts.finite` is False.
    """
    g, b = config.group_size, config.prompts_per_step
    per_round = max(1, config.gen_prompts_per_round // b)  # batches of prompts generated per round
    kept, spare, rounds, gen_time, gen_tokens, generated, signal_seen, correct = [], [], 0, 0.0, 0, 0, 0, 0.0
    reward_time, correct_noisy = 0.0, 0.0
    skipped_rows = 0
    reward.take_times()  # this step's seconds per source only (not an evaluation's before it)
    while True:
        parts = [next(prompts) for _ in range(per_round)]
        batch = {k: concat_rows(*[p[k] for p in parts]) for k in parts[0]}
        t0 = time.perf_counter()
        round_key = jax.random.fold_in(key, rounds)
        if config.noisy_rollout is None:
            out, texts = policy.generate(batch, round_key, config.sampling, place)
            noisy = np.zeros(len(texts), bool)
        else:
            out, texts, noisy = generate_noisy(policy, batch, round_key, config, step, place)
        gen_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = score_groups(reward, texts, out, batch, g)
        reward_time += time.perf_counter() - t0
        finite = np.isfinite(scores["total"])  # a step with a NaN/inf reward is not trained on (`Rollouts.finite`)
        has_signal = groups_with_signal(np.where(finite, scores["total"], 0.0), g)
        every = place.gather({"lengths": out.lengths, "correct": scores["correct"], "signal": has_signal,
                              "noisy": noisy,
                              "skipped_rows": np.asarray(batch.get("skipped_rows", np.zeros(0, np.int32)))})
        skipped_rows += int(every["skipped_rows"].sum())
        gen_tokens += int(every["lengths"].sum())
        generated += len(every["signal"])
        signal_seen += int(np.sum(every["signal"]))
        correct += float(np.sum(every["correct"]))
        correct_noisy += float(np.sum(every["correct"][every["noisy"]]))
        for i in range(len(batch["answer"])):
            rows = slice(i * g, (i + 1) * g)
            group = {"pixel_values": jax.tree.map(lambda x: x[i:i + 1], batch["pixel_values"]),  # once per prompt
                     **{k: np.repeat(batch[k][i:i + 1], g, 0) for k in ("prompt_ids", "prompt_mask")},
                     "completion_ids": out.completion_ids[rows], "completion_mask": out.completion_mask[rows],
                     "sampler_logprobs": out.model_logprobs[rows], "noisy": noisy[rows],
                     "truncated": out.truncated[rows], "lengths": out.lengths[rows],
                     **{f"reward_{k}": v[rows] for k, v in scores.items()}, "texts": texts[rows],
                     "answers": [batch["answer"][i]] * g, "has_signal": [bool(has_signal[i])]}
            (kept if has_signal[i] or not config.dynamic_sampling else spare).append(group)
        rounds += 1
        local_b = len(parts[0]["answer"])  # this process's share of the B prompts
        done = len(kept) >= local_b or not config.dynamic_sampling or rounds >= config.dynamic_sampling_rounds
        if all(place.gather(np.asarray([done]))):
            break
    groups = (kept + spare)[:local_b]
    rows = {k: (concat_rows(*[gr[k] for gr in groups]) if not isinstance(groups[0][k], list)
                else sum((gr[k] for gr in groups), [])) for k in groups[0]}
    every = place.gather({"lengths": rows["lengths"], "truncated": rows["truncated"],
                          "has_signal": np.asarray(rows["has_signal"]),
                          **{k: v for k, v in rows.items() if k.startswith("reward_")}})
    stats = {"rollout_time_s": gen_time, "reward_time_s": reward_time,
             "rollout_tokens_per_s": gen_tokens / max(gen_time, 1e-9),
             "rollout_rounds": rounds, "dynamic_sampling_filled":
             max(0, b - int(np.sum(every["has_signal"]))) if config.dynamic_sampling else 0,
             "rollout_groups_with_signal": signal_seen / generated,
             "rollout_accuracy": correct / (generated * g),  # over every rollout, not only the groups kept
             "groups_with_signal": float(np.mean(every["has_signal"])),
             "data_rows_skipped": skipped_rows,  # unreadable dataset rows replaced by the next readable ones
             **{f"reward_time_{name}_s": t for name, t in reward.take_times().items()}}
    if config.noisy_rollout is not None:  # the accuracy of each half over every rollout, and the strength
        half = generated * g / 2
        stats.update(rollout_accuracy_clean=(correct - correct_noisy) / half,
                     rollout_accuracy_noisy=correct_noisy / half,
                     noisy_rollout_strength=config.noisy_rollout.strength(step))
    # Row n of this process's block points at its prompt in the global media batch (blocks in process order).
    first = jax.process_index() * len(groups)
    rows["prompt_index"] = (first + np.repeat(np.arange(len(groups)), g)).astype(np.int32)
    seq = trim_completions(SequenceBatch.from_dict(rows), longest=int(every["lengths"].max()))
    sampler_logprobs = rows["sampler_logprobs"][:, :seq.completion_ids.shape[1]]
    noisy = rows["noisy"] if config.noisy_rollout is not None else None
    return Rollouts(batch=RolloutBatch(seq=seq, rewards=rows["reward_total"], sampler_logprobs=sampler_logprobs,
                                       noisy=noisy),
                    rewards={k[len("reward_"):]: v for k, v in every.items() if k.startswith("reward_")},
                    lengths=every["lengths"], truncated=every["truncated"], texts=rows["texts"],
                    answers=rows["answers"], stats=stats)

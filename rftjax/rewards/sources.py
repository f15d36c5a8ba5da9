"""Reward sources: where the reward components of a step come from, and how they add up.

    completions (host) ──RewardView──► source.score(view) ─► {component: [N]}   for each source
                                       Rewards: total = aggregate of weight_s · component[source.total]
                                                over the rows each source's gate lets it score

A source is anything with a `name`, the `components` it returns, the one component (`total`) that enters the
reward, `score(view)` and `close()` (`RewardSource`). Three kinds ship:
- `RuleSource`: the task's verifier and user reward functions, run per completion under a time limit in a
  worker pool (`rftjax.rewards.runner.RewardScorer`): `accuracy`, `correct`, `format`, `score` and the 0/1
  flags `timeout`, `error`.
- `OverlongSource`: DAPO's soft overlong punishment of the completion lengths (Yu et al. 2025, Eq. 13).
- `DeviceSource`: a jitted function of the token ids on the run's mesh.
- `rftjax.rewards.models`: a reward model (`reward.model`) and a generative judge (`reward.judge`) on the mesh.
Gates (`gate_rows`) and the order of normalisation (`aggregate`) combine them (docs/rewards.md).
A run names extra sources in `reward.sources` (`PATH.py:FACTORY[:WEIGHT]`, comma-separated), each factory
called with a `SourceContext`. Component names are the metrics' names (`reward_{component}_mean`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np

from rftjax.rewards.compose import COMPONENTS, RewardConfig, load_function
from rftjax.rewards.overlong import overlong_penalty
from rftjax.rewards.runner import FLAGS, RewardScorer


@dataclasses.dataclass(frozen=True)
class RewardView:
    """What reward sources read about N completions (this process's rows).

    Attributes:
      texts: `[N]` decoded completions.
      completion_ids: int32 `[N, T]`, right-padded; completion_mask: bool `[N, T]` (the EOS token included).
      lengths: int `[N]`, generated tokens per row.
      answers, answer_types: `[N]` lists, each prompt's gold answer and its type repeated for its group.
      prompt_index: int32 `[N]`, the prompt (row of `prompts`) each completion answers.
      prompts: the prompt batch, `[B]` per field (`prompt_ids`, `prompt_mask`, `pixel_values`, `answer`, ...).
    """

    texts: Sequence[str]
    completion_ids: np.ndarray
    completion_mask: np.ndarray
    lengths: np.ndarray
    answers: Sequence[str]
    answer_types: Sequence[str]
    prompt_index: np.ndarray
    prompts: dict

    @property
    def has_answer(self) -> np.ndarray:
        """bool `[N]`: the row's prompt has a gold answer (open-ended rows have "")."""
        return np.asarray([bool(a) for a in self.answers], bool)

    def subset(self, rows: np.ndarray) -> "RewardView":
        """The view of the rows where `rows` (bool `[N]`) is True; `prompts` stays whole (`prompt_index` still
        points into it)."""
        keep = np.flatnonzero(rows)
        return dataclasses.replace(
            self, texts=[self.texts[i] for i in keep], completion_ids=self.completion_ids[keep],
            completion_mask=self.completion_mask[keep], lengths=self.lengths[keep],
            answers=[self.answers[i] for i in keep], answer_types=[self.answer_types[i] for i in keep],
            prompt_index=self.prompt_index[keep])

    @classmethod
    def of_groups(cls, texts: Sequence[str], out, prompts: dict, group_size: int) -> "RewardView":
        """The view of `group_size` completions per prompt: `out` a (host) `rftjax.sampling.SamplingOutput` of
        `B * group_size` rows, `prompts` the batch of B prompts they answer (rows grouped contiguously)."""
        index = np.repeat(np.arange(len(prompts["answer"]), dtype=np.int32), group_size)
        return cls(texts=list(texts), completion_ids=np.asarray(out.completion_ids),
                   completion_mask=np.asarray(out.completion_mask), lengths=np.asarray(out.lengths),
                   answers=[prompts["answer"][i] for i in index],
                   answer_types=[prompts["answer_type"][i] for i in index], prompt_index=index, prompts=prompts)


class RewardSource(Protocol):
    """A source of reward components.

    Attributes:
      name: unique among a run's sources (logs, errors).
      components: the names `score` returns, unique among a run's sources: each is logged as
        `reward_{component}_mean` (the 0/1 flags `timeout`, `error` as counts `reward_{flag}s`).
      total: the component that enters the reward (times the source's weight).
    """

    name: str
    components: tuple[str, ...]
    total: str

    def score(self, view: RewardView) -> dict[str, np.ndarray]:
        """float32 `[N]` per name of `components`; must not raise on model output."""

    def close(self) -> None:
        """Release workers or device memory (a later `score` may start them again)."""


class RuleSource:
    """The verifier of the task's answers and user reward functions, per completion, under a time limit in
    worker processes (`RewardScorer` with `config`): components `accuracy`, `correct`, `format`, `score` (the
    weighted sum or the user function's `overall`: the one that enters the reward) and the flags `timeout`,
    `error`."""

    name = "rules"
    components = COMPONENTS + FLAGS
    total = "score"

    def __init__(self, config: RewardConfig = RewardConfig()):
        self.scorer = RewardScorer(config)

    def score(self, view: RewardView) -> dict[str, np.ndarray]:
        return self.scorer.score(view.texts, view.answers, view.answer_types, view.lengths.tolist())

    def close(self) -> None:
        self.scorer.close()


@dataclasses.dataclass(frozen=True)
class OverlongSource:
    """DAPO's soft overlong punishment of the completion lengths (`rftjax.rewards.overlong_penalty`, Yu et al.
    2025, Sec. 3.4, Eq. 13): component `overlong`, in [-1, 0], 0 up to `max_len - buffer_len` tokens.

    Raises:
      ValueError: buffer_len not in (0, max_len].
    """

    buffer_len: int
    max_len: int
    name = "overlong"
    components = ("overlong",)
    total = "overlong"

    def __post_init__(self):
        if not 0 < self.buffer_len <= self.max_len:
            raise ValueError(f"overlong_buffer_len={self.buffer_len} (DAPO's L_cache) needs 0 < it <= max_len="
                             f"{self.max_len} (rl.max_new_tokens)")

    def score(self, view: RewardView) -> dict[str, np.ndarray]:
        return {"overlong": overlong_penalty(view.lengths, self.max_len, self.buffer_len).astype(np.float32)}

    def close(self) -> None:
        pass


class DeviceSource:
    """A reward computed on the devices: `fn(completion_ids int32 [N, T], completion_mask bool [N, T]) ->
    float32 [N]`, jitted, on the run's mesh (`place` moves this process's rows there and the scores back), as
    component `name`. The seam for reward models: `fn` may close over params already placed on the mesh."""

    def __init__(self, name: str, fn: Callable[[jax.Array, jax.Array], jax.Array], place=None):
        from rftjax.sharding import HOST

        self.name, self.components, self.total = name, (name,), name
        self.place = place or HOST
        self._fn = jax.jit(fn)

    def score(self, view: RewardView) -> dict[str, np.ndarray]:
        ids, mask = self.place.put((np.asarray(view.completion_ids, np.int32), np.asarray(view.completion_mask)))
        return {self.name: np.asarray(self.place.local(self._fn(ids, mask)), np.float32)}

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class SourceContext:
    """What a `reward.sources` factory gets: the run's `place` (`rftjax.sharding.Placement` of its mesh), the
    policy's `model_config` and `tokenizer`, and `max_new_tokens` (the completions' budget T)."""

    place: Any
    model_config: Any
    tokenizer: Any
    max_new_tokens: int


AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
GATES = ("all", "correct", "answered", "unanswered")


def check_gate(gate: str, what: str) -> None:
    """Raise a ValueError unless `gate` is one of `GATES` (`what` names the setting)."""
    if gate not in GATES:
        raise ValueError(f"{what}={gate!r}: choose one of {GATES}")


def gate_rows(gate: str, view: RewardView, scored: dict[str, np.ndarray]) -> np.ndarray:
    """bool `[N]`, the rows a source with `gate` scores (`GATES`): `all`; `correct`, where
    the rules' `correct` component (in `scored`, from an earlier source) is >= 0.5 (FAPO's judge of correct
    answers); `answered` / `unanswered`, the rows with / without a gold answer.

    Raises:
      ValueError: an unknown gate; `correct` before any source gave `correct`.
    """
    if gate == "all":
        return np.ones(len(view.texts), bool)
    if gate == "correct":
        if "correct" not in scored:
            raise ValueError("a source gated on 'correct' must come after the rules (which give 'correct')")
        return np.asarray(scored["correct"]) >= 0.5
    check_gate(gate, "reward gate")
    return view.has_answer == (gate == "answered")


def aggregate(parts: Sequence[tuple[float, np.ndarray, np.ndarray]], prompt_index: np.ndarray,
              aggregation: str = "sum_then_normalize", eps: float = 1e-4) -> np.ndarray:
    """The total reward, float32 `[N]`, of `parts` `[(weight, values [N], scored bool [N])]` (rows a source did
    not score count 0).

    `sum_then_normalize`: `Σ weight · values` (the advantage estimator normalises the total per group).
    `normalize_then_sum`: each part first normalised within each group (rows sharing a `prompt_index`) over the
    rows it scored, `(x - mean) / (std + eps)` with Bessel's std (0 for a one-row group), then weighted and summed
    (TRL's `multi_objective_aggregation="normalize_then_sum"`, GDPO: a part's scale cannot drown another's);
    the estimator then treats that total as any reward.

    Raises:
      ValueError: an unknown aggregation.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"reward.aggregation={aggregation!r}: choose one of {AGGREGATIONS}")
    total = np.zeros(len(prompt_index), np.float64)
    for weight, values, scored in parts:
        x = np.where(scored, np.asarray(values, np.float64), 0.0)
        if aggregation == "normalize_then_sum":
            normed = np.zeros_like(x)
            for p in np.unique(prompt_index):
                rows = (prompt_index == p) & scored
                if rows.sum() > 1:
                    v = x[rows]
                    normed[rows] = (v - v.mean()) / (v.std(ddof=1) + eps)
            x = normed
        total += weight * x
    return total.astype(np.float32)


class Rewards:
    """A run's reward: sources with weights and gates; `score(view)` returns every source's components and
    `total` (float32 `[N]` each): `aggregate` of each source's `total` component over the rows its gate
    (`gate_rows`) lets it score, in the order of `sources` (rows a source does not score get 0 in its components;
    a source with no row to score is not called). `times` accumulates each source's seconds (`take_times`).

    Args:
      sources: `(source, weight)` or `(source, weight, gate)` (gate default `all`).
      aggregation: `sum_then_normalize` or `normalize_then_sum` (`aggregate`).

    Raises:
      ValueError: two sources with the same name, a component named twice (or `total`), a bad gate or
        aggregation.
    """

    def __init__(self, sources: Sequence[tuple], aggregation: str = "sum_then_normalize"):
        self.sources = tuple((s[0], float(s[1]), s[2] if len(s) > 2 else "all") for s in sources)
        names = [s.name for s, _, _ in self.sources]
        components = [c for s, _, _ in self.sources for c in s.components]
        for what, seen in (("source", names), ("component", components + ["total"])):
            twice = sorted({x for x in seen if seen.count(x) > 1})
            if twice:
                raise ValueError(f"reward {what} names must be unique, got {twice} twice (rename a source)")
        aggregate([], np.zeros(0, np.int32), aggregation)  # a bad name fails here
        for i, (source, _, gate) in enumerate(self.sources):
            given = {c for s, _, _ in self.sources[:i] for c in s.components}
            if gate == "correct" and "correct" not in given:
                raise ValueError(f"reward source {source.name!r} is gated on 'correct': it needs the rules before it")
            check_gate(gate, f"the gate of reward source {source.name!r}")
        self.components, self.aggregation = tuple(components), aggregation
        self.times = dict.fromkeys(names, 0.0)

    def score(self, view: RewardView) -> dict[str, np.ndarray]:
        """Every component and `total`, float32 `[N]` each.

        Raises:
          ValueError: a source returned other components than it declares, or not `[n]` values.
          RuntimeError: what a source raises (the rule source: a user function that failed, `on_error=raise`).
        """
        n = len(view.texts)
        out, parts = {}, []
        for source, weight, gate in self.sources:
            rows = gate_rows(gate, view, out)
            t0 = time.perf_counter()
            got = {c: np.zeros(n, np.float32) for c in source.components}
            if rows.any():
                part = source.score(view if rows.all() else view.subset(rows))
                m = int(rows.sum())
                if set(part) != set(source.components) or any(np.shape(v) != (m,) for v in part.values()):
                    raise ValueError(f"reward source {source.name!r} returned {sorted(part)} with shapes "
                                     f"{[np.shape(v) for v in part.values()]}; it declares "
                                     f"{list(source.components)} of shape ({m},)")
                for c, v in part.items():
                    got[c][rows] = np.asarray(v, np.float32)
            self.times[source.name] += time.perf_counter() - t0
            out.update(got)
            parts.append((weight, out[source.total], rows))
        out["total"] = aggregate(parts, np.asarray(view.prompt_index), self.aggregation)
        return out

    def take_times(self) -> dict[str, float]:
        """Seconds each source spent scoring since the last call, `{name: s}` (and resets them)."""
        times, self.times = self.times, dict.fromkeys(self.times, 0.0)
        return times

    def close(self) -> None:
        for source, _, _ in self.sources:
            source.close()


def parse_sources(spec: str) -> list[tuple[str, str, float]]:
    """`reward.sources` -> `[(PATH.py, FACTORY, weight)]`: comma-separated `PATH.py:FACTORY[:WEIGHT]` (weight
    default 1).

    Raises:
      ValueError: an entry without a factory name or with a weight that is not a number.
    """
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        path, _, rest = entry.partition(":")
        name, _, weight = rest.partition(":")
        try:
            out.append((path, name, float(weight or 1.0)))
        except ValueError:
            raise ValueError(f"reward.sources entry {entry!r}: the weight {weight!r} is not a number") from None
        if not name:
            raise ValueError(f"reward.sources entry {entry!r}: write PATH.py:FACTORY[:WEIGHT]")
    return out


def build_rewards(config: RewardConfig, overlong_buffer_len: int, context: SourceContext, sources: str = "",
                  model=None, judge=None, aggregation: str = "sum_then_normalize") -> Rewards:
    """A run's `Rewards`: the rules (`config`, on the rows with a gold answer), DAPO's overlong shaping when
    `overlong_buffer_len` > 0 (of `context.max_new_tokens`), a reward model (`model`,
    `rftjax.rewards.models.ModelRewardConfig`) and a judge (`judge`, `JudgeConfig`) on the run's mesh, and the
    `sources` spec's factories called with `context`; summed by `aggregation` (`aggregate`).

    Raises:
      ValueError: a bad spec, factory, shaping length, checkpoint or aggregation; names used twice.
    """
    parts: list[tuple] = [(RuleSource(config), 1.0, "answered")]
    if overlong_buffer_len:
        parts.append((OverlongSource(overlong_buffer_len, context.max_new_tokens), 1.0))
    if model is not None or judge is not None:
        from rftjax.rewards import models

        if model is not None:
            parts.append((models.reward_model_source(model, context), model.weight, model.gate))
        if judge is not None:
            parts.append((models.judge_source(judge, context), judge.weight, judge.gate))
    for path, name, weight in parse_sources(sources):
        parts.append((load_function(f"{path}:{name}", "reward.sources")(context), weight))
    return Rewards(parts, aggregation)

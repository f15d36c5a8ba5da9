"""Reward sources: where the reward components of a step come from, and how they add up.

    completions (host) ──RewardView──► source.score(view) ─► {component: [N]}   for each source
                                       Rewards: total = Σ weight_s · component[source.total]

A source is anything with a `name`, the `components` it returns, the one component (`total`) that enters the
reward, `score(view)` and `close()` (`RewardSource`). Three kinds ship:
- `RuleSource`: the task's verifier and user reward functions, run per completion under a time limit in a
  worker pool (`rftjax.rewards.runner.RewardScorer`): `accuracy`, `correct`, `format`, `score` and the 0/1
  flags `timeout`, `error`.
- `OverlongSource`: DAPO's soft overlong punishment of the completion lengths (Yu et al. 2025, Eq. 13).
- `DeviceSource`: a jitted function of the token ids on the run's mesh (the place for reward models).
A run names extra sources in `reward.sources` (`PATH.py:FACTORY[:WEIGHT]`, comma-separated), each factory
called with a `SourceContext`. Component names are the metrics' names (`reward_{component}_mean`).
"""

from __future__ import annotations

import dataclasses
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


class Rewards:
    """A run's reward: sources with weights; `score(view)` returns every source's components and `total`
    (float32 `[N]` each), `total = Σ weight · component[source.total]` in the order of `sources`.

    Raises:
      ValueError: two sources with the same name, or a component named twice (or `total`).
    """

    def __init__(self, sources: Sequence[tuple[RewardSource, float]]):
        self.sources = tuple(sources)
        names = [s.name for s, _ in self.sources]
        components = [c for s, _ in self.sources for c in s.components]
        for what, seen in (("source", names), ("component", components + ["total"])):
            twice = sorted({x for x in seen if seen.count(x) > 1})
            if twice:
                raise ValueError(f"reward {what} names must be unique, got {twice} twice (rename a source)")
        self.components = tuple(components)

    def score(self, view: RewardView) -> dict[str, np.ndarray]:
        """Every component and `total`, float32 `[N]` each.

        Raises:
          ValueError: a source returned other components than it declares, or not `[N]` values.
          RuntimeError: what a source raises (the rule source: a user function that failed, `on_error=raise`).
        """
        n = len(view.texts)
        out, total = {}, np.zeros(n, np.float32)
        for source, weight in self.sources:
            got = source.score(view)
            if set(got) != set(source.components) or any(np.shape(v) != (n,) for v in got.values()):
                raise ValueError(f"reward source {source.name!r} returned {sorted(got)} with shapes "
                                 f"{[np.shape(v) for v in got.values()]}; it declares {list(source.components)} "
                                 f"of shape ({n},)")
            out.update({k: np.asarray(v, np.float32) for k, v in got.items()})
            total = (total + np.float32(weight) * out[source.total]).astype(np.float32)
        out["total"] = total
        return out

    def close(self) -> None:
        for source, _ in self.sources:
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


def build_rewards(config: RewardConfig, overlong_buffer_len: int, context: SourceContext,
                  sources: str = "") -> Rewards:
    """A run's `Rewards`: the rules (`config`), DAPO's overlong shaping when `overlong_buffer_len` > 0 (of
    `context.max_new_tokens`), and the `sources` spec's factories called with `context`.

    Raises:
      ValueError: a bad spec, factory or shaping length; names used twice.
    """
    parts: list[tuple[RewardSource, float]] = [(RuleSource(config), 1.0)]
    if overlong_buffer_len:
        parts.append((OverlongSource(overlong_buffer_len, context.max_new_tokens), 1.0))
    for path, name, weight in parse_sources(sources):
        parts.append((load_function(f"{path}:{name}", "reward.sources")(context), weight))
    return Rewards(parts)

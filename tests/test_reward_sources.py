"""Reward sources (`rftjax.rewards.sources`): the composition of the rules, DAPO's overlong shaping and a device-side
source, checked by hand; bad sources and specs; a device-side source end to end through the CLI."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rftjax import rewards, sharding
from rftjax.metrics import read_jsonl
from rftjax.rewards.sources import parse_sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_SOURCE = os.path.join(ROOT, "tests", "fixtures", "rewards", "device_source.py")
GOOD = "<think>3 + 4</think><answer>7</answer>"


def _view(texts, lengths, ids=None):
    n = len(texts)
    ids = np.arange(n * 6, dtype=np.int32).reshape(n, 6) if ids is None else ids
    mask = np.arange(ids.shape[1])[None] < np.asarray(lengths)[:, None]
    return rewards.RewardView(texts=texts, completion_ids=ids, completion_mask=mask, lengths=np.asarray(lengths),
                              answers=["7"] * n, answer_types=["int"] * n, prompt_index=np.zeros(n, np.int32),
                              prompts={})


def _even_share(ids, mask):
    return ((ids % 2 == 0) & mask).sum(1) / np.maximum(mask.sum(1), 1)


def test_total_is_the_weighted_sum_of_each_sources_component():
    sys.path.insert(0, os.path.dirname(DEVICE_SOURCE))
    import device_source

    rules = rewards.RuleSource(rewards.RewardConfig(accuracy_weight=1.0, format_weight=0.5))
    device = rewards.DeviceSource("even_tokens", device_source.even_tokens)
    reward = rewards.Rewards([(rules, 1.0), (rewards.OverlongSource(buffer_len=2, max_len=6), 1.0), (device, 0.25)])
    view = _view([GOOD, "<answer>7</answer>", "<answer>8</answer>", "garbage"], [6, 5, 4, 3])
    out = reward.score(view)
    assert set(out) == {"accuracy", "correct", "format", "score", "timeout", "error", "overlong", "even_tokens",
                        "total"}
    np.testing.assert_allclose(out["score"], [1.5, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(out["overlong"], [-1.0, -0.5, 0.0, 0.0])  # free up to 4 tokens, -1 at 6
    even = _even_share(view.completion_ids, view.completion_mask)  # ids 0..5 / 6..11 / ...: half even, or 2 of 3
    np.testing.assert_allclose(out["even_tokens"], even, rtol=1e-6)
    np.testing.assert_allclose(out["total"], out["score"] + out["overlong"] + 0.25 * even, rtol=1e-6)
    assert out["total"].dtype == np.float32


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices: see tests/conftest.py")
def test_device_source_on_a_mesh_equals_numpy():
    sys.path.insert(0, os.path.dirname(DEVICE_SOURCE))
    import device_source

    place = sharding.Placement(sharding.make_mesh(data=4, fsdp=2, tensor=1))
    ids = np.random.default_rng(0).integers(0, 1000, (16, 9)).astype(np.int32)
    view = _view(["x"] * 16, np.arange(16) % 9 + 1, ids)
    out = rewards.DeviceSource("even_tokens", device_source.even_tokens, place).score(view)
    np.testing.assert_allclose(out["even_tokens"], _even_share(ids, view.completion_mask), rtol=1e-6)


class _Wrong:
    name, components, total = "wrong", ("a",), "a"

    def score(self, view):
        return {"b": np.zeros(len(view.texts), np.float32)}

    def close(self):
        pass


def test_bad_sources_and_specs_raise():
    with pytest.raises(ValueError, match="unique"):
        rewards.Rewards([(rewards.RuleSource(), 1.0), (rewards.RuleSource(), 1.0)])
    with pytest.raises(ValueError, match="declares"):
        rewards.Rewards([(_Wrong(), 1.0)]).score(_view(["x"], [1]))
    with pytest.raises(ValueError, match="needs 0 < it <= max_len"):
        rewards.OverlongSource(buffer_len=8, max_len=4)
    assert parse_sources(f"{DEVICE_SOURCE}:make:0.5, a.py:f") == [(DEVICE_SOURCE, "make", 0.5), ("a.py", "f", 1.0)]
    with pytest.raises(ValueError, match="PATH.py:FACTORY"):
        parse_sources("a.py")
    with pytest.raises(ValueError, match="not a number"):
        parse_sources("a.py:f:heavy")
    context = rewards.SourceContext(sharding.HOST, None, None, 8)
    with pytest.raises(ValueError, match="does not exist"):
        rewards.build_rewards(rewards.RewardConfig(), 0, context, "missing.py:make")
    with pytest.raises(ValueError, match="has no function"):
        rewards.build_rewards(rewards.RewardConfig(), 0, context, f"{DEVICE_SOURCE}:nothing")


def test_a_device_side_source_through_the_cli(tmp_path):
    """`--config.reward.sources=PATH.py:FACTORY:WEIGHT` adds a jitted reward of the token ids: its component is
    logged in metrics.jsonl, and the reward trained on is the rules' score plus its weighted share."""
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "rftjax.train", "--config", os.path.join(ROOT, "configs", "smoke.py"), "--workdir",
           workdir, "--config.mesh.num_devices=1", "--config.sft.max_steps=2", "--config.rl.steps=2",
           "--config.eval.pass_n=0", "--config.checkpoint.every=100", "--config.log.tensorboard=False",
           f"--config.reward.sources={DEVICE_SOURCE}:make:0.5"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    rl_rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["stage"] == "rl"]
    assert len(rl_rows) == 2
    for r in rl_rows:
        assert 0 <= r["reward_even_tokens_mean"] <= 1
        assert r["reward_mean"] == pytest.approx(r["reward_score_mean"] + 0.5 * r["reward_even_tokens_mean"], abs=1e-5)


def test_gates_and_both_aggregation_orders_against_a_hand_computed_example():
    """Two prompts of 2 completions; the second prompt has no gold answer. Rules score the answered rows only, a
    'judge' gated on correct rows scores row 0 only, a 'model' scores the unanswered rows."""
    from rftjax.rewards.sources import aggregate

    class Fixed:
        def __init__(self, name, values):
            self.name, self.components, self.total, self.values, self.calls = name, (name,), name, values, []

        def score(self, view):
            self.calls.append(list(view.texts))
            return {self.name: np.asarray([self.values[t] for t in view.texts], np.float32)}

        def close(self):
            pass

    texts = [GOOD, "<think>x</think><answer>8</answer>", "a cat", "a dog"]
    view = rewards.RewardView(texts=texts, completion_ids=np.zeros((4, 6), np.int32),
                              completion_mask=np.ones((4, 6), bool), lengths=np.full(4, 6),
                              answers=["7", "7", "", ""], answer_types=["int", "int", "open", "open"],
                              prompt_index=np.asarray([0, 0, 1, 1], np.int32), prompts={})
    judge = Fixed("judge", {GOOD: 0.25})
    model = Fixed("model", {"a cat": 2.0, "a dog": -1.0})
    rules = rewards.RuleSource(rewards.RewardConfig(format_weight=0.5))
    parts = [(rules, 1.0, "answered"), (judge, 2.0, "correct"), (model, 0.5, "unanswered")]
    out = rewards.Rewards(parts).score(view)
    np.testing.assert_allclose(out["score"], [1.5, 0.5, 0, 0])
    np.testing.assert_allclose(out["judge"], [0.25, 0, 0, 0])
    np.testing.assert_allclose(out["model"], [0, 0, 2.0, -1.0])
    assert judge.calls == [[GOOD]] and model.calls == [["a cat", "a dog"]]  # gated rows are never sent
    np.testing.assert_allclose(out["total"], [1.5 + 2 * 0.25, 0.5, 0.5 * 2.0, 0.5 * -1.0])
    # normalize_then_sum: per group over the scored rows, Bessel std, eps 1e-4 (TRL's order)
    out = rewards.Rewards(parts, "normalize_then_sum").score(view)
    z = 1 / (np.std([1.5, 0.5], ddof=1) + 1e-4) * 0.5  # rules in group 0: +-0.5 / std
    zm = 1.5 / (np.std([2.0, -1.0], ddof=1) + 1e-4)    # model in group 1: +-1.5 / std
    np.testing.assert_allclose(out["total"], [z, -z, 0.5 * zm, -0.5 * zm], rtol=1e-6)  # judge: one row, 0
    with pytest.raises(ValueError, match="needs the rules before it"):
        rewards.Rewards([(judge, 1.0, "correct")])
    with pytest.raises(ValueError, match="choose one of"):
        aggregate([], np.zeros(0, np.int32), "sum")

"""Rewards under a per-completion time limit in worker processes (`rftjax.rewards.RewardScorer`): hostile model
output, user reward functions (EasyR1's signature), errors and their counting."""

import os
import time

import numpy as np
import pytest

from rftjax.rewards import RewardConfig, RewardScorer, score

USER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "rewards", "user_rewards.py")


@pytest.fixture(scope="module")
def scorer():
    s = RewardScorer(RewardConfig(num_workers=2, timeout_s=1.0))
    yield s
    s.close()


def test_hostile_completions_each_end_within_the_time_limit(scorer):
    """math-verify spends its own 5 s alarm on each tower of powers (measured in this process: 5.0-5.6 s each); under
    the 1 s limit each is stopped, scores 0 and counts as a timeout, and the good rows still score."""
    towers = ["10^{10^{10^{10}}}", "9^{9^{9^{9}}}", "2^{2^{2^{2^{2^{2}}}}}", "(10^{10^{8}})!"]
    texts = [f"<think>t</think><answer>{t}</answer>" for t in towers]
    texts += ["x" * 1_000_000, "<think>" + "{" * 200_000 + "</think><answer>5</answer>",
              "<answer>" * 100_000, "<think>t</think><answer>5</answer>"]
    golds = ["5"] * len(texts)
    t0 = time.perf_counter()
    out = scorer.score(texts, golds, ["math"] * len(texts))
    elapsed = time.perf_counter() - t0
    np.testing.assert_array_equal(out["timeout"], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["score"][:5], 0)
    assert out["correct"][5] == 1 and out["format"][5] == 1  # deep braces in the reasoning: a normal answer
    assert out["score"][6] == 0 and out["score"][7] == 1.5
    # 4 timeouts of 1 s over 2 workers, plus worker restarts; unbounded, math-verify alone would take >= 20 s.
    assert elapsed < 10, elapsed


def test_in_process_scoring_equals_the_workers(scorer):
    texts = ["<think>a</think><answer>3</answer>", "<think>a</think><answer>4</answer>", "no format 3",
             "<think>b</think><answer>[1, 2, 10, 12]</answer>"]
    golds, kinds = ["3", "3", "3", "[0, 0, 10, 10]"], ["int", "int", "int", "box"]
    want = score(texts, golds, kinds, [5, 6, 7, 8], RewardConfig())
    got = RewardScorer(RewardConfig(num_workers=2)).score(texts, golds, kinds, [5, 6, 7, 8])
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, err_msg=k)
    assert not got["timeout"].any() and not got["error"].any()
    assert sorted(got) == sorted([*want, "error", "timeout"])


def test_user_reward_function_signature_and_time_limit():
    s = RewardScorer(RewardConfig(function=USER, num_workers=2))
    out = s.score(["the answer is 7!", "8", "7"], ["7", "7", "7"], ["int"] * 3, [4, 1, 1])
    np.testing.assert_allclose(out["score"], [1.1, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(out["accuracy"], [1, 0, 1])
    np.testing.assert_array_equal(out["format"], [1, 0, 0])
    s.close()
    slow = RewardScorer(RewardConfig(function=f"{USER}:sleepy", num_workers=2, timeout_s=0.5))
    out = slow.score(["0.01", "30", "0.01"], ["1"] * 3, ["int"] * 3)
    np.testing.assert_array_equal(out["timeout"], [0, 1, 0])
    np.testing.assert_array_equal(out["score"], [1, 0, 1])
    slow.close()


def test_user_function_errors_name_the_row_or_count_with_on_error_zero():
    texts, golds = ["fine", "boom here", "nan"], ["1", "2", "3"]
    with pytest.raises(RuntimeError, match=r"fragile.*row 1 \(answer '2'.*KeyError.*reward.on_error=zero"):
        RewardScorer(RewardConfig(function=f"{USER}:fragile", num_workers=2)).score(texts, golds, ["int"] * 3)
    with pytest.raises(RuntimeError, match="row 1.*KeyError"):  # the same in this process
        RewardScorer(RewardConfig(function=f"{USER}:fragile")).score(texts, golds, ["int"] * 3)
    s = RewardScorer(RewardConfig(function=f"{USER}:fragile", num_workers=2, on_error="zero"))
    out = s.score(texts, golds, ["int"] * 3)
    s.close()
    np.testing.assert_array_equal(out["error"], [0, 1, 0])
    assert out["score"][0] == 0.5 and out["score"][1] == 0 and np.isnan(out["score"][2])  # NaN is the trainer's
    with pytest.raises(RuntimeError, match="TypeError: must return a list"):
        RewardScorer(RewardConfig(function=f"{USER}:wrong_shape")).score(["a"], ["1"], ["int"])


@pytest.mark.parametrize("spec,message", [
    ("/nonexistent/reward.py", "does not exist"), (f"{USER}:missing", "has no function 'missing'")])
def test_bad_reward_function_specs_fail_at_configuration(spec, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(function=spec)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardConfig(timeout_s=0)
    with pytest.raises(ValueError, match="on_error"):
        RewardConfig(on_error="ignore")


def test_workers_of_a_python_dash_m_program_do_not_warn_about_its_main_module(tmp_path):
    """`python -m pkg.mod` (as `python -m rftjax.train`): the forkserver preloads `pkg.mod` and each worker re-runs
    it (multiprocessing's main-module fixup); runpy's 'found in sys.modules' warning must not reach the log."""
    import subprocess
    import sys

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text(
        "from rftjax.rewards import RewardConfig, RewardScorer\n"
        "if __name__ == '__main__':\n"
        "    scorer = RewardScorer(RewardConfig(num_workers=1))\n"
        "    print(scorer.score(['<answer>3</answer>', '4'], ['3', '3'], ['int', 'int'])['score'].tolist())\n"
        "    scorer.close()\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pkg.mod"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([root, str(tmp_path)])}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[1.0, 0.0]"  # scored by the worker
    assert "found in sys.modules" not in proc.stderr, proc.stderr[-2000:]

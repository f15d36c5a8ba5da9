"""Failure handling, by fault injection (`rftjax.faults`, `RFTJAX_FAULT=POINT:N`): SIGKILL during a rollout, an
update, an evaluation and a checkpoint write, each followed by a rerun, gives exactly the uninterrupted run; a
corrupt latest checkpoint falls back to the one before; a full disk fails the save loudly and leaves the previous
checkpoint restorable; non-finite rewards skip the update and are counted. (Unreadable dataset images:
tests/test_data.py; reward time limits: tests/test_reward_runner.py; several processes: test_multiprocess.py.)"""

import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from rftjax.checkpoint import Checkpointer
from rftjax.metrics import read_jsonl
from rftjax.train import Trainer
from helpers import ROOT, set_by_path, smoke_cli, strip_timings

sys.path.insert(0, os.path.join(ROOT, "configs"))
import smoke  # noqa: E402

ENV = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user's run
USER_REWARDS = os.path.join(ROOT, "tests", "fixtures", "rewards", "user_rewards.py")


def _config(**overrides):
    config = smoke.get_config("grpo")
    for key, value in {"checkpoint.every": 1, "rl.steps": 4, "mesh.num_devices": 1, **overrides}.items():
        set_by_path(config, key, value)
    return config


def _params(workdir):
    trainer = Trainer(_config(), workdir)
    return trainer.meta, jax.tree.map(np.asarray, trainer.params)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The smoke run (10 steps, a checkpoint every step) without faults: its workdir."""
    workdir = str(tmp_path_factory.mktemp("faults") / "full")
    subprocess.run(smoke_cli(workdir), check=True, env=ENV, capture_output=True, cwd=ROOT)
    return workdir


def _assert_same_run(a: str, b: str):
    for name in ("metrics", "eval", "samples"):
        assert strip_timings(read_jsonl(os.path.join(a, f"{name}.jsonl"))) == strip_timings(
            read_jsonl(os.path.join(b, f"{name}.jsonl"))), name
    meta_a, params_a = _params(a)
    meta_b, params_b = _params(b)
    assert meta_a["global_step"] == meta_b["global_step"] == 10 and meta_b["stage"] == "done"
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(x, y)


def test_sigkill_at_every_point_then_rerun_gives_the_uninterrupted_run(uninterrupted, tmp_path):
    """One workdir, killed five times in a row at different points (each rerun resumes from its latest checkpoint),
    then run to the end: its metrics, evaluations, samples and params equal the uninterrupted run's exactly."""
    killed = str(tmp_path / "killed")
    # eval:2 = in the cold start's final evaluation, between its test and OOD splits (after checkpoint 6);
    # rollout:2 / update:2 = the 2nd RL step of that launch; checkpoint_write:1 = while orbax writes the first
    # checkpoint of the launch, before it commits it.
    for fault in ("eval:2", "rollout:2", "update:2", "checkpoint_write:1"):
        proc = subprocess.run(smoke_cli(killed), env={**ENV, "RFTJAX_FAULT": fault}, capture_output=True, cwd=ROOT)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr.decode()[-3000:])
        assert not os.path.exists(os.path.join(killed, "summary.json"))
        if fault.startswith("checkpoint_write"):
            tmp = [n for n in os.listdir(os.path.join(killed, "checkpoints")) if ".orbax-checkpoint-tmp" in n]
            assert tmp, "the kill did not land during the write"
            latest = Checkpointer(killed).latest_step()  # (opening the manager cleans the temporary directory)
            assert latest == read_jsonl(os.path.join(killed, "metrics.jsonl"))[-1]["step"] - 1
    subprocess.run(smoke_cli(killed), check=True, env=ENV, capture_output=True, cwd=ROOT)
    _assert_same_run(uninterrupted, killed)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(uninterrupted, tmp_path):
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(uninterrupted, workdir)
    os.remove(os.path.join(workdir, "summary.json"))
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir, "checkpoints", "10", "state"))
             for f in fs]
    for path in files:  # truncate every file of the latest checkpoint's arrays to half its size
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    proc = subprocess.run(smoke_cli(workdir), check=True, env=ENV, capture_output=True, text=True, cwd=ROOT)
    assert "checkpoint 10 in" in proc.stdout and "cannot be restored" in proc.stdout
    assert "resuming from step 9 instead" in proc.stdout  # then it redoes step 10 and the final evaluation
    _assert_same_run(uninterrupted, workdir)


def test_a_full_disk_fails_the_save_loudly_and_keeps_the_previous_checkpoint(tmp_path):
    workdir = str(tmp_path / "full_disk")
    proc = subprocess.run(smoke_cli(workdir), env={**ENV, "RFTJAX_FAULT": "disk_full:3"}, capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert "saving checkpoint step 3" in proc.stderr and "The checkpoint of step 2 is untouched" in proc.stderr
    assert Checkpointer(workdir).all_steps() == [1, 2]
    resumed = Trainer(_config(), workdir)
    assert resumed.meta["global_step"] == 2 and resumed.meta["sft_step"] == 2


def test_non_finite_rewards_skip_the_update_and_are_counted(tmp_path):
    """A user reward function that returns NaN: no RL update happens (the params stay bitwise the cold start's),
    every step counts in `updates_skipped_nonfinite`, and the run finishes with its evaluation."""
    trainer = Trainer(_config(**{"sft.enabled": False, "rl.steps": 2, "eval.every": 100,
                                 "reward.function": f"{USER_REWARDS}:always_nan"}), str(tmp_path / "nan"))
    start = jax.tree.map(np.asarray, trainer.params)
    summary = trainer.run()
    rows = read_jsonl(os.path.join(trainer.workdir, "metrics.jsonl"))
    assert [r["updates_skipped_nonfinite"] for r in rows] == [1, 2]
    assert all(r["reward_mean"] is None and "loss" not in r for r in rows)
    for x, y in zip(jax.tree.leaves(start), jax.tree.leaves(trainer.params)):
        np.testing.assert_array_equal(x, y)
    assert summary["rl_steps"] == 2
    evals = read_jsonl(os.path.join(trainer.workdir, "eval.jsonl"))  # (accuracy is NaN: the same reward scores it)
    assert [(e["stage"], e["split"]) for e in evals] == [("rl_end", "test"), ("rl_end", "test_ood")]

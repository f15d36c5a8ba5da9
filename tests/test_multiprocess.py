"""Two processes on one mesh, as on a TPU pod (one process per host): `jax.distributed` with a coordinator on
127.0.0.1 and gloo CPU collectives, 2 CPU devices per process. The run equals a one-process run over the same 4
devices, writes its outputs once, shares one orbax checkpoint, and resumes exactly after both processes are
killed. Select it with `pytest -m multiprocess` (it runs in CI too)."""

import glob
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from rftjax.metrics import is_measured, read_jsonl
from rftjax.train import Trainer
from helpers import set_by_path, wait_for_step

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import smoke  # noqa: E402

# 4 prompts: 1 per device. A reward by completion length (a user reward function, scored in each process's reward
# workers) differs within groups even for the smoke run's untrained model, so the RL updates are not zero.
OVERRIDES = {"rl.prompts_per_step": 4, "checkpoint.every": 1, "log.progress": False,
             "reward.function": os.path.join(ROOT, "tests", "fixtures", "rewards", "user_rewards.py:length_reward")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: str) -> list[subprocess.Popen]:
    """The smoke run as 2 processes x 2 CPU devices, on a mesh over all 4."""
    port, env = _free_port(), {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return [subprocess.Popen(
        [sys.executable, "-m", "rftjax.train", "--config", os.path.join(ROOT, "configs", "smoke.py"), "--workdir",
         workdir, "--config.mesh.distributed=True", f"--config.mesh.coordinator_address=127.0.0.1:{port}",
         "--config.mesh.num_processes=2", f"--config.mesh.process_id={i}", *args],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(procs):
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-4000:]


def _config():
    config = smoke.get_config("grpo")
    for key, value in {**OVERRIDES, "mesh.num_devices": 4}.items():
        set_by_path(config, key, value)
    return config


def _numbers(rows):
    """Metric rows without timings, values as float arrays (None -> nan) per key (list values, such as the pass@k
    curve, as rows of a 2-D array)."""
    keys = sorted({k for r in rows for k in r if not is_measured(k)} - {"stage", "split"})
    out = {}
    for k in keys:
        values = [r.get(k) for r in rows]
        width = max((len(v) for v in values if isinstance(v, list)), default=None)
        missing = np.nan if width is None else np.full(width, np.nan)
        out[k] = np.asarray([missing if v is None else np.asarray(v, np.float64) for v in values])
    return out


@pytest.mark.skipif(jax.device_count() < 4, reason="the one-process reference needs 4 (virtual) devices")
def test_two_processes_equal_one_process_and_resume_exactly_after_sigkill(tmp_path):
    two = str(tmp_path / "two")
    procs = _launch(two)
    wait_for_step(two, 8, procs)  # mid-RL: the cold start is 6 steps, RL 3
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not os.path.exists(os.path.join(two, "summary.json"))
    _finish(_launch(two))  # rerun: both processes resume from the shared checkpoint

    one = Trainer(_config(), str(tmp_path / "one"))  # one process, the same 4 devices (in this pytest process)
    one.run()
    for name in ("metrics", "eval"):
        a, b = (read_jsonl(os.path.join(d, f"{name}.jsonl")) for d in (one.workdir, two))
        assert [(r["step"], r["stage"], r.get("split")) for r in a] == [(r["step"], r["stage"], r.get("split"))
                                                                         for r in b]
        na, nb = _numbers(a), _numbers(b)
        assert na.keys() == nb.keys()
        for k in na:
            np.testing.assert_allclose(nb[k], na[k], rtol=1e-5, atol=1e-5, err_msg=f"{name}.jsonl {k}")
    assert [r["step"] for r in read_jsonl(os.path.join(two, "metrics.jsonl"))] == list(range(1, 10))
    rl_rows = [r for r in read_jsonl(os.path.join(two, "metrics.jsonl")) if r["stage"] == "rl"]
    assert sum(r["reward_std"] > 0.01 and r["grad_norm"] > 0.1 for r in rl_rows) >= 2  # real RL updates

    # Only process 0 wrote: each sample record once, one TensorBoard file per launch, one summary and plot.
    samples = [r["step"] for r in read_jsonl(os.path.join(two, "samples.jsonl"))]
    assert samples == sorted(set(samples)) and samples
    assert len(glob.glob(os.path.join(two, "tensorboard", "events.out.tfevents.*"))) == 2
    assert os.path.exists(os.path.join(two, "summary.json")) and os.path.exists(os.path.join(two, "curves.png"))

    # One checkpoint, written by both processes together, restores in one process to the one-process params.
    restored = Trainer(_config(), two)
    assert restored.meta["global_step"] == 9 and restored.meta["stage"] == "done"
    for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(restored.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)
    moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(
        jax.tree.leaves(one.params), jax.tree.leaves(one.setup.params)))
    assert moved > 1e-3  # training moved the params, so the 1e-5 agreement means something

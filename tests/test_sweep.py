"""`rftjax.studies`: the confidence interval against a hand-computed example, grid parsing, and a 2-arm x 2-seed
sweep of the smoke config with its control that shares one cold start per seed, is killed mid-arm and resumed
without redoing finished runs, and writes its results."""

import json
import re
import os
import signal
import subprocess
import sys

import pytest

from rftjax.studies import report, stats, sweep
from rftjax.configs import base_config
from rftjax.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mean_ci_matches_a_hand_computed_t_interval():
    # values 0.80, 0.82, 0.87: mean 0.83; deviations -0.03, -0.01, 0.04 -> sd = sqrt(0.0026 / 2) = 0.0360555;
    # sem = sd / sqrt(3) = 0.0208167; t_{0.975, 2} = 4.302653 (t table) -> half width 0.0895674
    ci = stats.mean_ci([0.80, 0.82, None, 0.87])
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(0.83, abs=1e-12)
    assert ci["sd"] == pytest.approx(0.0360555, abs=1e-7)
    assert ci["lo"] == pytest.approx(0.83 - 0.0895674, abs=1e-6)
    assert ci["hi"] == pytest.approx(0.83 + 0.0895674, abs=1e-6)
    # two values 1, 3: mean 2, sem 1, t_{0.975, 1} = 12.706205 -> [-10.706205, 14.706205]
    ci = stats.mean_ci([1.0, 3.0])
    assert (ci["lo"], ci["hi"]) == (pytest.approx(2 - 12.706205, abs=1e-5), pytest.approx(2 + 12.706205, abs=1e-5))
    one = stats.mean_ci([0.5])
    assert one["mean"] == 0.5 and one["lo"] is None and one["hi"] is None
    assert stats.mean_ci([])["mean"] is None


def test_grid_gives_typed_arms_and_rejects_what_cannot_work():
    c = base_config()
    arms = sweep.make_arms(c, ["rl.algorithm=grpo,dr_grpo", "rl.lr=1e-5,2e-5", "rl.algo.kl_coef=0.01"])
    assert [a.name for a in arms] == ["algorithm=grpo,lr=1e-05,kl_coef=0.01", "algorithm=grpo,lr=2e-05,kl_coef=0.01",
                                      "algorithm=dr_grpo,lr=1e-05,kl_coef=0.01", "algorithm=dr_grpo,lr=2e-05,kl_coef=0.01"]
    assert arms[1].overrides == {"rl.algorithm": "grpo", "rl.lr": 2e-5, "rl.algo.kl_coef": 0.01}
    assert sweep.make_arms(c, ["rl.algo.dynamic_sampling=true,false"])[0].overrides == {"rl.algo.dynamic_sampling": True}
    assert [a.name for a in sweep.make_arms(c, ["rl.lr=1e-5", "optim.lr_decay=cosine"])] == ["lr=1e-05,lr_decay=cosine"]
    for grid, message in ((["sft.lr=1e-3,3e-4"], "fixes"), (["rl.lr"], "KEY=V1,V2"), (["rl.nope=1"], "no such"),
                          (["rl.steps=ten"], "not a int"), (["rl.lr=1", "rl.lr=2"], "twice")):
        with pytest.raises(ValueError, match=message):
            sweep.make_arms(c, grid)


def test_named_arms_carry_several_overrides_after_the_grid():
    c = base_config()
    arms = sweep.make_arms(c, ["rl.lr=1e-5"], ["grpo", "mis:rl.algo.rollout_correction=sequence, "
                                                        "rl.algo.rollout_correction_mode=mask,rl.algo.rollout_correction_max=3"])
    assert [a.name for a in arms] == ["lr=1e-05", "grpo", "mis"]
    assert arms[1].overrides == {} and arms[2].overrides == {
        "rl.algo.rollout_correction": "sequence", "rl.algo.rollout_correction_mode": "mask",
        "rl.algo.rollout_correction_max": 3.0}
    assert sweep.make_arms(c, [], ["noisy:rl.noisy_rollout.kind=gaussian"])[0].overrides == {
        "rl.noisy_rollout.kind": "gaussian"}
    for named, message in ((["a:sft.lr=1"], "fixes"), (["a:rl.lr"], "NAME:KEY=V"), ([":rl.lr=1"], "name"),
                           (["a:rl.lr=1,rl.lr=2"], "each key once"), (["a", "a"], "repeated"),
                           (["a:rl.nope=1"], "no such")):
        with pytest.raises(ValueError, match=message):
            sweep.make_arms(c, [], named)


def test_time_estimate_uses_the_mean_of_each_kind():
    done = [{"kind": "cold_start", "wall_s": 100.0}, {"kind": "arm", "wall_s": 50.0}, {"kind": "arm", "wall_s": 70.0}]
    jobs = sweep.schedule_jobs([sweep.Arm("a", {})], [0, 1], control=True)  # cold, arm, control for each seed
    assert sweep.estimate_seconds(done, jobs) == (2 * (100 + 60 + 60), 0)
    assert sweep.estimate_seconds(done[1:], jobs) == (4 * 60, 2)  # no cold start timed yet: those two left out


def test_first_arm_estimate_from_its_step_time_and_the_cold_starts_evaluation():
    c = base_config()
    c.rl.steps, c.eval.every, c.eval.during_rl_examples, c.data.test_examples = 30, 15, 200, 500
    evals = [{"stage": "sft_end", "eval_time_s": 40.0}, {"stage": "sft_end", "eval_time_s": 10.0},
             {"stage": "rl", "eval_time_s": 99.0}]  # test and OOD at the cold start's end; not its own
    # 30 steps x 3 s + the final evaluation (50 s) + one at step 15 over 200 / 500 problems (20 s)
    assert sweep.first_arm_seconds([2.0, 4.0, 3.0], c, evals) == pytest.approx(90 + 50 + 20)


def _sweep_cli(workdir, *extra):
    return [sys.executable, "-m", "rftjax.studies.sweep", "--config", os.path.join(ROOT, "configs", "smoke.py"),
            "--workdir", workdir, "--grid", "rl.algorithm=grpo,dr_grpo", "--seeds", "0,1", "--control",
            "--config.mesh.num_devices=1", "--config.sft.max_steps=4", "--config.rl.steps=3",
            "--config.checkpoint.every=1", *extra]


def test_two_arms_two_seeds_share_cold_starts_resume_after_a_kill_and_write_results(tmp_path):
    workdir = str(tmp_path / "sweep")
    env = {**os.environ, "RFTJAX_FAULT": "update:5"}  # update 5 = the 2nd RL step of the 2nd arm of seed 0
    proc = subprocess.run(_sweep_cli(workdir), env=env, capture_output=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    # the first arm's 3rd RL step gives the time left, before any arm has finished
    assert re.search(r"s per RL step in algorithm=grpo/seed0: estimated time left for the sweep \d+\.\d min",
                     proc.stdout.decode())
    first, second = (os.path.join(workdir, arm, "seed0") for arm in ("algorithm=grpo", "algorithm=dr_grpo"))
    assert os.path.exists(os.path.join(first, "summary.json")) and not os.path.exists(os.path.join(second,
                                                                                                   "summary.json"))
    kept = {path: (os.path.getmtime(path), open(path).read()) for path in (
        os.path.join(workdir, "cold_start", "seed0", "metrics.jsonl"), os.path.join(first, "metrics.jsonl"),
        os.path.join(first, "summary.json"))}
    proc = subprocess.run(_sweep_cli(workdir), capture_output=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert "sweep: 2 arm(s) x 2 seed(s) + control = 8 runs (2 cold starts); 2 finished, 6 to run" in proc.stdout.decode()
    assert "(estimated time left for the sweep: " in proc.stdout.decode()
    for path, (mtime, text) in kept.items():  # finished runs are not redone
        assert os.path.getmtime(path) == mtime and open(path).read() == text, path

    log = read_jsonl(os.path.join(workdir, "sweep_log.jsonl"))
    assert sorted(r["run"] for r in log) == sorted(
        f"{name}/seed{s}" for name in ("cold_start", "algorithm=grpo", "algorithm=dr_grpo", "control") for s in (0, 1))
    for s in (0, 1):
        cold = os.path.join(workdir, "cold_start", f"seed{s}")
        cold_rows = read_jsonl(os.path.join(cold, "metrics.jsonl"))
        assert {r["stage"] for r in cold_rows} == {"sft"} and len(cold_rows) == 4  # the cold start trained here
        cold_end = cold_rows[-1]["step"]
        for name, stage in (("algorithm=grpo", "rl"), ("algorithm=dr_grpo", "rl"), ("control", "control_sft")):
            rows = read_jsonl(os.path.join(workdir, name, f"seed{s}", "metrics.jsonl"))
            # no SFT of its own: the run starts after the cold start's last step, every step logged once (the
            # killed arm resumed from its checkpoint)
            assert {r["stage"] for r in rows} == {stage} and rows[0]["step"] == cold_end + 1, (name, s)
            assert [r["step"] for r in rows] == list(range(cold_end + 1, cold_end + 1 + len(rows))), (name, s)
            if stage == "rl":
                assert len(rows) == 3
            evals = read_jsonl(os.path.join(workdir, name, f"seed{s}", "eval.jsonl"))
            assert [e for e in evals if e["stage"] == "sft_end"] == [
                e for e in read_jsonl(os.path.join(cold, "eval.jsonl")) if e["stage"] == "sft_end"]

    results = json.load(open(os.path.join(workdir, "sweep_results.json")))
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"cold_start", "algorithm=grpo", "algorithm=dr_grpo", "control"}
    assert sorted(results["ranking"]) == ["algorithm=dr_grpo", "algorithm=grpo"]
    for name, r in rows.items():
        assert r["seeds"] == [0, 1] and r["metrics"]["test"]["n"] == 2, name
        assert len(r["pass_curve"]["mean"]) == 2  # pass@1, pass@2 (smoke: eval.pass_n = 2)
    arm = rows["algorithm=grpo"]
    gains = [json.load(open(os.path.join(workdir, "algorithm=grpo", f"seed{s}", "summary.json")))["test_accuracy_gain"]
             for s in (0, 1)]
    assert arm["metrics"]["test_gain_vs_cold"]["values"] == pytest.approx(gains)
    assert arm["curve"]["test"]["steps"] == [0, 2, 3]  # cold start, the evaluation at RL step 2, the end
    table = open(os.path.join(workdir, "sweep_results.md")).read()
    assert all(f"| {name} |" in table for name in rows)
    assert os.path.getsize(os.path.join(workdir, "sweep_curves.png")) > 10_000


def test_a_rerun_needs_the_same_base_config_but_tolerates_new_fields(tmp_path):
    c = base_config()
    sweep._check_same_base(str(tmp_path), c, {})
    saved = json.load(open(tmp_path / "sweep.json"))
    del saved["base_config"]["data"]["num_digits"]  # a sweep begun before that field existed
    json.dump(saved, open(tmp_path / "sweep.json", "w"))
    sweep._check_same_base(str(tmp_path), c, {})
    c.rl.lr = 1e-3
    with pytest.raises(ValueError, match=r"another base config \(differs in \['rl.lr'\]\)"):
        sweep._check_same_base(str(tmp_path), c, {})


def test_per_seed_values_follow_the_sorted_seeds_whatever_the_run_order(tmp_path):
    """Seeds run in the order given (here 1 then 0), but every `values` list lines up with the sorted `seeds`."""
    acc = {("cold_start", 0): 0.5, ("cold_start", 1): 0.7, ("a", 0): 0.6, ("a", 1): 0.9}
    for (name, seed), accuracy in acc.items():
        run = tmp_path / name / f"seed{seed}"
        run.mkdir(parents=True)
        stage = "sft_end" if name == "cold_start" else "rl_end"
        json.dump({"rl_steps": 3, "rl_time_s": 60.0}, open(run / "summary.json", "w"))
        with open(run / "eval.jsonl", "w") as f:
            for split in ("test", "test_ood"):
                f.write(json.dumps({"stage": stage, "split": split, "step": 5, "accuracy": accuracy}) + "\n")
    results = report.summarize(str(tmp_path), [sweep.Arm("a", {})], [1, 0], control=False)
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["a"]["seeds"] == [0, 1] and rows["a"]["metrics"]["test"]["values"] == [0.6, 0.9]
    assert rows["a"]["metrics"]["test_gain_vs_cold"]["values"] == pytest.approx([0.1, 0.2])

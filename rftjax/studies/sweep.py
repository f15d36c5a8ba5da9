"""Ablation sweeps: a grid of config overrides x seeds from shared cold starts, with confidence intervals.

    python -m rftjax.studies.sweep --config configs/digits_grpo.py --workdir runs/algos \\
        --grid rl.algorithm=grpo,dr_grpo --grid rl.lr=1e-5,2e-5 --seeds 0,1,2 --control [--config.rl.steps=50]

runs the cross product of the `--grid` values (each arm one combination), and any `--arm NAME:KEY=V,KEY=V` (a named
arm with several overrides, e.g. `--arm grpo --arm tis:rl.algo.rollout_correction=token`), for every seed. Every
run is a normal run directory (`python -m rftjax.evaluate`, `experiments/time_split.py`, TensorBoard all work on it):

    WORKDIR/sweep.json                the sweep's settings (a rerun must use the same base config)
    WORKDIR/cold_start/seed{S}/       the SFT cold start of seed S (the config with rl.enabled=False), trained once
    WORKDIR/{arm}/seed{S}/            each arm's RL run from that cold start (rl.init_from_sft), e.g.
                                      WORKDIR/algorithm=grpo,lr=1e-05/seed0
    WORKDIR/control/seed{S}/          --control: more SFT from the same cold start for as long as the seed's arms
                                      trained (their mean RL wall clock without intermediate evaluations)
    WORKDIR/sweep_results.md, .json   mean and 95% t-interval over seeds per arm (see `summarize`), the ranking
    WORKDIR/sweep_curves.png          test / OOD accuracy vs RL step per arm (mean with its interval as a band) and
                                      the pass@k curves of cold start, arms and control
    WORKDIR/sweep_log.jsonl           one line per finished run (its wall time: the time estimates)

Runs go seed by seed (cold start, arms, control), so a sweep cut short has whole seeds. Rerunning the command
skips finished runs (those with a summary.json) and resumes an interrupted one from its checkpoint; SIGTERM /
SIGINT stop the current run at a checkpoint and end the sweep (rerun to go on). `python -m rftjax.studies.sweep ...
--summarize_only` rewrites the results from the runs there are.

Grid keys may be any config field except those the shared cold start fixes (`model.*`, `data.*`, `sft.*`, `seed`,
`mesh.*`): sweep those in separate sweeps.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time

import ml_collections
import numpy as np

from rftjax import configs
from rftjax.studies.report import COLD_START, CONTROL, pct, read_run, run_values, write_report

log = logging.getLogger("rftjax")

FIXED_BY_COLD_START = ("model.", "data.", "sft.", "mesh.", "seed")


# ---- the grid -----------------------------------------------------------------------------------------------


def parse_value(config: ml_collections.ConfigDict, key: str, text: str):
    """`text` as the type of config field `key` (dotted), as `--config.KEY=text` would give it.

    Raises:
      ValueError: no such field, or `text` is not a value of its type.
    """
    try:
        node, leaf = configs.field_parent(config, key)
        kind = node.get_type(leaf)
    except (KeyError, AttributeError) as e:
        raise ValueError(f"--grid {key}: no such config field") from e
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--grid {key}={text}: not a bool (true / false)")
        return text.lower() in ("true", "1")
    try:
        return kind(text) if kind in (int, float, str) else json.loads(text)
    except ValueError as e:
        raise ValueError(f"--grid {key}={text}: not a {kind.__name__}") from e


@dataclasses.dataclass(frozen=True)
class Arm:
    """One combination of grid values: `name` (its directory, e.g. `algorithm=grpo,lr=1e-05`) and `overrides`
    (`{dotted key: value}`)."""

    name: str
    overrides: dict


def _sweepable(key: str, option: str) -> str:
    key = key.strip()
    if key.startswith(FIXED_BY_COLD_START):
        raise ValueError(f"{option} {key}: the arms share one cold start per seed, which fixes "
                         f"{', '.join(FIXED_BY_COLD_START)}; run one sweep per value instead")
    return key


def named_arm(config: ml_collections.ConfigDict, spec: str) -> Arm:
    """An `--arm NAME:KEY=V,KEY=V` spec (NAME alone: the base config) as an `Arm` named NAME.

    Raises:
      ValueError: a malformed spec, a key the shared cold start fixes or given twice, a bad value.
    """
    name, _, pairs = spec.partition(":")
    overrides = {}
    for pair in filter(None, (p.strip() for p in pairs.split(","))):
        key, sep, value = pair.partition("=")
        key = _sweepable(key, "--arm")
        if not sep or not key or key in overrides:
            raise ValueError(f"--arm {spec!r}: write NAME:KEY=V,KEY=V with each key once (e.g. "
                             f"noisy:rl.noisy_rollout.kind=gaussian)")
        overrides[key] = parse_value(config, key, value.strip())
    if not name.strip() or "/" in name:
        raise ValueError(f"--arm {spec!r}: start with a name (a directory name) before the ':'")
    return Arm(name.strip(), overrides)


def make_arms(config: ml_collections.ConfigDict, grid: list[str], named: list[str] = ()) -> list[Arm]:
    """The cross product of `--grid KEY=V1,V2,...` specs, in the order given (the last key varies fastest), then
    the `--arm NAME:KEY=V,...` arms (`named_arm`). Grid arm names use each key's last component unless two keys
    share it.

    Raises:
      ValueError: a malformed spec, a repeated key or arm name, a key the shared cold start fixes, a bad value.
    """
    axes = []
    for spec in grid:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not values or not key:
            raise ValueError(f"--grid {spec!r}: write KEY=V1,V2 (e.g. rl.algorithm=grpo,dr_grpo)")
        key = _sweepable(key, "--grid")
        if key in [k for k, _ in axes]:
            raise ValueError(f"--grid {key} is given twice: list all its values in one --grid")
        axes.append((key, [parse_value(config, key, v.strip()) for v in values.split(",")]))
    leaves = [k.rsplit(".", 1)[-1] for k, _ in axes]
    labels = [leaf if leaves.count(leaf) == 1 else k for (k, _), leaf in zip(axes, leaves)]
    arms = [Arm(",".join(f"{label}={v}" for label, v in zip(labels, combo)),
                dict(zip([k for k, _ in axes], combo))) for combo in itertools.product(*(v for _, v in axes))] \
        if axes else []
    arms += [named_arm(config, spec) for spec in named]
    if not arms:
        return [Arm("base", {})]
    if len({a.name for a in arms}) < len(arms) or {a.name for a in arms} & {COLD_START, CONTROL}:
        raise ValueError(f"--grid / --arm give repeated arm names: {[a.name for a in arms]}")
    return arms


# ---- the runs -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One run of the sweep: `kind` (`cold_start`, `arm`, `control`), its `seed`, `arm` (arm runs), and
    `directory` relative to the sweep's workdir."""

    kind: str
    seed: int
    directory: str
    arm: Arm | None = None


def schedule_jobs(arms: list[Arm], seeds: list[int], control: bool) -> list[Job]:
    """The sweep's runs in order: for each seed its cold start, its arms, then its control."""
    jobs = []
    for s in seeds:
        jobs.append(Job(COLD_START, s, os.path.join(COLD_START, f"seed{s}")))
        jobs += [Job("arm", s, os.path.join(a.name, f"seed{s}"), a) for a in arms]
        if control:
            jobs.append(Job(CONTROL, s, os.path.join(CONTROL, f"seed{s}")))
    return jobs


def finished(workdir: str, job: Job) -> bool:
    """Whether `job`'s run is done (it wrote summary.json)."""
    return os.path.exists(os.path.join(workdir, job.directory, "summary.json"))


def training_seconds(run_dir: str) -> float:
    """An RL run's stage wall clock (`rl_time_s`) without its intermediate evaluations (`stage == "rl"` records of
    eval.jsonl): the time an equal-time control gets."""
    summary, evals = read_run(run_dir)
    return summary["rl_time_s"] - sum(e.get("eval_time_s", 0.0) for e in evals if e["stage"] == "rl")


def job_config(base: ml_collections.ConfigDict, workdir: str, job: Job, arms: list[Arm]) -> ml_collections.ConfigDict:
    """The config of one run: `base` with the seed and, for a cold start, `rl.enabled=False`; for an arm its
    overrides and `rl.init_from_sft`; for a control `rl.control_sft_seconds` (the mean `training_seconds` of the
    seed's arms, which must have finished).

    Raises:
      RuntimeError: a control whose arms have not finished.
    """
    c = base.copy_and_resolve_references()
    c.seed = job.seed
    cold = os.path.join(workdir, COLD_START, f"seed{job.seed}")
    if job.kind == COLD_START:
        c.rl.enabled = False
        return c
    c.rl.init_from_sft = cold
    if job.kind == "arm":
        for key, value in job.arm.overrides.items():
            configs.set_field(c, key, value)
        return c
    arm_jobs = [j for j in schedule_jobs(arms, [job.seed], control=False) if j.kind == "arm"]
    if not all(finished(workdir, j) for j in arm_jobs):
        raise RuntimeError(f"the control of seed {job.seed} needs that seed's arms finished first")
    c.rl.control_sft_seconds = float(np.mean([training_seconds(os.path.join(workdir, j.directory)) for j in arm_jobs]))
    return c


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def estimate_seconds(done: list[dict], jobs: list[Job]) -> tuple[float, int]:
    """Estimated wall time of `jobs` from the finished runs `done` (sweep_log.jsonl records: `kind`, `wall_s`):
    each job at the mean of its kind's runs (controls at the arms' mean, as long as them by design). Returns
    `(seconds, jobs of a kind not timed yet)` (those are left out of the seconds)."""
    means = {k: float(np.mean([d["wall_s"] for d in done if d["kind"] == k])) for k in (COLD_START, "arm")
             if any(d["kind"] == k for d in done)}
    kinds = [COLD_START if j.kind == COLD_START else "arm" for j in jobs]
    return sum(means.get(k, 0.0) for k in kinds), sum(k not in means for k in kinds)


def first_arm_seconds(step_s: list[float], config: ml_collections.ConfigDict, cold_evals: list[dict]) -> float:
    """An arm's wall time estimated from its first RL steps' `step_s` (seconds each): `rl.steps` steps at their
    mean, the final evaluation as long as its cold start's (`sft_end` records' `eval_time_s`), and each
    intermediate one (every `eval.every` steps, no pass@k) at `eval.during_rl_examples / data.test_examples` of
    that. (An estimate: the cold start's evaluation includes its pass@k samples.)"""
    final = sum(e.get("eval_time_s", 0.0) for e in cold_evals if e["stage"] == "sft_end")
    n_mid = len(range(config.eval.every, config.rl.steps, config.eval.every)) if config.eval.every else 0
    mid = final * min(config.eval.during_rl_examples / max(config.data.test_examples, 1), 1.0)
    return config.rl.steps * float(np.mean(step_s)) + final + n_mid * mid


def _early_eta(done: list[dict], jobs: list[Job], config: ml_collections.ConfigDict, run_dir: str,
               after_steps: int = 3):
    """A `Trainer.on_step` hook for the sweep's first arm (`jobs[0]`; no arm timed yet): after its `after_steps`-th
    RL step it logs the sweep's estimated time left, timing the arms (and controls) by `first_arm_seconds`."""
    step_s, t0 = [], time.perf_counter()

    def on_step(stage, counters, metrics):
        if stage != "rl" or len(step_s) >= after_steps:
            return
        step_s.append(metrics["time_per_step_s"])
        if len(step_s) == after_steps:
            arm_s = first_arm_seconds(step_s, config, read_run(run_dir)[1])
            seconds, untimed = estimate_seconds(done + [{"kind": "arm", "wall_s": arm_s}], jobs[1:])
            log.info("sweep: %.1f s per RL step in %s: estimated time left for the sweep %s%s", np.mean(step_s),
                     jobs[0].directory, _fmt_minutes(seconds + max(arm_s - (time.perf_counter() - t0), 0.0)),
                     f" + {untimed} run(s) of a kind not timed yet" if untimed else "")
    return on_step


def _eta(done: list[dict], jobs: list[Job]) -> str:
    seconds, untimed = estimate_seconds(done, jobs)
    if seconds == 0:
        return ""
    return f" (estimated time left for the sweep: {_fmt_minutes(seconds)}" + \
        (f" + {untimed} run(s) of a kind not timed yet)" if untimed else ")")


def run_sweep(base: ml_collections.ConfigDict, workdir: str, grid: list[str], seeds: list[int], control: bool,
              spec: dict | None = None, named: list[str] = ()) -> dict | None:
    """Run (or resume) the sweep in `workdir` and write its results (`summarize`): the arms of `grid` and `named`
    (`make_arms`). Returns the results, or None when a run was stopped by SIGTERM / SIGINT (rerun to resume).

    Raises:
      ValueError: a bad grid, no seeds, or a workdir holding a sweep of another base config.
    """
    import jax

    from rftjax.train import Trainer

    if not seeds:
        raise ValueError("--seeds: give at least one seed (e.g. 0,1,2)")
    arms = make_arms(base, grid, named)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    _check_same_base(workdir, base, {**(spec or {}), "grid": grid, "arms": list(named), "seeds": seeds,
                                     "control": control},
                     write=jax.process_index() == 0)
    jobs = schedule_jobs(arms, seeds, control)
    log_path = os.path.join(workdir, "sweep_log.jsonl")
    from rftjax.metrics import read_jsonl

    done = read_jsonl(log_path)
    todo = [j for j in jobs if not finished(workdir, j)]
    log.info("sweep: %d arm(s) x %d seed(s)%s = %d runs (%d cold starts); %d finished, %d to run",
             len(arms), len(seeds), " + control" if control else "", len(jobs), len(seeds), len(jobs) - len(todo),
             len(todo))
    for i, job in enumerate(todo):
        log.info("sweep [%d/%d] %s%s", len(jobs) - len(todo) + i + 1, len(jobs), job.directory, _eta(done, todo[i:]))
        t0 = time.perf_counter()
        config = job_config(base, workdir, job, arms)
        trainer = Trainer(config, os.path.join(workdir, job.directory))
        if job.kind == "arm" and not any(d["kind"] == "arm" for d in done):
            trainer.on_step = _early_eta(done, todo[i:], config, trainer.workdir)
        trainer.run()
        jax.clear_caches()
        if not finished(workdir, job):
            log.warning("sweep stopped during %s; rerun the same command to resume", job.directory)
            return None
        record = {"run": job.directory, "kind": job.kind, "seed": job.seed, "wall_s": time.perf_counter() - t0,
                  "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        done.append(record)
        if jax.process_index() == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        values = run_values(os.path.join(workdir, job.directory), job.kind)
        log.info("sweep: %s done in %s: test %s%%, OOD %s%%", job.directory, _fmt_minutes(record["wall_s"]),
                 pct(values["test"]), pct(values["ood"]))
    return write_report(workdir, arms, seeds, control)


def _check_same_base(workdir: str, base: ml_collections.ConfigDict, spec: dict, write: bool = True) -> None:
    """Check that the sweep in `workdir` (if any) has the same base config (the grid and seeds may change: finished
    runs are reused; fields that only one of them has, from another rftjax version, are logged), then (`write`)
    record this one in WORKDIR/sweep.json.

    Raises:
      ValueError: the base configs differ (names the first differing fields).
    """
    path = os.path.join(workdir, "sweep.json")
    base_dict = json.loads(base.to_json())
    if os.path.exists(path):
        old, new = _flatten(json.load(open(path))["base_config"]), _flatten(base_dict)
        diff = [k for k in sorted(set(old) & set(new)) if old[k] != new[k]]
        if diff:
            raise ValueError(f"{workdir} holds a sweep of another base config (differs in {diff[:5]}): use another "
                             f"--workdir, or the same config and overrides")
        if set(old) ^ set(new):  # fields added or removed by another rftjax version: their defaults apply
            log.warning("sweep.json: config fields only in the sweep or only in this version: %s",
                        sorted(set(old) ^ set(new))[:10])
    if write:
        with open(path, "w") as f:
            json.dump({**spec, "base_config": base_dict}, f, indent=1)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def main(config, workdir):
    from absl import flags
    from ml_collections import config_flags

    f = flags.FLAGS
    seeds = [int(s) for s in f.seeds]
    spec = {"config_file": config_flags.get_config_filename(f["config"]),
            "overrides": {k: str(v) for k, v in config_flags.get_override_values(f["config"]).items()}}
    if f.summarize_only:
        write_report(os.path.abspath(workdir), make_arms(config, f.grid or [], f.arm or []), seeds, f.control)
        return
    run_sweep(config, workdir, f.grid or [], seeds, f.control, spec, f.arm or [])


if __name__ == "__main__":
    from absl import flags

    from rftjax.configs import run_cli

    flags.DEFINE_multi_string("grid", None, "KEY=V1,V2,...: a config field and its values (repeat for a grid)")
    flags.DEFINE_multi_string("arm", None, "NAME:KEY=V,KEY=V: one more arm, named, with these overrides (NAME "
                              "alone: the base config); repeat for several")
    flags.DEFINE_list("seeds", ["0"], "seeds (each gets its own cold start)")
    flags.DEFINE_bool("control", False, "add the equal-time SFT control of each seed")
    flags.DEFINE_bool("summarize_only", False, "only rewrite sweep_results.* from the runs there are")
    run_cli(main, "sweep directory (created; rerun to resume)")

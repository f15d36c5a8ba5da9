"""The main job: an SFT cold start, then RL fine-tuning, sharded, checkpointed, logged and evaluated.

    python -m rftjax.train --config configs/digits_grpo.py --workdir runs/digits [--config.rl.steps=100]

Rerunning the same command with the same workdir resumes from the latest checkpoint (params, optimizer
states, reference params, data-iterator states, run counters): the resumed run computes exactly what an
uninterrupted one would. SIGTERM / SIGINT save a checkpoint after the current step, then exit cleanly.

Outputs under WORKDIR: metrics.jsonl, eval.jsonl, samples.jsonl, tensorboard/, checkpoints/, sft_checkpoint/,
curves.png, summary.json. This module holds the stages and their bookkeeping only; the run is built by
`rftjax.build`, rollouts come from `rftjax.rollout`, the RL update is `rftjax.rl_update` (README, "Architecture").
"""

from __future__ import annotations

import functools
import logging
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from rftjax import faults
from rftjax import metrics as run_metrics
from rftjax import steps
from rftjax.build import build_run
from rftjax.checkpoint import SFT_CHECKPOINT, Checkpointer
from rftjax.data.pipeline import make_dataset
from rftjax.evaluate import evaluate_splits
from rftjax.hardware import host_peak_rss_gb
from rftjax.rollout import Rollouts, collect_rollouts
from rftjax.sharding import process_share
from rftjax.state import Counters, RunState, StageProgress
from rftjax.batches import SequenceBatch

log = logging.getLogger("rftjax")


def _mean(metrics: dict) -> dict[str, float]:
    """Per-key mean of stacked per-update metrics (host arrays `[K]`) as Python floats."""
    return {k: float(np.mean(np.asarray(v, np.float64))) for k, v in metrics.items()}


class Trainer:
    """One run's stages (cold start, RL or its SFT control), logs and evaluations, over a `RunState`."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, restore: bool = True):
        self.c = config
        self.setup = build_run(config, workdir)
        self.workdir = self.setup.workdir
        self.state = RunState(self.setup, restore)
        if self.state.started_from_sft:  # the cold start's evaluations head this run's eval.jsonl
            run_metrics.copy_evals(self.state.started_from_sft, self.workdir, "sft_end")
        self.sft_eval_fn = jax.jit(functools.partial(steps.sft_loss, config=self.setup.model_config))
        self.logger = run_metrics.RunLogger(self.workdir, self.state.counters.global_step, config.log.tensorboard,
                                            enabled=jax.process_index() == 0, resume_lines=self.state.resume_log_lines)
        self.state.log_lines = self.logger.line_counts  # each checkpoint records how far the logs had got
        self.stop_requested = False
        # Called after each logged step as on_step(stage, counters, metrics) (the sweep's early time estimate)
        self.on_step: Callable[[str, Counters, dict], None] | None = None

    @property
    def params(self):
        """The policy's current params (all of them: the trained ones with the frozen ones)."""
        return self.state.full(self.state.stage.policy.params)

    @property
    def meta(self) -> dict:
        """The run counters as a dict (a read-only view, as saved in the checkpoint's meta)."""
        return self.state.counters.as_meta()

    # ---- the stage loop -----------------------------------------------------------------------------------

    def _loop(self, stage: str, progress: StageProgress, more: Callable[[], bool],
              step: Callable[[int], tuple[dict, bool]], total: int | None = None, desc: str | None = None,
              postfix: Callable[[dict], dict] = lambda m: {}) -> bool:
        """Run `step(n) -> (metrics, stop)` for n = 1, 2, ... of the stage while `more()`, with the bookkeeping
        every stage shares: the stage's `progress` (step count and wall clock), the global step, metrics.jsonl
        under `stage` (with the process's peak resident memory so far, `host_peak_rss_gb`), the progress bar,
        periodic checkpoints, SIGTERM. True if the stage ended (not stopped by a signal)."""
        c = self.state.counters
        bar = tqdm(total=total, initial=progress.step, desc=desc or stage, dynamic_ncols=True,
                   disable=not self.c.log.progress or jax.process_index())
        t_start = time.perf_counter() - progress.time_s
        while self._go_on(more()):
            progress.step += 1
            c.global_step += 1
            m, stop = step(progress.step)
            progress.time_s = time.perf_counter() - t_start
            m["host_peak_rss_gb"] = host_peak_rss_gb()
            self.logger.log(c.global_step, stage, m)
            if self.on_step is not None:
                self.on_step(stage, c, m)
            bar.update(1)
            bar.set_postfix(postfix(m))
            if c.global_step % self.c.checkpoint.every == 0:
                self.state.save()
            if stop:
                break
        bar.close()
        return not self.stop_requested

    def _go_on(self, more: bool) -> bool:
        """Whether the stage loop takes another step: `more` as process 0 decided it (clocks differ between
        processes) unless a process was asked to stop (then all stop, after saving together)."""
        place = self.setup.place
        self.stop_requested = bool(np.any(place.gather(np.asarray([self.stop_requested]))))
        return bool(place.agree([more])[0]) and not self.stop_requested

    def _within(self, stage: str, progress: StageProgress, limits: dict[str, tuple[float, float]]) -> bool:
        """Whether `stage` ("sft" or "rl") may take another step: False once any `{reason: (value, limit)}` has
        `value >= limit` (a limit <= 0 is off); the first such reason is kept as the stage's end reason
        (`progress.end_reason`: `sft_end_reason` / `rl_end_reason` in summary.json)."""
        for reason, (value, limit) in limits.items():
            if limit > 0 and value >= limit:
                if reason == "max_seconds":
                    log.info("%s: time budget of %.0f s spent (%s.max_seconds); ending the stage with its evaluation",
                             stage, limit, stage)
                progress.end_reason = reason
                return False
        return True

    def _end_stage(self, eval_stage: str, params, next_stage: str = "done"):
        """Evaluate `params` as `eval_stage`, move to `next_stage` (`RunState.finish_stage`), checkpoint."""
        self.evaluate_all(eval_stage, params=params)
        self.state.finish_stage(params, next_stage)
        self.state.save()

    # ---- cold start ---------------------------------------------------------------------------------------

    def val_loss(self, params) -> float:
        """Mean SFT loss over the validation split's full batches of `sft.batch_size` (each process its block)."""
        it = iter(make_dataset(self.setup.sources["val"], self.setup.sft_pre, shuffle=False, num_epochs=1,
                               num_threads=1, **process_share(self.c.sft.batch_size)))
        return float(np.mean([float(self.sft_eval_fn(params, self.setup.put(SequenceBatch.from_dict(b)))[0])
                              for b in it]))

    def _sft_update(self) -> dict:
        """One SFT update on the next traced batch (cold start and control); its metrics as floats (which waits
        for the update)."""
        s = self.state.stage
        batch = self.setup.put(SequenceBatch.from_dict(next(self.state.sft_iter)))
        s.policy, m = s.update(s.policy, batch, self.state.frozen)
        return {k: float(v) for k, v in m.items()}

    def _sft_step(self, n: int) -> tuple[dict, bool]:
        c, s, counters = self.c.sft, self.state.stage, self.state.counters
        t0 = time.perf_counter()
        m = self._sft_update()
        m.update(lr=float(s.schedule(n - 1)), time_per_step_s=time.perf_counter() - t0)
        if n % c.eval_every:
            return m, False
        m["val_loss"] = vl = self.val_loss(self.params)
        if counters.best_val_loss is None or vl < counters.best_val_loss * (1 - c.min_delta_rel) - 1e-6:
            counters.best_val_loss, counters.bad_evals, counters.best_step = vl, 0, counters.global_step
            s.best = jax.tree.map(jnp.copy, s.policy.params)
            return m, False
        counters.bad_evals += 1
        if counters.bad_evals < c.patience:
            return m, False
        log.info("SFT: validation loss stopped improving (best %.4f at step %s)", counters.best_val_loss,
                 counters.best_step)
        counters.sft.end_reason = "patience"
        return m, True

    def run_sft(self):
        c = self.c
        counters = self.state.counters

        def more():
            return self._within("sft", counters.sft, {"max_steps": (counters.sft.step, c.sft.max_steps),
                                                      "max_seconds": (counters.sft.time_s, c.sft.max_seconds)})

        if not self._loop("sft", counters.sft, more, self._sft_step, c.sft.max_steps,
                          postfix=lambda m: {"loss": f"{m['sft_loss']:.3f}",
                                             "val": m.get("val_loss", counters.best_val_loss)}):
            return
        best = self.state.stage.best
        params = self.params if best is None else self.state.full(best)  # best validation loss
        self._end_stage("sft_end", params, "rl" if c.rl.enabled else "done")
        # The cold-start result alone (trainable params + data positions), for RL ablations (rl.init_from_sft).
        self.state.save(Checkpointer(self.workdir, max_to_keep=1, subdir=SFT_CHECKPOINT),
                        {"params": self.state.trainable(params)})

    # ---- RL stage and its control -------------------------------------------------------------------------

    def rl_update_step(self, rollouts: Rollouts, key) -> dict:
        """The update of one RL step from its rollouts: one host -> device transfer of the `RolloutBatch`, then
        `rftjax.rl_update` on the devices. Returns the step's metrics (update means, rewards, rollout stats).
        Rollouts with a non-finite reward are not trained on: `updates_skipped_nonfinite` counts them (the
        optimizer skips updates whose gradients are not finite on its own: `skipped_updates`)."""
        t0 = time.perf_counter()
        s = self.state.stage
        if not rollouts.finite:
            bad = np.flatnonzero(~np.isfinite(rollouts.rewards["total"]))
            log.warning("step %d: non-finite rewards at rows %s; the update is skipped",
                        self.state.counters.global_step, bad[:10].tolist())
            self.state.counters.updates_skipped_nonfinite += 1
            return {**rollouts.metrics(), "updates_skipped_nonfinite": self.state.counters.updates_skipped_nonfinite,
                    "time_per_step_s": rollouts.time_s}
        s.policy, s.critic, metrics = s.rl_update(s.policy, s.critic, s.ref, self.state.frozen,
                                                  self.setup.put(rollouts.batch), key)
        policy_metrics, critic_metrics = jax.device_get(metrics)
        update_time = time.perf_counter() - t0
        m = {**_mean(policy_metrics), **_mean(critic_metrics), **rollouts.metrics()}
        m.update(update_time_s=update_time, time_per_step_s=rollouts.time_s + update_time,
                 updates_skipped_nonfinite=self.state.counters.updates_skipped_nonfinite)
        return m

    def _rl_step(self, n: int) -> tuple[dict, bool]:
        c, run = self.c, self.setup
        key = jax.random.fold_in(run.key, self.state.counters.global_step)
        rollouts = collect_rollouts(run.policy(self.params), self.state.rl_iter, key, run.rollout_config,
                                    run.rewards, run.place, step=n - 1)
        faults.reached("rollout")
        m = self.rl_update_step(rollouts, key)
        faults.reached("update")
        m["lr"] = float(self.state.stage.schedule(int(self.state.stage.policy.step) - 1))
        if n % c.log.samples_every == 0:
            self.logger.log_samples(self.state.counters.global_step, [
                {"completion": text, "answer": answer, "reward": float(reward)} for text, answer, reward in
                list(zip(rollouts.texts, rollouts.answers, rollouts.rewards["total"]))[:c.log.num_samples]])
        if n % c.eval.every == 0 and n < c.rl.steps:
            self.evaluate_all("rl", c.eval.during_rl_examples, pass_n=0)
        return m, False

    def run_rl(self):
        c = self.c
        counters = self.state.counters

        def more():
            return self._within("rl", counters.rl, {"steps": (counters.rl.step, c.rl.steps),
                                                    "max_seconds": (counters.rl.time_s, c.rl.max_seconds)})

        if self._loop("rl", counters.rl, more, self._rl_step, c.rl.steps, c.rl.algorithm,
                      lambda m: {"reward": f"{m['reward_mean']:.3f}", "acc": f"{m['accuracy']:.2f}",
                                 "s_per_step": f"{m['time_per_step_s']:.1f}"}):
            self._end_stage("rl_end", self.params)

    def run_control_sft(self):
        """Control: spend `rl.control_sft_seconds` on more SFT over the same traced set (no early stopping), at
        the learning rate `rl.control_schedule` says: the cold start's schedule continued from the step it stopped
        at (`continue`), or that schedule anew from its warm-up (`restart`)."""
        counters = self.state.counters
        if self._loop("control_sft", counters.rl,
                      lambda: self._within("rl", counters.rl, {"control_sft_seconds": (counters.rl.time_s,
                                                                                       self.c.rl.control_sft_seconds)}),
                      lambda n: ({**self._sft_update(), "lr": float(self.state.stage.schedule(n - 1))}, False),
                      desc="control sft"):
            self._end_stage("control_end", self.params)

    # ---- evaluation and the whole run ---------------------------------------------------------------------

    def evaluate_all(self, stage: str, n: int | None = None, pass_n: int | None = None, params=None) -> dict:
        """Evaluate `params` (default: the policy's) on test and OOD, logged as `stage` at the global step."""
        return evaluate_splits(self.setup, self.params if params is None else params, self.logger,
                               self.state.counters.global_step, stage, n, pass_n)

    def _install_signal_handlers(self):
        def handler(signum, frame):
            log.warning("signal %d: saving a checkpoint after this step, then exiting", signum)
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def run(self) -> dict:
        """Run the remaining stages; returns the summary ({} when stopped by a signal: rerun to resume)."""
        self._install_signal_handlers()
        try:
            if self.state.counters.stage == "sft":
                self.run_sft()
            if self.state.counters.stage == "rl" and not self.stop_requested:
                self.run_control_sft() if self.state.control else self.run_rl()
            if self.stop_requested:
                self.state.save()
                log.warning("stopped at step %d; rerun the same command to resume", self.state.counters.global_step)
                return {}
            return self.finish()
        finally:
            self.logger.close()
            self.setup.rewards.close()

    def finish(self) -> dict:
        """summary.json, curves.png and the printed summary table (process 0 only: the others return {})."""
        if jax.process_index():
            return {}
        summary = run_metrics.write_summary(self.workdir, self.meta, self.c.rl.algorithm,
                                            "control_end" if self.state.control else "rl_end")
        try:
            run_metrics.plot_curves(self.workdir)
        except Exception as e:  # noqa: BLE001 - a plotting problem must not fail a finished run
            log.warning("plotting failed: %s", e)
        print(run_metrics.summary_table(summary))
        return summary


def main(config, workdir):
    Trainer(config, workdir).run()


if __name__ == "__main__":
    from rftjax.configs import run_cli

    run_cli(main, "run directory (created; rerun to resume)")

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

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from rftjax import metrics as run_metrics
from rftjax import steps
from rftjax.build import build_run, train_iterators
from rftjax.checkpoint import SFT_CHECKPOINT, Checkpointer
from rftjax.data.pipeline import iterator_state, make_dataset
from rftjax.evaluate import evaluate_splits
from rftjax.rl_update import make_rl_update
from rftjax.rollout import Rollouts, collect_rollouts
from rftjax.steps import SequenceBatch, TrainState

log = logging.getLogger("rftjax")


@dataclasses.dataclass
class Counters:
    """Where a run is; the checkpoint's `meta` holds them and a resumed run starts from them.

    Attributes:
      stage: `sft`, `rl` (the RL stage or the SFT control) or `done`.
      global_step, sft_step, rl_step: steps taken in all, in the cold start, in the RL stage (or control).
      best_val_loss, best_step, bad_evals: the cold start's early stopping (best validation loss, the global
        step it was reached at, evaluations since without improvement).
      sft_time_s, rl_time_s: wall seconds spent in each stage (evaluations included).
    """

    stage: str = "sft"
    global_step: int = 0
    sft_step: int = 0
    rl_step: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    sft_time_s: float = 0.0
    rl_time_s: float = 0.0

    @classmethod
    def from_meta(cls, meta: dict) -> "Counters":
        """The counters in a checkpoint's `meta` (other keys, and counters it lacks, are ignored)."""
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name in meta})


@dataclasses.dataclass
class StageState:
    """The device state of the current stage: the policy's `TrainState` and its learning-rate `schedule`, the
    critic's `TrainState` (PPO), the frozen reference params (a KL term), the best params of the cold start."""

    policy: TrainState
    schedule: Callable[[int], Any]
    critic: TrainState | None = None
    ref: Any = None
    best: Any = None


def _shardings(tree):
    return None if tree is None else jax.tree.map(lambda x: x.sharding, tree)


def _mean(metrics: dict) -> dict[str, float]:
    """Per-key mean of stacked per-update metrics (host arrays `[K]`) as Python floats."""
    return {k: float(np.mean(np.asarray(v, np.float64))) for k, v in metrics.items()}


def rollout_metrics(rollouts: Rollouts) -> dict[str, float]:
    """Rewards, accuracy, lengths and truncation of the rows trained on, plus the rollout statistics."""
    r, lengths = rollouts.rewards, rollouts.batch.seq.completion_mask.sum(1)
    return {"reward_mean": float(r["total"].mean()), "reward_std": float(r["total"].std()),
            "accuracy": float(r["correct"].mean()), "format_rate": float(r["format"].mean()),
            "reward_accuracy_mean": float(r["accuracy"].mean()), "reward_format_mean": float(r["format"].mean()),
            "reward_overlong_mean": float(r["overlong"].mean()), "completion_len_mean": float(lengths.mean()),
            "completion_len_max": int(lengths.max()), "truncation_rate": float(rollouts.truncated.mean()),
            **rollouts.stats}


class Trainer:
    """One run's stages (cold start, RL or its SFT control), checkpoints and logs; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, restore: bool = True):
        self.setup = run = build_run(config, workdir)
        self.c, self.workdir = config, run.workdir
        self.sft_iter, self.rl_iter = train_iterators(run)
        self.counters = Counters(stage="sft" if config.sft.enabled else "rl")
        self.ckpt = Checkpointer(self.workdir, config.checkpoint.keep)
        self.sft_eval_fn = jax.jit(functools.partial(steps.sft_loss, config=run.model_config))
        self._enter_stage(run.params)
        restored = restore and self.ckpt.latest_step() is not None
        if restored:
            self._restore(self.ckpt.latest_step())
            log.info("resumed from step %d (stage %s)", self.counters.global_step, self.counters.stage)
        elif config.rl.init_from_sft:
            self._start_from_sft(config.rl.init_from_sft)
        self.logger = run_metrics.RunLogger(self.workdir, self.counters.global_step, config.log.tensorboard)
        self.stop_requested = False

    @property
    def params(self):
        """The policy's current params."""
        return self.state.policy.params

    @property
    def meta(self) -> dict:
        """The counters as a dict (read-only view, as saved in the checkpoint's meta)."""
        return dataclasses.asdict(self.counters)

    @property
    def control(self) -> bool:
        """Whether the RL stage is the SFT control (`rl.control_sft_seconds > 0`)."""
        return self.c.rl.control_sft_seconds > 0

    # ---- states and checkpoints ---------------------------------------------------------------------------

    def _train_state(self, params, lr: float, warmup: int, total: int, weight_decay: float):
        o = self.c.optim
        schedule = steps.make_schedule(lr, total, warmup, o.lr_decay)
        tx = steps.make_optimizer(schedule, weight_decay, o.b1, o.b2, o.grad_clip, o.grad_accum,
                                  {"vision_tower": o.vision_lr_scale})
        return jax.jit(lambda p: TrainState.create(p, tx))(params), schedule

    def _enter_stage(self, params):
        """Fresh states and update functions of the current stage, starting from `params`: the SFT optimizer
        (cold start, control, or a finished run), or the RL one with the critic and the reference it needs."""
        c, mc, algo = self.c, self.setup.model_config, self.setup.algo
        if self.counters.stage != "rl" or self.control:
            policy, schedule = self._train_state(params, c.sft.lr, c.sft.warmup_steps, c.sft.max_steps,
                                                 c.sft.weight_decay)
            self.state = StageState(policy, schedule)
            self.update = steps.make_update(functools.partial(steps.sft_loss, config=mc), _shardings(policy))
            return
        n_rows = c.rl.prompts_per_step * algo.group_size
        n_updates = c.rl.steps * algo.num_iterations * (n_rows // (c.rl.minibatch_size or n_rows))
        policy, schedule = self._train_state(params, c.rl.lr, c.rl.warmup_steps, n_updates, c.rl.weight_decay)
        critic = self._train_state(steps.init_critic(params, mc), c.rl.critic_lr, 0, n_updates, 0.0)[0] \
            if algo.uses_critic else None
        ref = jax.tree.map(jnp.copy, params) if algo.uses_reference else None
        self.state = StageState(policy, schedule, critic, ref)
        self.rl_update = make_rl_update(mc, algo, c.rl.temperature, c.rl.minibatch_size, _shardings(policy),
                                        _shardings(critic))

    def _ckpt_state(self) -> dict:
        s = self.state
        return {"policy": s.policy, "ref": {} if s.ref is None else s.ref,
                "critic": {} if s.critic is None else s.critic, "best": {} if s.best is None else s.best}

    def save(self, ckpt: Checkpointer | None = None, state=None):
        data = {"sft": iterator_state(self.sft_iter), "rl": iterator_state(self.rl_iter)}
        meta = {**self.meta, "has_best": self.state.best is not None, "config": self.c.to_json(),
                "key_data": np.asarray(jax.random.key_data(self.setup.key)).tolist()}
        (ckpt or self.ckpt).save(self.counters.global_step, self._ckpt_state() if state is None else state, data, meta)

    def _restore(self, step: int):
        meta = self.ckpt.read_meta(step)
        self.counters = Counters.from_meta(meta)
        if self.counters.stage == "done":  # nothing left to train: the params are all a finished run needs
            self._enter_stage(self.ckpt.restore_params(step, self.setup.params))
            return
        self._enter_stage(self.setup.params)
        if meta.get("has_best"):
            self.state.best = self.setup.params
        state, data, _ = self.ckpt.restore(step, self._ckpt_state())
        self.state = dataclasses.replace(self.state, policy=state["policy"], ref=state["ref"] or None,
                                         critic=state["critic"] or None, best=state["best"] or None)
        self.sft_iter.set_state(data["sft"])
        self.rl_iter.set_state(data["rl"])

    def _start_from_sft(self, run_dir: str):
        """Begin at another run's cold-start result: its `sft_checkpoint/` and its `sft_end` evaluations."""
        src = Checkpointer(run_dir, subdir=SFT_CHECKPOINT)
        step = src.latest_step()
        if step is None:
            raise ValueError(f"bad config: rl.init_from_sft={run_dir!r} has no {SFT_CHECKPOINT}/ (run its SFT stage)")
        self.counters = dataclasses.replace(Counters.from_meta(src.read_meta(step)), stage="rl")
        state, data, _ = src.restore(step, {"params": self.setup.params})
        self._enter_stage(state["params"])  # fresh RL optimizer; reference = the cold-start result
        self.sft_iter.set_state(data["sft"])
        self.rl_iter.set_state(data["rl"])
        evals = [e for e in run_metrics.read_jsonl(os.path.join(run_dir, "eval.jsonl")) if e["stage"] == "sft_end"]
        with open(os.path.join(self.workdir, "eval.jsonl"), "w") as f:
            f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in evals)
        log.info("starting from the cold start of %s (step %d)", run_dir, self.counters.global_step)

    # ---- the stage loop -----------------------------------------------------------------------------------

    def _loop(self, stage: str, counter: str, clock: str, more: Callable[[], bool],
              step: Callable[[int], tuple[dict, bool]], total: int | None = None, desc: str | None = None,
              postfix: Callable[[dict], dict] = lambda m: {}) -> bool:
        """Run `step(n) -> (metrics, stop)` for n = 1, 2, ... of the stage while `more()`, with the bookkeeping
        every stage shares: the stage's step counter (`counter`) and wall clock (`clock`), the global step,
        metrics.jsonl under `stage`, the progress bar, periodic checkpoints, SIGTERM. True if the stage ended
        (not stopped by a signal)."""
        c = self.counters
        bar = tqdm(total=total, initial=getattr(c, counter), desc=desc or stage, dynamic_ncols=True,
                   disable=not self.c.log.progress or jax.process_index())
        t_start = time.perf_counter() - getattr(c, clock)
        while more() and not self.stop_requested:
            setattr(c, counter, getattr(c, counter) + 1)
            c.global_step += 1
            m, stop = step(getattr(c, counter))
            setattr(c, clock, time.perf_counter() - t_start)
            self.logger.log(c.global_step, stage, m)
            bar.update(1)
            bar.set_postfix(postfix(m))
            if c.global_step % self.c.checkpoint.every == 0:
                self.save()
            if stop:
                break
        bar.close()
        return not self.stop_requested

    def _end_stage(self, eval_stage: str, params, next_stage: str = "done"):
        """Evaluate `params` as `eval_stage`, move to `next_stage` (its fresh states from `params`), checkpoint."""
        self.evaluate_all(eval_stage, params=params)
        self.counters.stage = next_stage
        if next_stage == "done":  # nothing left to train: keep the policy's state (no reference, critic, best)
            self.state = StageState(self.state.policy.replace(params=params), self.state.schedule)
        else:
            self._enter_stage(params)
        self.save()

    # ---- cold start ---------------------------------------------------------------------------------------

    def val_loss(self, params) -> float:
        it = iter(make_dataset(self.setup.sources["val"], self.setup.sft_pre, batch_size=self.c.sft.batch_size,
                               shuffle=False, num_epochs=1, drop_remainder=True, num_threads=1))
        return float(np.mean([float(self.sft_eval_fn(params, self.setup.put(SequenceBatch.from_dict(b)))[0])
                              for b in it]))

    def _sft_step(self, n: int) -> tuple[dict, bool]:
        c, s, counters = self.c.sft, self.state, self.counters
        t0 = time.perf_counter()
        s.policy, m = self.update(s.policy, self.setup.put(SequenceBatch.from_dict(next(self.sft_iter))))
        jax.block_until_ready(s.policy.params)
        m = {k: float(v) for k, v in m.items()}
        m.update(lr=float(s.schedule(n - 1)), time_per_step_s=time.perf_counter() - t0)
        if n % c.eval_every:
            return m, False
        m["val_loss"] = vl = self.val_loss(s.policy.params)
        if counters.best_val_loss is None or vl < counters.best_val_loss * (1 - c.min_delta_rel) - 1e-6:
            counters.best_val_loss, counters.bad_evals, counters.best_step = vl, 0, counters.global_step
            s.best = jax.tree.map(jnp.copy, s.policy.params)
            return m, False
        counters.bad_evals += 1
        if counters.bad_evals < c.patience:
            return m, False
        log.info("SFT: validation loss stopped improving (best %.4f at step %s)", counters.best_val_loss,
                 counters.best_step)
        return m, True

    def run_sft(self):
        c = self.c
        if not self._loop("sft", "sft_step", "sft_time_s", lambda: self.counters.sft_step < c.sft.max_steps,
                          self._sft_step, c.sft.max_steps, postfix=lambda m: {
                              "loss": f"{m['sft_loss']:.3f}", "val": m.get("val_loss", self.counters.best_val_loss)}):
            return
        params = self.params if self.state.best is None else self.state.best  # the best validation loss
        self._end_stage("sft_end", params, "rl" if c.rl.enabled else "done")
        # The cold-start result alone (params + data positions), kept for RL ablations (rl.init_from_sft).
        self.save(Checkpointer(self.workdir, max_to_keep=1, subdir=SFT_CHECKPOINT), {"params": params})

    # ---- RL stage and its control -------------------------------------------------------------------------

    def rl_update_step(self, rollouts: Rollouts, key) -> dict:
        """The update of one RL step from its rollouts: one host -> device transfer of the `RolloutBatch`, then
        `rftjax.rl_update` on the devices. Returns the step's metrics (update means, rewards, rollout stats)."""
        t0 = time.perf_counter()
        s = self.state
        s.policy, s.critic, metrics = self.rl_update(s.policy, s.critic, s.ref, self.setup.put(rollouts.batch), key)
        policy_metrics, critic_metrics = jax.device_get(metrics)
        update_time = time.perf_counter() - t0
        m = {**_mean(policy_metrics), **_mean(critic_metrics), **rollout_metrics(rollouts)}
        m.update(update_time_s=update_time, time_per_step_s=rollouts.stats["rollout_time_s"] + update_time)
        return m

    def _rl_step(self, n: int) -> tuple[dict, bool]:
        c, run = self.c, self.setup
        key = jax.random.fold_in(run.key, self.counters.global_step)
        rollouts = collect_rollouts(self.params, run.model_config, run.tokenizer, self.rl_iter, key,
                                    run.rollout_config, run.reward_config, run.put)
        m = self.rl_update_step(rollouts, key)
        m["lr"] = float(self.state.schedule(int(self.state.policy.step) - 1))
        if n % c.log.samples_every == 0:
            self.logger.log_samples(self.counters.global_step, [
                {"completion": text, "answer": answer, "reward": float(reward)} for text, answer, reward in
                list(zip(rollouts.texts, rollouts.answers, rollouts.rewards["total"]))[:c.log.num_samples]])
        if n % c.eval.every == 0 and n < c.rl.steps:
            self.evaluate_all("rl", c.eval.during_rl_examples, pass_k=0)
        return m, False

    def run_rl(self):
        c = self.c
        if self._loop("rl", "rl_step", "rl_time_s", lambda: self.counters.rl_step < c.rl.steps, self._rl_step,
                      c.rl.steps, c.rl.algorithm, lambda m: {"reward": f"{m['reward_mean']:.3f}",
                                                             "acc": f"{m['accuracy']:.2f}",
                                                             "s_per_step": f"{m['time_per_step_s']:.1f}"}):
            self._end_stage("rl_end", self.params)

    def _control_step(self, n: int) -> tuple[dict, bool]:
        s = self.state
        s.policy, m = self.update(s.policy, self.setup.put(SequenceBatch.from_dict(next(self.sft_iter))))
        return {k: float(v) for k, v in m.items()}, False

    def run_control_sft(self):
        """Control: spend `rl.control_sft_seconds` on more SFT over the same traced set (no early stopping)."""
        if self._loop("control_sft", "rl_step", "rl_time_s",
                      lambda: self.counters.rl_time_s < self.c.rl.control_sft_seconds, self._control_step,
                      desc="control sft"):
            self._end_stage("control_end", self.params)

    # ---- evaluation and the whole run ---------------------------------------------------------------------

    def evaluate_all(self, stage: str, n: int | None = None, pass_k: int | None = None, params=None) -> dict:
        """Evaluate `params` (default: the policy's) on test and OOD, logged as `stage` at the global step."""
        return evaluate_splits(self.setup, self.params if params is None else params, self.logger,
                               self.counters.global_step, stage, n, pass_k)

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
            if self.counters.stage == "sft":
                self.run_sft()
            if self.counters.stage == "rl" and not self.stop_requested:
                self.run_control_sft() if self.control else self.run_rl()
            if self.stop_requested:
                self.save()
                log.warning("stopped at step %d; rerun the same command to resume", self.counters.global_step)
                return {}
            return self.finish()
        finally:
            self.logger.close()

    def finish(self) -> dict:
        summary = run_metrics.write_summary(self.workdir, self.meta, self.c.rl.algorithm,
                                            "control_end" if self.control else "rl_end")
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

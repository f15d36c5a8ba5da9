"""The mutable state of a run and its checkpoints: run counters, the device states of the current stage, the data
iterators; save, restore (resume) and starting from another run's cold start (`rl.init_from_sft`).

Checkpoint layout: `rftjax.checkpoint`. A resumed run restores counters, train states, reference / critic / best
params and both data-iterator positions, so it computes exactly what an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rftjax import optim, steps
from rftjax.build import Run, train_iterators
from rftjax.checkpoint import SFT_CHECKPOINT, Checkpointer
from rftjax.data.pipeline import iterator_state
from rftjax.models.family import vision_modules
from rftjax.rl_update import UpdateSettings, make_rl_update
from rftjax.optim import TrainState
from rftjax.sharding import shardings_of
from rftjax.trainable import combine

log = logging.getLogger("rftjax")


@dataclasses.dataclass
class StageProgress:
    """Where one stage (the cold start, or the RL stage / its SFT control) is.

    Attributes:
      step: steps taken in the stage.
      time_s: wall seconds spent in it (evaluations included).
      end_reason: why it ended: `patience` (validation loss), `max_steps` / `steps`, `max_seconds` (the stage's time
        budget), `control_sft_seconds` (the control); None while it runs.
    """

    step: int = 0
    time_s: float = 0.0
    end_reason: str | None = None


@dataclasses.dataclass
class Counters:
    """Where a run is; the checkpoint's `meta` holds them (`as_meta`) and a resumed run starts from them.

    Attributes:
      stage: `sft`, `rl` (the RL stage or the SFT control) or `done`.
      global_step: steps taken in all.
      sft, rl: the cold start's and the RL stage's (or control's) `StageProgress`.
      best_val_loss, best_step, bad_evals: the cold start's early stopping (best validation loss, the global
        step it was reached at, evaluations since without improvement).
      updates_skipped_nonfinite: RL steps whose rollouts had a non-finite reward (not trained on).
    """

    stage: str = "sft"
    global_step: int = 0
    sft: StageProgress = dataclasses.field(default_factory=StageProgress)
    rl: StageProgress = dataclasses.field(default_factory=StageProgress)
    best_val_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    updates_skipped_nonfinite: int = 0

    STAGES = ("sft", "rl")

    def as_meta(self) -> dict:
        """A flat dict of the counters (a stage's fields as `{stage}_step`, `{stage}_time_s`, `{stage}_end_reason`):
        what checkpoints and summary.json hold."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.STAGES}
        for stage in self.STAGES:
            flat.update({f"{stage}_{k}": v for k, v in dataclasses.asdict(getattr(self, stage)).items()})
        return flat

    @classmethod
    def from_meta(cls, meta: dict) -> "Counters":
        """The counters in a checkpoint's `meta` (`as_meta`'s layout; other keys, and counters it lacks, are
        ignored)."""
        stages = {stage: StageProgress(**{f.name: meta[f"{stage}_{f.name}"] for f in dataclasses.fields(StageProgress)
                                          if f"{stage}_{f.name}" in meta}) for stage in cls.STAGES}
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name in meta}, **stages)


@dataclasses.dataclass
class StageState:
    """The device state of the current stage and its jitted functions.

    Attributes:
      policy: the policy's `TrainState` (of the trainable params); schedule: its learning rate by update step.
      update: `update(policy, SequenceBatch, frozen) -> (policy, metrics)`, the SFT step (cold start and control).
      rl_update: `rftjax.rl_update.make_rl_update`'s function in the RL stage, else None.
      critic: the critic's `TrainState` (PPO); ref: the reference's trainable params (a KL term; the frozen ones
        are shared with the policy); best: the trainable params of the best validation loss in the cold start.
        None when not used.
    """

    policy: TrainState
    schedule: Callable[[int], Any]
    update: Callable | None = None
    rl_update: Callable | None = None
    critic: TrainState | None = None
    ref: Any = None
    best: Any = None


class RunState:
    """Counters, stage states and data iterators of one run, restored from its latest checkpoint when there is
    one (`restore`), else started from `rl.init_from_sft` when set, else fresh from `setup.params`.

    Only the trainable params (`Run.split`) have a train state, a reference copy and a place in checkpoints; the
    frozen ones (`frozen`, `{}` when everything trains) are the run's initial values, rebuilt by `build_run` on
    resume, and are passed to the jitted functions beside the train state."""

    def __init__(self, setup: Run, restore: bool = True):
        self.setup, self.c = setup, setup.config
        self.frozen = setup.split(setup.params)[1]
        self.sft_iter, self.rl_iter = train_iterators(setup)
        self.counters = Counters(stage="sft" if self.c.sft.enabled else "rl")
        self.ckpt = Checkpointer(setup.workdir, self.c.checkpoint.keep)
        self.started_from_sft: str | None = None  # the run dir of `rl.init_from_sft` when this run began there
        self.resume_log_lines = None  # the restored checkpoint's log line counts (`RunLogger` resume_lines)
        self.log_lines: Callable[[], dict] | None = None  # the logger's `line_counts`, saved in each checkpoint
        if restore and self.ckpt.latest_step() is not None:
            self.restore_latest_readable()
            log.info("resumed from step %d (stage %s)", self.counters.global_step, self.counters.stage)
        elif self.c.rl.init_from_sft:
            self.start_from_sft(self.c.rl.init_from_sft)
        else:
            self.enter_stage(setup.params)

    @property
    def control(self) -> bool:
        """Whether the RL stage is the SFT control (`rl.control_sft_seconds > 0`)."""
        return self.c.rl.control_sft_seconds > 0

    def full(self, trainable):
        """The full params of the policy (or reference) whose trainable params are `trainable`."""
        return combine(trainable, self.frozen)

    def trainable(self, params):
        """The trainable part of full `params`."""
        return self.setup.split(params)[0]

    def _train_state(self, params, lr: float, warmup: int, total: int, weight_decay: float, start_step: int = 0):
        o = self.c.optim
        schedule = optim.make_schedule(lr, total, warmup, o.lr_decay, start_step)
        vision = {name: o.vision_lr_scale for name in vision_modules(self.setup.model_config) if name in params}
        tx = optim.make_optimizer(schedule, weight_decay, o.b1, o.b2, o.grad_clip, o.grad_accum, vision)
        create = functools.partial(TrainState.create, tx=tx)
        shardings = optim.state_shardings(jax.eval_shape(create, params), shardings_of(params), self.setup.mesh)
        return jax.jit(create, out_shardings=shardings)(params), schedule

    def enter_stage(self, params):
        """Fresh states and update functions of the current stage, starting from the full `params`: the SFT
        optimizer (cold start, control, or a finished run), or the RL one with the critic and the reference it
        needs; all of them over the trainable params only."""
        c, mc, algo = self.c, self.setup.model_config, self.setup.algo
        params = self.trainable(params)
        if self.counters.stage != "rl" or self.control:
            # The control continues the cold start's schedule where it stopped, or restarts it (rl.control_schedule)
            start = self.counters.sft.step if self.control and c.rl.control_schedule == "continue" else 0
            policy, schedule = self._train_state(params, c.sft.lr, c.sft.warmup_steps, c.sft.max_steps,
                                                 c.sft.weight_decay, start)
            update = optim.make_update(functools.partial(steps.sft_loss, config=mc), shardings_of(policy), c.seed)
            self.stage = StageState(policy, schedule, update)
            return
        n_rows = c.rl.prompts_per_step * algo.group_size
        n_updates = c.rl.steps * algo.num_iterations * (n_rows // (c.rl.minibatch_size or n_rows))
        policy, schedule = self._train_state(params, c.rl.lr, c.rl.warmup_steps, n_updates, c.rl.weight_decay)
        critic = self._train_state(steps.init_critic(params, mc), c.rl.critic_lr, 0, n_updates, 0.0)[0] \
            if algo.uses_critic else None
        rl_update = make_rl_update(UpdateSettings.of(c, mc, algo), shardings_of(policy), shardings_of(critic))
        self.stage = StageState(policy, schedule, rl_update=rl_update, critic=critic,
                                ref=jax.tree.map(jnp.copy, params) if algo.uses_reference else None)

    def finish_stage(self, params, next_stage: str):
        """Move to `next_stage` from `params`: its fresh states, or for `done` the policy's state alone."""
        self.counters.stage = next_stage
        if next_stage == "done":  # nothing left to train: no reference, critic or best params to keep
            self.stage = StageState(self.stage.policy.replace(params=self.trainable(params)), self.stage.schedule)
        else:
            self.enter_stage(params)

    def _ckpt_state(self) -> dict:
        s = self.stage
        return {"policy": s.policy, "ref": {} if s.ref is None else s.ref,
                "critic": {} if s.critic is None else s.critic, "best": {} if s.best is None else s.best}

    def _set_iterator_states(self, data: dict):
        """Resume both data pipelines at the positions `save` wrote."""
        if self.sft_iter is not None:
            self.sft_iter.set_state(data["sft"])
        self.rl_iter.set_state(data["rl"])

    def save(self, ckpt: Checkpointer | None = None, state=None):
        """Checkpoint at the global step: the stage's states (or `state`), iterator positions, counters, config."""
        data = {"sft": None if self.sft_iter is None else iterator_state(self.sft_iter),
                "rl": iterator_state(self.rl_iter)}
        self._check_same_positions(data)
        meta = {**self.counters.as_meta(), "has_best": self.stage.best is not None,
                "config": self.c.to_json(), "key_data": np.asarray(jax.random.key_data(self.setup.key)).tolist(),
                "log_lines": None if self.log_lines is None else self.log_lines()}
        (ckpt or self.ckpt).save(self.counters.global_step, self._ckpt_state() if state is None else state, data, meta)

    def _check_same_positions(self, data: dict) -> None:
        """With several processes the checkpoint keeps process 0's iterator positions (orbax writes JSON items from
        the primary process) for all of them: check that every process is at the same position of its shard.

        Raises:
          RuntimeError: the positions differ (the processes would resume at different batches).
        """
        if jax.process_count() == 1:
            return
        digest = zlib.crc32(json.dumps(data, sort_keys=True).encode())
        digests = self.setup.place.gather(np.asarray([digest], np.int64))
        if len(set(digests.tolist())) > 1:
            raise RuntimeError(f"the data iterators of the processes are at different positions ({data} here): a "
                               f"checkpoint would resume them at different batches")

    def restore_latest_readable(self) -> int:
        """Restore the latest checkpoint that can be read, newest first: a corrupt or truncated one (a disk error,
        a copy cut short) is skipped with a warning. Returns its step.

        Raises:
          RuntimeError: no checkpoint can be read (each one's error is listed).
        """
        errors = []
        for step in reversed(self.ckpt.all_steps()):
            try:
                self.restore(step)
                if errors:
                    log.warning("resuming from step %d instead: %s", step, "; ".join(errors))
                return step
            except Exception as e:  # noqa: BLE001 - an unreadable checkpoint: try the one before
                errors.append(f"checkpoint {step} in {self.ckpt.directory} cannot be restored "
                              f"({type(e).__name__}: {str(e)[:300]})")
                log.warning(errors[-1])
        raise RuntimeError("no checkpoint can be restored: " + "; ".join(errors) + "; move checkpoints/ away to "
                           "start afresh")

    def restore(self, step: int):
        meta = self.ckpt.read_meta(step)
        self.counters = Counters.from_meta(meta)
        self.resume_log_lines = meta.get("log_lines")
        if self.counters.stage == "done":  # nothing left to train: the params are all a finished run needs
            self.enter_stage(self.full(self.ckpt.restore_params(step, self.trainable(self.setup.params))))
            return
        self.enter_stage(self.setup.params)
        if meta.get("has_best"):
            self.stage.best = self.trainable(self.setup.params)
        state, data, _ = self.ckpt.restore(step, self._ckpt_state())
        self.stage = dataclasses.replace(self.stage, policy=state["policy"], ref=state["ref"] or None,
                                         critic=state["critic"] or None, best=state["best"] or None)
        self._set_iterator_states(data)

    def start_from_sft(self, run_dir: str):
        """Begin at another run's cold-start result: its `sft_checkpoint/` (the trainer copies its `sft_end`
        evaluations: `rftjax.metrics.copy_evals`)."""
        src = Checkpointer(run_dir, subdir=SFT_CHECKPOINT)
        step = src.latest_step()
        if step is None:
            raise ValueError(f"bad config: rl.init_from_sft={run_dir!r} has no {SFT_CHECKPOINT}/ (run its SFT stage)")
        self.counters = dataclasses.replace(Counters.from_meta(src.read_meta(step)), stage="rl")
        self.started_from_sft = run_dir
        state, data, _ = src.restore(step, {"params": self.trainable(self.setup.params)})
        self.enter_stage(self.full(state["params"]))  # fresh RL optimizer; reference = the cold-start result
        self._set_iterator_states(data)
        log.info("starting from the cold start of %s (step %d)", run_dir, self.counters.global_step)

"""Orbax checkpoints of a whole run: train state(s), data-iterator states, stage counters and the PRNG key.

One `CheckpointManager` under `WORKDIR/checkpoints`, items:
  state  the arrays: {"policy": TrainState, "ref": reference params or {}, "critic": TrainState or {},
         "best": the best params of the SFT early stopping or {}}
  data   JSON: the grain iterator states (`get_state()`), {"sft": ..., "rl": ...}
  meta   JSON: the run counters (`rftjax.state.Counters`), `has_best`, the PRNG key data, the config as JSON
A run resumes from the latest step; saving is synchronous (a SIGTERM handler can save then exit). Orbax writes
each checkpoint into a temporary directory and commits it by renaming, so a process killed mid-write leaves the
previous checkpoint as the latest (the temporary one is removed when the manager is next opened); a save that
fails (a full disk) raises a RuntimeError that says so; `RunState` falls back to an older checkpoint when the
latest cannot be restored.
The cold-start result of a run is kept apart under `WORKDIR/sft_checkpoint` (`SFT_CHECKPOINT`), with
state {"params": params}, for RL ablations that start from it (`rl.init_from_sft`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from rftjax import faults


SFT_CHECKPOINT = "sft_checkpoint"  # subdir of the cold-start result, kept for RL ablations (rl.init_from_sft)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` (keeps the last `max_to_keep` checkpoints)."""

    def __init__(self, workdir: str, max_to_keep: int = 2, subdir: str = "checkpoints"):
        self.directory = os.path.join(os.path.abspath(workdir), subdir)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The committed checkpoint steps, ascending."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data: dict, meta: dict) -> None:
        """Save `step`, replacing an existing checkpoint of the same step (e.g. the end of a stage).

        Raises:
          RuntimeError: the write failed (a full disk, a lost mount): says which checkpoint is still the latest.
        """
        if step in self.manager.all_steps():
            self.manager.delete(step)
        faults.kill_when_written(self.directory)
        faults.fill_disk()
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta)))
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - re-raised with what it means for the run
            kept = [s for s in self.all_steps() if s != step]
            raise RuntimeError(
                f"saving checkpoint step {step} in {self.directory} failed: {type(e).__name__}: {e}. The "
                f"checkpoint of step {kept[-1] if kept else None} is untouched: free disk space (or fix the "
                f"mount) and rerun the same command to resume from it") from e

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict, dict]:
        """`(state, data, meta)` of `step`; `target_state` (arrays or ShapeDtypeStructs with shardings) gives
        the structure, dtypes and shardings to restore into."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 data=ocp.args.JsonRestore(),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

    def read_meta(self, step: int) -> dict:
        """Only the `meta` item of `step` (to know which states to build before restoring them)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_params(self, step: int, target_params: Any, path: tuple[str, ...] = ("policy", "params")) -> Any:
        """Only the params at `path` of the `state` item of `step` (orbax partial restore: optimizer states and
        the other trees are not read), into the structure, dtypes and shardings of `target_params`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_params)
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                                   dtype=x.dtype), abstract)
        for key in reversed(path):
            abstract, restore_args = {key: abstract}, {key: restore_args}
        reader = ocp.CheckpointManager(self.directory, item_names=("state",),
                                       item_handlers={"state": ocp.PyTreeCheckpointHandler()})
        state = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            abstract, restore_args=restore_args, partial_restore=True)))["state"]
        for key in path:
            state = state[key]
        return state

    def close(self) -> None:
        self.manager.close()

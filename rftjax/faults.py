"""Fault injection for the failure-handling tests: `RFTJAX_FAULT=POINT:N` makes this process fail the Nth time
(default 1) the run reaches POINT, as a preempted VM, the OOM killer or a full disk would. Unset (the default),
every call here does nothing.

POINTS:
  rollout           SIGKILL after an RL step's rollouts are collected, before its update
  update            SIGKILL after an RL update, before the step is logged and checkpointed
  eval              SIGKILL inside an evaluation, after its first split
  checkpoint_write  SIGKILL while orbax writes a checkpoint (a watcher thread kills the process as soon as the
                    checkpoint's temporary directory appears, before orbax commits it by renaming)
  disk_full         from the checkpoint save on, files cannot grow past 4 KiB (RLIMIT_FSIZE, SIGXFSZ ignored), so
                    orbax's writes fail part way with EFBIG, as they would with ENOSPC on a full disk
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

POINTS = ("rollout", "update", "eval", "checkpoint_write", "disk_full")
_counts: collections.Counter = collections.Counter()


def armed(point: str) -> bool:
    """True (once) when `RFTJAX_FAULT` names `point` and this is its Nth arrival."""
    name, _, n = os.environ.get("RFTJAX_FAULT", "").partition(":")
    if name != point:
        return False
    if point not in POINTS:
        raise ValueError(f"RFTJAX_FAULT={name!r}: choose one of {POINTS}")
    _counts[point] += 1
    return _counts[point] == int(n or 1)


def reached(point: str) -> None:
    """SIGKILL this process if `point` is armed (`rollout`, `update`, `eval`)."""
    if armed(point):
        os.kill(os.getpid(), signal.SIGKILL)


def kill_when_written(directory: str) -> None:
    """If `checkpoint_write` is armed: a thread that SIGKILLs this process as soon as an orbax temporary
    checkpoint directory appears in `directory` (the write has begun and is not committed)."""
    if not armed("checkpoint_write"):
        return

    def watch():
        while True:
            if any(".orbax-checkpoint-tmp" in name for name in os.listdir(directory)):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()


def fill_disk() -> None:
    """If `disk_full` is armed: from now on no file of this process grows past 4 KiB (writes fail with EFBIG)."""
    if armed("disk_full"):
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_by_path(target, dotted_key: str, value) -> None:
    """`set_by_path(cfg, "a.b.c", v)` does `cfg["a"]["b"]["c"] = v` (dicts and ConfigDicts alike)."""
    *parents, last = dotted_key.split(".")
    for p in parents:
        target = target[p]
    target[last] = value


LONG_WORDS = (20, 45, 90, 300)  # rows 0, 4, 8, ... get this many extra words: some fit, some exceed by various amounts
QUESTION = "How many red cubes are there?"


def write_easyr1(path: str, n: int, rng: np.random.Generator, long_every: int = 0) -> str:
    """An EasyR1 jsonl of `n` rows (`<image>` first in `problem`, a digit answer, `images: [png]`) with images of
    random size and aspect ratio written next to it; every `long_every`-th row gets `LONG_WORDS` extra words."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = []
    for i in range(n):
        h, w = int(rng.integers(40, 140)), int(rng.integers(40, 140))
        name = f"{os.path.basename(path)}.{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(os.path.dirname(path), name))
        extra = " red" * LONG_WORDS[(i // long_every) % len(LONG_WORDS)] if long_every and i % long_every == 0 else ""
        rows.append({"problem": f"<image>{QUESTION}{extra}", "answer": str(int(rng.integers(0, 10))), "images": [name]})
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def smoke_cli(workdir: str, *extra: str) -> list[str]:
    """`python -m rftjax.train` on configs/smoke.py with a checkpoint every step and 4 RL steps (10 steps in all)."""
    return [sys.executable, "-m", "rftjax.train", "--config", os.path.join(ROOT, "configs", "smoke.py"),
            "--workdir", workdir, "--config.checkpoint.every=1", "--config.rl.steps=4", *extra]


def strip_timings(rows: list[dict]) -> list[dict]:
    """Metric records without their wall-time fields."""
    from rftjax.metrics import is_measured

    return [{k: v for k, v in r.items() if not is_measured(k)} for r in rows]


def wait_for_step(workdir: str, step: int, procs, timeout: float = 600) -> int:
    """Wait until `workdir/metrics.jsonl` reaches `step` (returns the last logged step); AssertionError when one of
    the processes `procs` exits first (with its output when piped) or after `timeout` seconds."""
    path = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        for p in procs:
            if p.poll() is not None:
                out = p.stdout.read()[-3000:] if p.stdout else ""
                raise AssertionError(f"a trainer exited early with {p.returncode}: {out}")
        time.sleep(0.05)
    raise AssertionError(f"timeout waiting for step {step} in {path}")

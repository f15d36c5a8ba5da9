"""Reward scoring over worker processes: 64 slow completions with 1, 2, 4 (and 8) workers vs in this process.

    python experiments/bench_rewards.py      # prints a table, writes experiments/results/bench_rewards.{md,json}

Three workloads per completion: a user reward function that waits 0.1 s (I/O-bound, e.g. a sandbox call), one
that does a fixed amount of pure-Python work (CPU-bound, ~0.1 s on one core), and math-verify on a tower of powers (`10^{10^{10^{10}}}`), which
takes math-verify's own 5 s alarm in this process and is cut at the 1 s limit by the workers. Each figure is the
wall time of one `RewardScorer.score` call on 64 completions, after the pool has started (the first call,
timed separately, includes starting the forkserver and the workers). The ideal is serial time / workers: the
CPU-bound rows cannot beat the machine's core count (printed).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rftjax.rewards import RewardConfig, RewardScorer  # noqa: E402
from roofline import cpu_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
N = 64
FUNCTIONS = os.path.join(HERE, "rewards", "slow_rewards.py")


def timed(scorer, texts, golds, kinds):
    t0 = time.perf_counter()
    out = scorer.score(texts, golds, kinds)
    return time.perf_counter() - t0, out


def main():
    workloads = {
        "wait 0.1 s (I/O-bound user function)": (dict(function=f"{FUNCTIONS}:sleeps"), ["x"] * N, ["1"] * N),
        "fixed work ~0.1 s (CPU-bound user function)": (dict(function=f"{FUNCTIONS}:computes"), ["x"] * N, ["1"] * N),
        "math-verify on 10^{10^{10^{10}}} (1 s limit)": (
            dict(), ["<think>t</think><answer>10^{10^{10^{10}}}</answer>"] * N, ["5"] * N)}
    rows = []
    for name, (kw, texts, golds) in workloads.items():
        kinds = ["math"] * N
        if "math-verify" in name:  # 64 x 5 s in this process would take 5 minutes: time 4 and scale
            serial, _ = timed(RewardScorer(RewardConfig(**kw)), texts[:4], golds[:4], kinds[:4])
            serial *= N / 4
        else:
            serial, _ = timed(RewardScorer(RewardConfig(**kw)), texts, golds, kinds)
        row = {"workload": name, "in_process_s": serial}
        for workers in (1, 2, 4, 8):
            scorer = RewardScorer(RewardConfig(num_workers=workers, timeout_s=1.0, **kw))
            first, _ = timed(scorer, texts[:workers], golds[:workers], kinds[:workers])
            wall, out = timed(scorer, texts, golds, kinds)
            scorer.close()
            row[f"workers_{workers}_s"] = wall
            row[f"workers_{workers}_timeouts"] = int(out["timeout"].sum())
            row[f"workers_{workers}_start_s"] = first
        rows.append(row)
        print(row, flush=True)
    header = (f"CPU: {cpu_model()}, {os.cpu_count()} cores; {N} completions per call; seconds of wall time "
              f"(x: speed-up over 1 worker; ideal = workers, bounded by the cores for CPU-bound work)")
    lines = [header, "", "| workload | in process | 1 worker | 2 workers | 4 workers | 8 workers | timeouts (4 workers) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        one = r["workers_1_s"]
        cells = [f"{r[f'workers_{w}_s']:.2f} ({one / r[f'workers_{w}_s']:.1f}x)" for w in (1, 2, 4, 8)]
        lines.append(f"| {r['workload']} | {r['in_process_s']:.2f} | " + " | ".join(cells) +
                     f" | {r['workers_4_timeouts']} |")
    lines += ["", "First call of a fresh pool (forkserver and workers starting), seconds: " + ", ".join(
        f"{r['workload'].split(' (')[0]}: " + "/".join(f"{r[f'workers_{w}_start_s']:.1f}" for w in (1, 2, 4, 8))
        for r in rows)]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "bench_rewards.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(HERE, "results", "bench_rewards.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""Where a run's wall time went: the cold start's s/step, the RL step split (rollout generation / reward scoring /
update / the rest: sampling-side host work, logging, checkpoints), evaluations, and the whole run, read from run
directories (metrics.jsonl or metrics.jsonl.gz, eval.jsonl, summary.json), side by side.

    python experiments/time_split.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--out experiments/results/NAME.md]

The whole run is `sft_time_s + rl_time_s` of summary.json (both include the stage's evaluations and checkpoints;
process start-up and compilation before the first step are not in them: see the README for wall-clock times).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex

import numpy as np

from rftjax.metrics import read_jsonl


def split(run: str, rl_steps: int = 0) -> dict:
    """The timing figures of one run directory (seconds; per-step figures are means over the stage's steps after
    the first, which includes compilation; of the first `rl_steps` RL steps only, when > 0: e.g. the part of a run
    that had the machine to itself)."""
    metrics = os.path.join(run, "metrics.jsonl")
    rows = read_jsonl(metrics + ".gz" if os.path.exists(metrics + ".gz") else metrics)  # .gz: as kept in results/
    evals = read_jsonl(os.path.join(run, "eval.jsonl"))
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    sft = [r for r in rows if r["stage"] == "sft"][1:]
    rl = [r for r in rows if r["stage"] == "rl"][1:rl_steps or None]

    def mean(rs, key):
        return float(np.mean([r.get(key, 0.0) for r in rs])) if rs else 0.0

    out = {"sft_steps": summary["sft_steps"], "sft_s_per_step": mean(sft, "time_per_step_s"),
           "sft_time_s": summary["sft_time_s"], "rl_steps": summary["rl_steps"], "rl_time_s": summary["rl_time_s"],
           "rollout_s": mean(rl, "rollout_time_s"), "reward_s": mean(rl, "reward_time_s"),
           "update_s": mean(rl, "update_time_s"), "rollout_rounds": mean(rl, "rollout_rounds"),
           "completion_len": mean(rl, "completion_len_mean"),
           "eval_s": float(sum(e.get("eval_time_s", 0.0) for e in evals)),
           "rl_eval_s": float(sum(e.get("eval_time_s", 0.0) for e in evals if e["stage"] != "sft_end")),
           "total_s": summary["sft_time_s"] + summary["rl_time_s"],
           "test": summary.get("test_accuracy_final"), "ood": summary.get("ood_accuracy_final"),
           "test_sft": summary.get("test_accuracy_after_sft"), "ood_sft": summary.get("ood_accuracy_after_sft")}
    out["rl_s_per_step"] = mean(rl, "time_per_step_s")  # rollout + reward + update of the steps measured
    out["rl_other_s"] = ((out["rl_time_s"] - out["rl_eval_s"]) / max(out["rl_steps"], 1) - out["rl_s_per_step"]
                         if not rl_steps else float("nan"))
    return out


def table(runs: dict[str, dict]) -> str:
    """A markdown table, one column per run."""
    fields = [("cold start: steps", "sft_steps", "d"), ("cold start: s/step", "sft_s_per_step", ".2f"),
              ("cold start: minutes (with its evaluations)", "sft_time_s", "min"),
              ("RL: steps", "rl_steps", "d"), ("RL step: s (rollout + reward + update)", "rl_s_per_step", ".2f"),
              ("- rollout generation s", "rollout_s", ".2f"), ("- reward scoring s", "reward_s", ".2f"),
              ("- update s", "update_s", ".2f"),
              ("RL step: other s (host work, logging, checkpoints; all steps)", "rl_other_s", ".2f"),
              ("RL: generation rounds per step", "rollout_rounds", ".2f"),
              ("RL: mean completion tokens", "completion_len", ".1f"),
              ("evaluations: minutes (all stages)", "eval_s", "min"),
              ("RL stage: minutes (with its evaluations)", "rl_time_s", "min"),
              ("whole run: minutes (sft_time_s + rl_time_s)", "total_s", "min"),
              ("test accuracy: cold start -> final", ("test_sft", "test"), "pct"),
              ("OOD accuracy: cold start -> final", ("ood_sft", "ood"), "pct")]

    def cell(r, key, spec):
        if spec == "pct":
            a, b = (r[k] for k in key)
            return "-" if a is None or b is None else f"{100 * a:.1f}% -> {100 * b:.1f}%"
        if spec == "min":
            return f"{r[key] / 60:.1f}"
        return format(r[key], spec)

    lines = ["| | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {label} | " + " | ".join(cell(r, key, spec) for r in runs.values()) + " |"
              for label, key, spec in fields]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR[:RL_STEPS] (RL_STEPS: per-step figures of the first RL "
                                            "steps only)")
    ap.add_argument("--out", default="", help="also write the table (.md) and the figures (.json) here")
    args = ap.parse_args()
    runs = {}
    for arg in args.runs:
        name, spec = arg.split("=", 1)
        path, _, steps = spec.partition(":")
        runs[name] = split(path, int(steps or 0))
    text = table(runs)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"`python experiments/time_split.py {shlex.join(args.runs)}`\n\n{text}\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()

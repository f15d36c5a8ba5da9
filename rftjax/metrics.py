"""Run outputs: metrics.jsonl, eval.jsonl, samples.jsonl, TensorBoard events, PNG plots, summary.json.

Every logged step is one JSON object with at least `step` (the global step), `stage` (`sft` / `rl`),
and for RL `reward_mean` and `accuracy`. On resume the files are cut back to the lines they had when the restored
checkpoint was saved (its meta's `log_lines`; older checkpoints: to the restored step), so a run killed and rerun
writes each record exactly once, also one killed between a checkpoint and the next (an evaluation at the end of
a stage logs at the step of the checkpoint before it).
"""

from __future__ import annotations

import gzip
import json
import math
import os
from typing import Any

import numpy as np

MEASURED_KEYS = ("time_per_step_s", "rollout_tokens_per_s", "update_time_s", "rollout_time_s", "elapsed_s",
                 "eval_time_s", "reward_time_s", "host_peak_rss_gb")


def is_measured(key: str) -> bool:
    """Whether metric `key` measures the machine rather than the run's math (wall times, host memory: different
    between two identical runs): `MEASURED_KEYS` and each reward source's seconds, `reward_time_{source}_s`."""
    return key in MEASURED_KEYS or key.startswith("reward_time_")


def _clean(v: Any):
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.item() if np.ndim(v) == 0 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _truncate_jsonl(path: str, max_step: int, max_lines: int | None = None) -> int:
    """Keep the first `max_lines` records of `path` (when given), else those with `step <= max_step`; returns how
    many are kept."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    rows = rows[:max_lines] if max_lines is not None else [r for r in rows if json.loads(r).get("step", 0) <= max_step]
    with open(path, "w") as f:
        f.writelines(rows)
    return len(rows)


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file (gzip-compressed when `path` ends in ".gz"); [] when it does not exist."""
    if not os.path.exists(path):
        return []
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return [json.loads(line) for line in f if line.strip()]


def copy_evals(src_dir: str, workdir: str, stage: str) -> None:
    """Start WORKDIR/eval.jsonl with the `stage` records of another run's eval.jsonl (process 0 writes; a run that
    begins at another's cold start shows that cold start's evaluations)."""
    import jax

    evals = [e for e in read_jsonl(os.path.join(src_dir, "eval.jsonl")) if e["stage"] == stage]
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.jsonl"), "w") as f:
            f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in evals)


class RunLogger:
    """Writes the run outputs under `workdir`. A resumed run drops the records written after its checkpoint:
    `resume_lines` (`{name: lines}`, the checkpoint's `line_counts()`) when known, else records after
    `resume_step`. `enabled` False (processes other than 0 of a multi-process run) writes nothing at all."""

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True, enabled: bool = True,
                 resume_lines: dict[str, int] | None = None):
        self.workdir, self.enabled = workdir, enabled
        self.paths = {name: os.path.join(workdir, f"{name}.jsonl") for name in ("metrics", "eval", "samples")}
        self.lines = dict.fromkeys(self.paths, 0)
        self.tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        for name, path in self.paths.items():
            self.lines[name] = _truncate_jsonl(path, resume_step, (resume_lines or {}).get(name))
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1 or None)

    def _append(self, name: str, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.paths[name], "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=True) + "\n")
        self.lines[name] += 1

    def line_counts(self) -> dict[str, int]:
        """Records written to each file so far (a checkpoint keeps them: `resume_lines`)."""
        return dict(self.lines)

    def log(self, step: int, stage: str, metrics: dict) -> None:
        """One training step's metrics (scalars)."""
        self._append("metrics", {"step": step, "stage": stage, **metrics})
        if self.tb:
            for k, v in metrics.items():
                v = _clean(v)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{stage}/{k}", v, step)

    def log_eval(self, step: int, stage: str, results: dict) -> None:
        self._append("eval", {"step": step, "stage": stage, **results})
        if self.tb:
            for k, v in results.items():
                if isinstance(_clean(v), (int, float)):
                    self.tb.add_scalar(f"eval/{k}", _clean(v), step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """A few decoded completions with their rewards."""
        self._append("samples", {"step": step, "samples": samples})
        if self.tb:
            text = "\n\n".join(f"**{s.get('answer')}** reward {s.get('reward')}: `{s.get('completion')}`"
                               for s in samples)
            self.tb.add_text("samples", text, step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def plot_curves(workdir: str) -> list[str]:
    """PNG plots of reward, accuracy, KL, completion length (RL) and eval accuracy vs step. Returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    evals = read_jsonl(os.path.join(workdir, "eval.jsonl"))
    rl_rows = [m for m in metrics if m.get("stage") == "rl"]
    sft_rows = [m for m in metrics if m.get("stage") == "sft"]
    panels = [("reward_mean", "reward", rl_rows), ("rollout_accuracy", "train accuracy (all rollouts)", rl_rows),
              ("kl_ref", "KL to reference", rl_rows), ("completion_len_mean", "completion length", rl_rows),
              ("sft_loss", "SFT loss", sft_rows), ("entropy", "entropy", rl_rows)]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (key, title, rows) in zip(axes.flat, panels):
        pts = [(m["step"], m[key]) for m in rows if m.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
    for ax, key in zip(axes.flat[len(panels):], ("accuracy", "pass_at_k")):
        for split in sorted({e.get("split") for e in evals}):
            pts = [(e["step"], e[key]) for e in evals if e.get("split") == split and e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=split)
        ax.set_title(f"eval {key}")
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, "curves.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


def plot_panels(path: str, panels: list[dict]) -> str:
    """One PNG of side-by-side line plots. Each panel is a dict: `title`, `xlabel`, `ylabel`, optional `logx`
    (log2 x axis), `series`: `{label: (x, y)}` or `{label: (x, y, lo, hi)}` (a shaded band from lo to hi, e.g.
    a confidence interval; None values are left out), and optional `hlines`: `{label: y}` (dashed reference lines).
    Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (x, y, *band) in panel["series"].items():
            (line,) = ax.plot(x, y, marker="o" if len(x) < 20 else None, ms=3, lw=1.5, label=label)
            if band and band[0] is not None:
                ax.fill_between(x, band[0], band[1], color=line.get_color(), alpha=0.2, lw=0)
        for label, y in panel.get("hlines", {}).items():
            ax.axhline(y, ls="--", lw=1, color="gray", label=label)
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def pass_at_k_panel(curves: dict[str, list[float]], title: str = "pass@k") -> dict:
    """A `plot_panels` panel of pass@k curves `{label: [pass@1, ..., pass@n]}` on a log2 k axis."""
    return {"title": title, "xlabel": "k (samples per problem)", "ylabel": "pass@k", "logx": True,
            "series": {label: (np.arange(1, len(c) + 1), c) for label, c in curves.items()}}


def write_summary(workdir: str, counters: dict, algorithm: str, end_stage: str) -> dict:
    """summary.json of a finished run: its counters (`global_step`, `sft_step`, `rl_step`, `sft_time_s`,
    `rl_time_s`, `best_val_loss`, `sft_end_reason`, `rl_end_reason`: why each stage ended, e.g. `max_seconds`),
    test / OOD accuracy and test pass@k after the cold start (`sft_end`) and at
    `end_stage` (`rl_end` or `control_end`), read back from eval.jsonl, and the test accuracy gain. Returns it."""
    evals = read_jsonl(os.path.join(workdir, "eval.jsonl"))

    def last(stage, split, key="accuracy"):
        hits = [e.get(key) for e in evals if e["stage"] == stage and e["split"] == split]
        return hits[-1] if hits else None

    summary = {"global_step": counters["global_step"], "sft_steps": counters["sft_step"],
               "rl_steps": counters["rl_step"], "sft_time_s": counters["sft_time_s"],
               "rl_time_s": counters["rl_time_s"], "best_val_loss": counters["best_val_loss"],
               "test_accuracy_after_sft": last("sft_end", "test"), "test_accuracy_final": last(end_stage, "test"),
               "ood_accuracy_after_sft": last("sft_end", "test_ood"), "ood_accuracy_final": last(end_stage, "test_ood"),
               "test_pass_at_k_after_sft": last("sft_end", "test", "pass_at_k"),
               "test_pass_at_k_final": last(end_stage, "test", "pass_at_k"), "algorithm": algorithm,
               "sft_end_reason": counters.get("sft_end_reason"), "rl_end_reason": counters.get("rl_end_reason")}
    if summary["test_accuracy_after_sft"] is not None and summary["test_accuracy_final"] is not None:
        summary["test_accuracy_gain"] = summary["test_accuracy_final"] - summary["test_accuracy_after_sft"]
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def summary_table(summary: dict) -> str:
    """A small text table of the summary (printed at the end of a run)."""
    lines = ["", f"{'metric':<40} value", "-" * 56]
    for k, v in summary.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                lines.append(f"{k + '.' + kk:<40} {vv:.4f}" if isinstance(vv, float) else f"{k + '.' + kk:<40} {vv}")
        else:
            lines.append(f"{k:<40} {v:.4f}" if isinstance(v, float) else f"{k:<40} {v}")
    return "\n".join(lines)

"""A study's results: per-run values read from the run directories, their aggregation over seeds with confidence
intervals (`summarize`), and the report: sweep_results.md / .json and sweep_curves.png (`write_report`)."""

from __future__ import annotations

import json
import os

import numpy as np

from rftjax.studies.stats import CONFIDENCE, band, curve_band, difference, mean_ci, paired_gains

COLD_START, CONTROL = "cold_start", "control"


def read_run(run_dir: str) -> tuple[dict, list[dict]]:
    """`(summary.json, eval.jsonl records)` of a run directory (`({}, [])` for a missing one)."""
    from rftjax.metrics import read_jsonl

    path = os.path.join(run_dir, "summary.json")
    summary = json.load(open(path)) if os.path.exists(path) else {}
    return summary, read_jsonl(os.path.join(run_dir, "eval.jsonl"))


def _last(evals: list[dict], stage: str, split: str) -> dict:
    hits = [e for e in evals if e["stage"] == stage and e["split"] == split]
    return hits[-1] if hits else {}


def _end_stage(kind: str) -> str:
    return {COLD_START: "sft_end", CONTROL: "control_end"}.get(kind, "rl_end")


def run_values(run_dir: str, kind: str) -> dict:
    """The per-run numbers the results aggregate: `test`, `ood` (greedy accuracy at the run's end: `sft_end` for a
    cold start, `control_end`, else `rl_end`), `pass_at_1`, `pass_at_k` (test, sampled), `pass_curve` (test
    pass@1..n), `rl_steps`, `rl_minutes`, `curve` (`{split: [(rl_step, accuracy)]}` over the RL stage's
    evaluations, the cold start's at step 0). Missing values are None."""
    summary, evals = read_run(run_dir)
    end = _end_stage(kind)
    test, ood = _last(evals, end, "test"), _last(evals, end, "test_ood")
    start = _last(evals, "sft_end", "test").get("step", 0)
    curve = {split: [(e["step"] - start, e["accuracy"]) for e in evals
                     if e["split"] == split and e["stage"] in ("sft_end", "rl", end)] for split in ("test", "test_ood")}
    return {"test": test.get("accuracy"), "ood": ood.get("accuracy"), "pass_at_1": test.get("pass_at_1"),
            "pass_at_k": test.get("pass_at_k"), "pass_n": test.get("pass_n"), "pass_curve": test.get("pass_at_k_curve"),
            "rl_steps": summary.get("rl_steps") if kind != COLD_START else 0,
            "rl_minutes": summary["rl_time_s"] / 60 if kind != COLD_START and summary else None,
            "curve": curve}


METRICS = (("test", "test acc"), ("ood", "OOD acc"), ("test_gain_vs_cold", "test gain vs cold start"),
           ("ood_gain_vs_cold", "OOD gain vs cold start"), ("test_gain_vs_control", "test gain vs control"),
           ("ood_gain_vs_control", "OOD gain vs control"), ("pass_at_1", "pass@1"), ("pass_at_k", "pass@k"))


def summarize(workdir: str, arms: list, seeds: list[int], control: bool) -> dict:
    """Aggregate the sweep's runs. For the cold start, each arm and the control: per metric the per-seed values
    and their mean with a 95% t-interval (`mean_ci`, scipy.stats) over the seeds that finished. Gains are paired
    by seed: an arm's test / OOD accuracy minus its own cold start's (`*_gain_vs_cold`) and minus the same seed's
    control (`*_gain_vs_control`), then averaged with their interval. Arms are ranked by mean test accuracy.

    Returns `{"rows": [{"name", "kind", "seeds" (sorted: the order of every `values` list), "metrics": {name:
    mean_ci}, "rl_steps", "rl_minutes", "pass_curve", "curve"}], "ranking": [arm names], "pass_n",
    "confidence"}`; `curve` is `{split: {"steps",
    "mean", "lo", "hi"}}`, the accuracy gain over the seed's cold start per RL step (paired, over the seeds evaluated
    there), `pass_curve` `{"mean", "lo", "hi"}`.
    """
    rows = []
    groups = [(COLD_START, COLD_START)] + [(a.name, "arm") for a in arms] + ([(CONTROL, CONTROL)] if control else [])
    values = {name: {s: run_values(os.path.join(workdir, name, f"seed{s}"), kind) for s in seeds}
              for name, kind in groups}
    cold, ctrl = values[COLD_START], values.get(CONTROL, {})
    pass_n = None
    for name, kind in groups:
        per_seed = {s: values[name][s] for s in sorted(values[name]) if values[name][s]["test"] is not None}
        metrics = {}
        for key in ("test", "ood", "pass_at_1", "pass_at_k"):
            metrics[key] = mean_ci([v[key] for v in per_seed.values()])
        for split in ("test", "ood"):  # paired by seed; none for a run against itself
            metrics[f"{split}_gain_vs_cold"] = mean_ci(
                [difference(v[split], cold[s][split]) for s, v in per_seed.items()] if kind != COLD_START else [])
            metrics[f"{split}_gain_vs_control"] = mean_ci(
                [difference(v[split], ctrl[s][split]) for s, v in per_seed.items()] if control and kind == "arm" else [])
        pass_n = pass_n or next((v["pass_n"] for v in per_seed.values() if v["pass_n"]), None)
        rows.append({"name": name, "kind": kind, "seeds": sorted(per_seed),
                     "metrics": metrics, "rl_steps": mean_ci([v["rl_steps"] for v in per_seed.values()]),
                     "rl_minutes": mean_ci([v["rl_minutes"] for v in per_seed.values()]),
                     "pass_curve": band([v["pass_curve"] for v in per_seed.values() if v["pass_curve"]]),
                     "curve": {split: curve_band([paired_gains(v["curve"][split]) for v in per_seed.values()])
                               for split in ("test", "test_ood")}})
    ranked = sorted((r for r in rows if r["kind"] == "arm" and r["metrics"]["test"]["mean"] is not None),
                    key=lambda r: -r["metrics"]["test"]["mean"])
    return {"rows": rows, "ranking": [r["name"] for r in ranked], "pass_n": pass_n, "confidence": CONFIDENCE,
            "seeds": seeds}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(ci: dict, signed: bool = False) -> str:
    """`mean [lo, hi]` in percentage points (`-` without values; the mean alone for one seed). An accuracy's
    interval (`signed` False: not a difference) is shown clipped to [0, 100] (the JSON keeps it as computed)."""
    if ci["mean"] is None:
        return "-"
    mean = f"{100 * ci['mean']:+.1f}" if signed else f"{100 * ci['mean']:.1f}"
    if ci["lo"] is None:
        return mean
    lo, hi = (ci["lo"], ci["hi"]) if signed else (max(ci["lo"], 0.0), min(ci["hi"], 1.0))
    return f"{mean} [{100 * lo:.1f}, {100 * hi:.1f}]"


def results_markdown(results: dict) -> str:
    """sweep_results.md: the table (one row per cold start / arm / control, arms in rank order) and how to read
    it."""
    conf = int(100 * results["confidence"])
    k = results.get("pass_n") or "k"
    head = ["rank", "run", "seeds"] + [label.replace("pass@k", f"pass@{k}") for _, label in METRICS] + \
        ["RL steps", "RL min"]
    order = {name: i for i, name in enumerate(results["ranking"])}
    place = {COLD_START: -1, CONTROL: len(order)}  # cold start first, the arms by rank, the control last
    rows = sorted(results["rows"], key=lambda r: place.get(r["kind"], order.get(r["name"], len(order))))
    lines = [f"# Sweep results ({len(results['seeds'])} seeds: {results['seeds']})", "",
             f"Accuracy in %, mean over seeds with its {conf}% t-interval in brackets (scipy.stats.t; one seed: the "
             f"value alone; accuracies' intervals clipped to [0, 100]). Gains are paired by seed, in points. "
             f"pass@1 / pass@{k}: sampled at temperature 1, unbiased estimator over {k} samples per test problem.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["metrics"]
        rank = str(order[r["name"]] + 1) if r["name"] in order else ""
        cells = [rank, r["name"], str(len(r["seeds"]))]
        cells += [_cell(m[key], signed="gain" in key) for key, _ in METRICS]
        steps, minutes = r["rl_steps"]["mean"], r["rl_minutes"]["mean"]
        cells += ["-" if steps is None else f"{steps:.0f}", "-" if minutes is None else f"{minutes:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(workdir: str, results: dict) -> list[str]:
    """sweep_results.json, sweep_results.md and sweep_curves.png in `workdir`; returns their paths."""
    from rftjax.metrics import plot_panels

    paths = [os.path.join(workdir, f"sweep_results.{ext}") for ext in ("json", "md")] + \
        [os.path.join(workdir, "sweep_curves.png")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(results_markdown(results))
    panels = [{"title": f"{title} accuracy gain over the cold start (mean, {int(100 * results['confidence'])}% "
                        f"interval)", "xlabel": "RL step", "ylabel": "accuracy - cold start's (paired by seed)",
               "series": {r["name"]: (c["steps"], c["mean"], *_band_or_none(c))
                          for r in results["rows"] if r["kind"] == "arm"
                          for c in [r["curve"][split]] if c["steps"]},
               "hlines": {f"control (mean, after {r['rl_steps']['mean']:.0f} SFT steps)":
                          r["metrics"][f"{key}_gain_vs_cold"]["mean"] for r in results["rows"]
                          if r["kind"] == CONTROL and r["metrics"][f"{key}_gain_vs_cold"]["mean"] is not None}}
              for split, key, title in (("test", "test", "test"), ("test_ood", "ood", "OOD"))]
    panels.append({"title": f"test pass@k (k <= {results.get('pass_n')}, mean over seeds)", "xlabel": "k",
                   "ylabel": "pass@k", "logx": True,
                   "series": {r["name"]: (np.arange(1, len(p["mean"]) + 1), p["mean"], *_band_or_none(p, clip=True))
                              for r in results["rows"] for p in [r["pass_curve"]] if p}})
    plot_panels(paths[2], panels)
    return paths


def _band_or_none(c: dict, clip: bool = False) -> tuple:
    """`(lo, hi)` of a band with NaN where a point has no interval, or `(None, None)` when no point has one;
    pass@k bands (`clip`) are clipped to [0, 1]."""
    if all(x is None for x in c["lo"]):
        return None, None
    lo, hi = (np.asarray([np.nan if x is None else x for x in c[key]], np.float64) for key in ("lo", "hi"))
    return (np.clip(lo, 0, 1), np.clip(hi, 0, 1)) if clip else (lo, hi)


def write_report(workdir: str, arms: list, seeds: list[int], control: bool) -> dict:
    """`summarize` the runs there are, and on process 0 write the results (`write_results`) and print the table."""
    import jax

    results = summarize(workdir, arms, seeds, control)
    if jax.process_index() == 0:
        write_results(workdir, results)
        print(results_markdown(results))
    return results

"""Where a digits run's accuracy comes from: per question kind, greedy accuracy, how often the reasoning trace
reads every digit right, per-digit reading accuracy, and whether the answer follows from the digits the trace
read (the arithmetic: sum / max / count of what it read). For the cold start (`sft_checkpoint/`) and the end
of the run, on the held-out test split.

    python experiments/digits_breakdown.py --run runs/digits [--examples 500]

Prints a table and writes experiments/results/digits_breakdown_<run name>.{md,json}. Uses the run's own config
(stored in its checkpoint; the cold start of `rl.init_from_sft` for ablations); like `python -m rftjax.evaluate`,
it builds the run with `rftjax.build.build_run` and reads only the params of its checkpoints. Answers are generated
with `rftjax.rollout.Policy.generate` and scored by `rftjax.rewards` (as the evaluation does).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re

import jax

from rftjax import configs, rewards
from rftjax.build import Run, build_run
from rftjax.checkpoint import SFT_CHECKPOINT, Checkpointer
from rftjax.data.pipeline import make_dataset
from rftjax.evaluate import latest_params
from rftjax.sampling import SamplingParams

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ANSWER = {"sum": sum, "largest": max, "count": len}


def parse(text: str) -> tuple[list[int] | None, str | None]:
    """`(digits listed in the trace or None, the extracted answer or None)` of one completion."""
    listed = re.search(r"digits?: ([\d, ]+)\.", text)
    digits = [int(x) for x in listed.group(1).split(",") if x.strip().isdigit()] if listed else None
    return digits, rewards.extract_answer(text)


def breakdown(run: Run, params, n: int) -> dict:
    """Per question kind: n, accuracy, all_read (every digit right), per_digit, consistent (answer = f(read))."""
    source, counts = run.sources["test"], collections.defaultdict(collections.Counter)
    it = iter(make_dataset(source, run.prompt_pre, batch_size=run.config.eval.batch_size, shuffle=False,
                           num_epochs=1, num_threads=1))
    index = 0
    for batch in it:
        greedy = SamplingParams(max_new_tokens=configs.eval_max_new_tokens(run.config), greedy=True)
        _, texts = run.policy(params).generate(batch, jax.random.key(0), greedy, run.place)
        for text in texts:
            if index >= n:
                break
            ex = source[index]
            index += 1
            meta = json.loads(ex["meta"])
            kind, truth = meta["question"], meta["digits"]
            read, answer = parse(text)
            s = counts[kind]
            s["n"] += 1
            s["correct"] += rewards.accuracy(answer, ex["answer"], "int") == 1.0
            if read:
                s["all_read"] += read == truth
                s["consistent"] += rewards.accuracy(answer, str(ANSWER[kind](read)), "int") == 1.0
                if len(read) == len(truth):
                    s["digits_right"] += sum(a == b for a, b in zip(read, truth))
                    s["digits"] += len(truth)
        if index >= n:
            break
    return {kind: {"n": s["n"], "accuracy": s["correct"] / s["n"], "all_read": s["all_read"] / s["n"],
                   "per_digit": s["digits_right"] / max(s["digits"], 1), "consistent": s["consistent"] / s["n"]}
            for kind, s in sorted(counts.items())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a digits run's workdir")
    ap.add_argument("--examples", type=int, default=500)
    args = ap.parse_args()
    ckpt = Checkpointer(args.run)
    if ckpt.latest_step() is None:
        raise SystemExit(f"{args.run} has no checkpoints/")
    config = configs.base_config()  # fields added since the run was saved keep their defaults
    config.update(json.loads(ckpt.read_meta(ckpt.latest_step())["config"]))
    config.log.progress = False
    run = build_run(config, args.run)
    rows = {}
    sft = Checkpointer(args.run, subdir=SFT_CHECKPOINT)
    if sft.latest_step() is None and config.rl.init_from_sft:  # an ablation started from another run's cold start
        sft = Checkpointer(config.rl.init_from_sft, subdir=SFT_CHECKPOINT)
    if sft.latest_step() is not None:
        rows["cold start"] = breakdown(run, sft.restore_params(sft.latest_step(), run.params, ("params",)),
                                       args.examples)
    params, step = latest_params(run)
    stage = ckpt.read_meta(step)["stage"]
    rows[f"end ({stage}, step {step})"] = breakdown(run, params, args.examples)
    lines = ["| params | question | n | accuracy | every digit read right | per-digit reading | answer follows "
             "from the digits read |", "|---|---|---|---|---|---|---|"]
    for name, kinds in rows.items():
        for kind, r in kinds.items():
            lines.append(f"| {name} | {kind} | {r['n']} | {r['accuracy']:.1%} | {r['all_read']:.1%} | "
                         f"{r['per_digit']:.1%} | {r['consistent']:.1%} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    name = os.path.basename(os.path.normpath(args.run))
    with open(os.path.join(RESULTS, f"digits_breakdown_{name}.md"), "w") as f:
        f.write(f"# Digits accuracy breakdown: {args.run}\n\n`python experiments/digits_breakdown.py --run "
                f"{args.run} --examples {args.examples}` (greedy, test split)\n\n{table}\n")
    with open(os.path.join(RESULTS, f"digits_breakdown_{name}.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""Evaluation: greedy accuracy and pass@k on held-out data; `python -m rftjax.evaluate` for a run's latest
checkpoint.

    python -m rftjax.evaluate --config configs/digits_grpo.py --workdir runs/digits [--config.x=y]

evaluates the latest checkpoint of the run in WORKDIR on the config's test and test_ood splits (or a user
dataset: `--config.eval.dataset=mathv:PATH` / `easyr1:PATH`), prints a table and appends to
WORKDIR/eval.jsonl with `stage="evaluate"`. With `--config.eval.pass_n=64` (samples per problem) it also writes
the unbiased pass@k curve, k = 1..64, of each split: WORKDIR/pass_at_k.json and pass_at_k.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np

from rftjax import configs, faults, rewards, trainable
from rftjax.build import EVAL_SPLITS, Run, build_run, file_source
from rftjax.checkpoint import Checkpointer
from rftjax.data.media import preview_image
from rftjax.data.pipeline import Preprocess, make_dataset
from rftjax.metrics import RunLogger, pass_at_k_panel, plot_panels
from rftjax.rollout import Policy, score_groups
from rftjax.sampling import SamplingParams
from rftjax.sharding import HOST, Placement, process_share

log = logging.getLogger("rftjax")
EVAL_STREAM = 10_000_000  # evaluations sample with fold_in(run key, EVAL_STREAM + global step)


def pass_at_k_curve(n: int, correct) -> np.ndarray:
    """Unbiased pass@k for k = 1..n from `n` samples per problem: float64 `[n]`, the mean over problems of
    `1 - C(n - c, k) / C(n, k)` (c = that problem's correct samples), the probability that k samples drawn
    without replacement from the n include a correct one.

    Source: Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1 and its numerically
    stable product form `1 - prod_{i=n-c+1}^{n} (1 - k / i)`).

    Args:
      n: samples per problem (>= 1).
      correct: int `[P]`, correct samples of each problem (0 <= c <= n).

    Raises:
      ValueError: n < 1, no problems, or a count outside [0, n].
    """
    c = np.asarray(correct, np.int64).reshape(-1)
    if n < 1 or c.size == 0 or c.min() < 0 or c.max() > n:
        raise ValueError(f"pass@k needs n >= 1 and 0 <= correct <= n for >= 1 problem, got n={n}, "
                         f"correct in [{c.min() if c.size else None}, {c.max() if c.size else None}]")
    k = np.arange(1, n + 1, dtype=np.float64)[:, None]  # [n, 1]
    i = np.arange(1, n + 1, dtype=np.float64)[None, :]  # [1, n]
    # log C(n-c, k) / C(n, k) = sum over i in (n-c, n] of log(1 - k/i); -inf (pass@k = 1) once k > n - c
    with np.errstate(divide="ignore"):
        log_terms = np.log(np.clip(1.0 - k / i, 0.0, None))  # [n, n]
    miss = np.stack([np.exp(log_terms[:, n - ci:].sum(1)) for ci in c], axis=1)  # [n, P]
    return 1.0 - miss.mean(1)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What `evaluate` measures.

    Attributes:
      batch_size: rows per generation batch (all processes together).
      max_new_tokens: the generation budget per completion.
      pass_n: samples per problem of pass@k (0: no pass@k); pass_problems: on the first this many problems.
      num_examples: problems of the greedy evaluation (None: the whole source).
    """

    batch_size: int
    max_new_tokens: int
    pass_n: int = 0
    pass_problems: int = 0
    num_examples: int | None = None

    @classmethod
    def of(cls, c, pass_n: int | None = None, num_examples: int | None = None) -> "EvalSettings":
        """The settings of run config `c` (`eval.*`; `pass_n` default `eval.pass_n`)."""
        return cls(batch_size=c.eval.batch_size, max_new_tokens=configs.eval_max_new_tokens(c),
                   pass_n=c.eval.pass_n if pass_n is None else pass_n, pass_problems=c.eval.pass_problems,
                   num_examples=num_examples)


def evaluate(policy: Policy, source, preprocess: Preprocess, settings: EvalSettings, rng,
             reward: rewards.Rewards | None = None, place: Placement = HOST) -> dict:
    """Greedy accuracy (and format rate, mean length) on `source`, plus pass@k for k = 1..`pass_n` on the first
    `pass_problems` problems: `pass_n` samples per problem at temperature 1, the unbiased estimator of
    `pass_at_k_curve` (Chen et al. 2021) over the correct counts. `reward` (default: the rules with default
    weights) must have the rules' `correct` and `format` components.

    Returns a dict: `accuracy`, `format_rate`, `completion_len_mean`, `n`, `eval_time_s`, and when pass@k is asked
    (`pass_n > 0` and `pass_problems > 0`): `pass_at_k_curve` (floats `[pass_n]`, pass@1 first), `pass_at_k`
    (pass@`pass_n`: the fraction of problems with a correct sample), `pass_at_1` (the mean sampled accuracy),
    `pass_n` and `pass_problems` (problems evaluated). The last partial batch is padded with repeats and the
    padding is not counted. With several processes each generates and scores its block of every batch
    (`batch_size` rows in all, `configs.pass_at_k_prompts` prompts for pass@k) and the scores are gathered.
    """
    reward = reward or rewards.Rewards([(rewards.RuleSource(), 1.0)])
    s = settings
    n_total = len(source) if s.num_examples is None else min(s.num_examples, len(source))
    t0 = time.perf_counter()
    correct, fmt, lengths, seen = [], [], [], 0
    it = iter(make_dataset(source, preprocess, shuffle=False, num_epochs=None, num_threads=1,
                           **process_share(s.batch_size)))
    greedy = SamplingParams(max_new_tokens=s.max_new_tokens, greedy=True)
    while seen < n_total:
        batch = next(it)
        take = min(s.batch_size, n_total - seen)
        out, texts = policy.generate(batch, rng, greedy, place)
        sc = score_groups(reward, texts, out, batch, 1)
        sc = place.gather({"correct": sc["correct"], "format": sc["format"], "lengths": out.lengths})
        correct += sc["correct"][:take].tolist()
        fmt += sc["format"][:take].tolist()
        lengths += sc["lengths"][:take].tolist()
        seen += take
    results = {"accuracy": float(np.mean(correct)), "format_rate": float(np.mean(fmt)),
               "completion_len_mean": float(np.mean(lengths)), "n": n_total}
    if s.pass_n > 0 and s.pass_problems > 0:
        problems = dataclasses.replace(s, pass_problems=min(s.pass_problems, n_total))
        counts = _correct_counts(policy, source, preprocess, problems, jax.random.fold_in(rng, 1), reward, place)
        curve = pass_at_k_curve(s.pass_n, counts)
        results.update({"pass_at_k_curve": curve.tolist(), "pass_at_k": float(curve[-1]),
                        "pass_at_1": float(curve[0]), "pass_n": s.pass_n, "pass_problems": len(counts)})
    results["eval_time_s"] = time.perf_counter() - t0
    return results


def _correct_counts(policy: Policy, source, preprocess, settings: EvalSettings, key, reward: rewards.Rewards,
                    place: Placement) -> np.ndarray:
    """Correct samples (int `[pass_problems]`) out of `pass_n` sampled at temperature 1 for each of the first
    `pass_problems` problems of `source`, `configs.pass_at_k_prompts` prompts per generation batch."""
    counts, problems = [], settings.pass_problems
    prompts_per_batch = configs.pass_at_k_prompts(settings.batch_size, settings.pass_n)
    sampled = SamplingParams(group_size=settings.pass_n, max_new_tokens=settings.max_new_tokens)
    it = iter(make_dataset(source, preprocess, shuffle=False, num_threads=1, **process_share(prompts_per_batch)))
    while len(counts) < problems:
        batch = next(it)
        take = min(prompts_per_batch, problems - len(counts))
        key, sub = jax.random.split(key)
        out, texts = policy.generate(batch, sub, sampled, place)
        sc = place.gather(score_groups(reward, texts, out, batch, settings.pass_n)["correct"])
        counts += (sc.reshape(-1, settings.pass_n) > 0).sum(1)[:take].tolist()
    return np.asarray(counts, np.int64)


def evaluate_splits(run: Run, params, logger: RunLogger, step: int, stage: str, n: int | None = None,
                    pass_n: int | None = None) -> dict:
    """`evaluate` on the run's evaluation sources (`test`, and `test_ood` when the run has one; the first `n`
    problems of each, default all; pass@k with `eval.pass_n` samples per problem unless `pass_n` is given, on
    `eval.pass_problems` problems), logged to eval.jsonl under `stage` at `step`. Returns `{split: results}`."""
    settings = EvalSettings.of(run.config, pass_n, n)
    results = {}
    for split in (s for s in EVAL_SPLITS if s in run.sources):
        r = evaluate(run.policy(params), run.sources[split], run.prompt_pre, settings,
                     jax.random.fold_in(run.key, EVAL_STREAM + step), run.rewards, run.place)
        logger.log_eval(step, stage, {"split": split, **r})
        results[split] = r
        faults.reached("eval")
    log.info("eval (%s, step %d): %s", stage, step,
             ", ".join(f"{split} acc {r['accuracy']:.3f}" for split, r in results.items()))
    return results


def greedy_samples(run: Run, params, split: str = "test", n: int = 8) -> list[dict]:
    """The first `n` problems of the run's `split` with the model's greedy completion (one process): dicts with
    `image` (uint8 `[H, W, 3]`, as the task made it; a video's first frame), `question`, `completion` (text), `answer` (the reference),
    `correct` (0/1 by the run's reward). For showing what a model writes (the Colab notebook)."""
    source = run.sources[split]
    n = min(n, len(source))
    batch = next(iter(make_dataset(source, run.prompt_pre, shuffle=False, num_epochs=None, num_threads=1,
                                   **process_share(n))))
    greedy = SamplingParams(max_new_tokens=configs.eval_max_new_tokens(run.config), greedy=True)
    out, texts = run.policy(params).generate(batch, run.key, greedy, run.place)
    correct = score_groups(run.rewards, texts, out, batch, 1)["correct"]
    rows = [source[i] for i in range(n)]
    return [{"image": preview_image(r),
             "question": r["question"], "completion": t, "answer": r["answer"], "correct": float(c)}
            for r, t, c in zip(rows, texts, correct)]


def latest_params(run: Run) -> tuple[object, int]:
    """`(params, step)` of the run's latest checkpoint (only the policy params are read).

    Raises:
      ValueError: the workdir has no checkpoint.
    """
    ckpt = Checkpointer(run.workdir)
    step = ckpt.latest_step()
    if step is None:
        raise ValueError(f"{run.workdir} has no checkpoints/: train first (python -m rftjax.train ...)")
    trained, frozen = run.split(run.params)
    return trainable.combine(ckpt.restore_params(step, trained), frozen), step


def main(config, workdir):
    run = build_run(config, workdir)
    params, step = latest_params(run)
    logger = RunLogger(run.workdir, step, config.log.tensorboard)
    try:
        if config.eval.dataset:
            c = config
            source = file_source(c.eval.dataset, "eval", run.prompt_pre, c.data.max_prompt_len)
            r = evaluate(run.policy(params), source, run.prompt_pre, EvalSettings.of(c), jax.random.key(c.seed),
                         run.rewards, run.place)
            logger.log_eval(step, "evaluate", {"split": c.eval.dataset, **r})
            print(json.dumps(r, indent=2))
        else:
            results = evaluate_splits(run, params, logger, step, "evaluate")
            write_pass_at_k(run.workdir, results, step)
    finally:
        logger.close()


def write_pass_at_k(workdir: str, results: dict[str, dict], step: int) -> list[str]:
    """WORKDIR/pass_at_k.json (`{"step", "curves": {split: [pass@1..pass@n]}}`) and pass_at_k.png from `evaluate`
    results `{split: results}` that have a `pass_at_k_curve`; returns the paths written ([] when none has one)."""
    curves = {split: r["pass_at_k_curve"] for split, r in results.items() if r.get("pass_at_k_curve")}
    if not curves or jax.process_index():
        return []
    paths = [os.path.join(workdir, "pass_at_k.json"), os.path.join(workdir, "pass_at_k.png")]
    with open(paths[0], "w") as f:
        json.dump({"step": step, "curves": curves}, f, indent=1)
    plot_panels(paths[1], [pass_at_k_panel(curves, f"pass@k at step {step} (unbiased estimator)")])
    print("pass@k " + "; ".join(f"{split}: " + ", ".join(f"k={k} {c[k - 1]:.3f}" for k in _powers_of_two(len(c)))
                                for split, c in curves.items()))
    return paths


def _powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})


if __name__ == "__main__":
    from rftjax.configs import run_cli

    run_cli(main, "run directory with checkpoints/")

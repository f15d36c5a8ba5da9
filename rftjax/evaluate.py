"""Evaluation: greedy accuracy and pass@k on held-out data; `python -m rftjax.evaluate` for a run's latest
checkpoint.

    python -m rftjax.evaluate --config configs/digits_grpo.py --workdir runs/digits [--config.x=y]

evaluates the latest checkpoint of the run in WORKDIR on the config's test and test_ood splits (or a user
dataset: `--config.eval.dataset=mathv:PATH` / `easyr1:PATH`), prints a table and appends to
WORKDIR/eval.jsonl with `stage="evaluate"`.
"""

from __future__ import annotations

import json
import logging
import time

import jax
import numpy as np

from rftjax import configs, faults, rewards, trainable
from rftjax.build import EVAL_SPLITS, Run, build_run, file_source
from rftjax.checkpoint import Checkpointer
from rftjax.data.pipeline import Preprocess, make_dataset
from rftjax.data.tokenizer import TextTokenizer
from rftjax.metrics import RunLogger
from rftjax.models import VLMConfig
from rftjax.rollout import generate_texts, score_groups
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


def evaluate(params, config: VLMConfig, tokenizer: TextTokenizer, source, preprocess: Preprocess, *,
             batch_size: int, max_new_tokens: int, rng, pass_k: int = 0, pass_n: int = 0,
             scorer: rewards.RewardScorer = rewards.RewardScorer(), place: Placement = HOST,
             num_examples: int | None = None) -> dict:
    """Greedy accuracy (and format rate, mean length) on `source`, plus pass@k (k samples at temperature 1
    on the first `pass_n` problems: solved if any sample is correct).

    Returns a dict: `accuracy`, `format_rate`, `completion_len_mean`, `n`, and `pass_at_k`, `k` if asked.
    The last partial batch is padded with repeats and the padding is not counted. With several processes each
    generates and scores its block of every batch (`batch_size` rows in all) and the scores are gathered.
    """
    n_total = len(source) if num_examples is None else min(num_examples, len(source))
    t0 = time.perf_counter()
    correct, fmt, lengths, seen = [], [], [], 0
    it = iter(make_dataset(source, preprocess, shuffle=False, num_epochs=None, num_threads=1,
                           **process_share(batch_size)))
    while seen < n_total:
        batch = next(it)
        take = min(batch_size, n_total - seen)
        out, texts = generate_texts(params, config, tokenizer, batch, rng, group_size=1,
                                    max_new_tokens=max_new_tokens, greedy=True, place=place)
        sc = scorer.score(texts, list(batch["answer"]), list(batch["answer_type"]))
        sc = place.gather({"correct": sc["correct"], "format": sc["format"], "lengths": out.lengths})
        correct += sc["correct"][:take].tolist()
        fmt += sc["format"][:take].tolist()
        lengths += sc["lengths"][:take].tolist()
        seen += take
    results = {"accuracy": float(np.mean(correct)), "format_rate": float(np.mean(fmt)),
               "completion_len_mean": float(np.mean(lengths)), "n": n_total}
    if pass_k > 0 and pass_n > 0:
        solved, seen = [], 0
        prompts_per_batch = max(1, batch_size // pass_k)
        it = iter(make_dataset(source, preprocess, shuffle=False, num_threads=1, **process_share(prompts_per_batch)))
        key = jax.random.fold_in(rng, 1)
        while seen < min(pass_n, n_total):
            batch = next(it)
            take = min(prompts_per_batch, min(pass_n, n_total) - seen)
            key, sub = jax.random.split(key)
            _, texts = generate_texts(params, config, tokenizer, batch, sub, group_size=pass_k,
                                     max_new_tokens=max_new_tokens, greedy=False, place=place)
            sc = place.gather(score_groups(texts, batch, pass_k, scorer)["correct"])
            solved += (sc.reshape(-1, pass_k).max(1) > 0)[:take].tolist()
            seen += take
        results.update({"pass_at_k": float(np.mean(solved)), "k": pass_k})
    results["eval_time_s"] = time.perf_counter() - t0
    return results


def evaluate_splits(run: Run, params, logger: RunLogger, step: int, stage: str, n: int | None = None,
                    pass_k: int | None = None) -> dict:
    """`evaluate` on the run's evaluation sources (`test`, and `test_ood` when the run has one; the first `n`
    problems of each, default all; pass@k with `eval.pass_k` unless `pass_k` is given), logged to eval.jsonl
    under `stage` at `step`. Returns `{split: results}`."""
    c = run.config
    pass_k = c.eval.pass_k if pass_k is None else pass_k
    results = {}
    for split in (s for s in EVAL_SPLITS if s in run.sources):
        r = evaluate(params, run.model_config, run.tokenizer, run.sources[split], run.prompt_pre,
                     batch_size=c.eval.batch_size, max_new_tokens=configs.eval_max_new_tokens(c),
                     rng=jax.random.fold_in(run.key, EVAL_STREAM + step), pass_k=pass_k, pass_n=c.eval.pass_n,
                     scorer=run.scorer, place=run.place, num_examples=n)
        logger.log_eval(step, stage, {"split": split, **r})
        results[split] = r
        faults.reached("eval")
    log.info("eval (%s, step %d): %s", stage, step,
             ", ".join(f"{split} acc {r['accuracy']:.3f}" for split, r in results.items()))
    return results


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
            r = evaluate(params, run.model_config, run.tokenizer, source, run.prompt_pre,
                         batch_size=c.eval.batch_size, max_new_tokens=configs.eval_max_new_tokens(c),
                         rng=jax.random.key(c.seed), pass_k=c.eval.pass_k, pass_n=c.eval.pass_n,
                         scorer=run.scorer, place=run.place)
            logger.log_eval(step, "evaluate", {"split": c.eval.dataset, **r})
            print(json.dumps(r, indent=2))
        else:
            evaluate_splits(run, params, logger, step, "evaluate")
    finally:
        logger.close()


if __name__ == "__main__":
    from rftjax.configs import run_cli

    run_cli(main, "run directory with checkpoints/")

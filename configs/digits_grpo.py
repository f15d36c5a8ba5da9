"""The main job: digits (sum / count / largest of 1-4 handwritten digits), SFT cold start then GRPO.

    python -m rftjax.train --config configs/digits_grpo.py --workdir runs/digits

A 12.5M-parameter VLM (the default preset with a 4-layer decoder) from scratch on 2 CPU cores in under 30
minutes: the cold start trains on 1,000 traced examples until the validation loss stops improving (no 2% gain in
4 evaluations, 128 steps), 560 steps or its 17-minute budget is spent (sft.max_seconds), then 100 GRPO steps (or 8
minutes: rl.max_seconds)
on answer-only problems, with DAPO's dynamic sampling: 32 prompts x 8 samples generated per step, the first 8 groups
whose rewards differ are trained on. Sum traces are running two-operand additions (up to 57 tokens; the 5-6 digit
OOD problems need up to 85, hence the longer evaluation budget).
The SFT learning rate matters: at 1e-3 the ViT's patch features grow ~100x in norm, digit identity drowns
in them and the model never learns to read digits (per-digit reading at chance, test accuracy 42% from
counting alone); at 3e-4 it reads ~95% of digits (experiments/digits_breakdown.py shows this per run). Held-out
accuracy is measured on 500 test problems whose digit images never appear in training, and on 300
out-of-distribution problems (5-6 digits; training shows at most 4).
Control run (same budget, more SFT instead of RL): add --config.rl.control_sft_seconds=SECONDS (it continues the
cold start's learning-rate schedule; --config.rl.control_schedule=restart warms up to sft.lr again).
"""

from rftjax.configs import base_config


def get_config(setting: str = ""):
    """The main job; `configs/digits_grpo.py:scarce` is issue 16's scarce-traces setting (see `scarce`)."""
    if setting not in ("", "scarce"):
        raise ValueError(f"configs/digits_grpo.py:{setting}: choose no setting or :scarce")
    c = base_config()
    c.model.preset = "default"
    # 16 px patches: one patch per digit cell of the 64 px canvas -> 16 image tokens per prompt.
    # A 4-layer decoder (the preset has 8): half the cost of every step, rollout and evaluation (issue 18: the job
    # must keep its 30 minutes on slow 2-core machines too).
    c.model.overrides.update(vision={"patch_size": 16}, text={"num_layers": 4})
    # model.dtype stays "auto": bfloat16 compute where this machine's bf16 matmul is faster (AMX, TPU, GPU), float32
    # where it is slower (CPUs without AVX-512 BF16 / AMX); the run logs the choice.
    c.data.task = "digits"
    c.data.max_prompt_len = 48
    c.data.max_completion_len = 64
    c.data.sft_examples, c.data.val_examples = 1000, 200
    c.data.test_examples, c.data.ood_examples = 500, 300
    c.sft.batch_size, c.sft.lr, c.sft.warmup_steps = 32, 3e-4, 50
    # Patience 4, not 2: the validation loss sits on a plateau near 0.3 (format and counting learnt, digits not yet
    # read) for 100-200 steps before it drops to ~0.04; with patience 2, seed 2 stopped on that plateau at step
    # 352 (test 36.6%, experiments/results/digits_seed2_premature_*).
    # max_steps 560 (the cosine schedule's length): the learning rate is down to ~20% of its peak by step 460, where
    # the 17-minute budget ends the stage on a slow 2-core machine (an unannealed stop at step ~400 of 800 cost ~5 test
    # points in issue 18's first measurement); 8-layer runs stopped by patience at 550-700 steps.
    c.sft.max_steps, c.sft.eval_every, c.sft.patience, c.sft.min_delta_rel = 560, 32, 4, 0.02
    c.rl.algorithm = "grpo"
    c.rl.algo.update(group_size=8, kl_coef=0.0)
    c.rl.dynamic_sampling, c.rl.gen_prompts_per_round = True, 32
    c.rl.steps, c.rl.prompts_per_step, c.rl.max_new_tokens = 100, 8, 64
    c.rl.lr, c.rl.warmup_steps = 2e-5, 5
    c.eval.batch_size, c.eval.pass_n, c.eval.pass_problems, c.eval.every = 100, 4, 100, 50
    c.eval.during_rl_examples = 200
    c.eval.max_new_tokens = 96  # 5-6 digit OOD sums write up to 85 tokens of running sums
    c.checkpoint.every = 50
    # Safety nets for slow machines: a stage that runs out of its budget ends early, with its evaluation
    # (summary.json says so: sft_end_reason / rl_end_reason = "max_seconds").
    c.sft.max_seconds, c.rl.max_seconds = 1020.0, 480.0
    return scarce(c) if setting == "scarce" else c


def scarce(c):
    """Scarce traces: 500 traced examples of 1-3 digits only; RL's answer-only problems and the test have 1-5
    digits (4-5 digit problems have no trace at all), OOD 6. Sums of 5 digits write up to ~78 tokens, of 6 ~92,
    hence the longer budgets; 500 examples are ~32 epochs at 500 steps, so the cold start is shorter."""
    c.data.num_digits.update(sft="1-3", rl="1-5", test="1-5", test_ood="6")
    c.data.sft_examples = 500
    c.sft.max_steps = 400
    c.rl.max_new_tokens, c.eval.max_new_tokens = 96, 112
    return c

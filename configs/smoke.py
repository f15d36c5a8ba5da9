"""The whole pipeline (SFT cold start, RL, eval, checkpoints, plots) in about a minute on a CPU, for CI.

    python -m rftjax.train --config configs/smoke.py --workdir /tmp/smoke          # GRPO
    python -m rftjax.train --config configs/smoke.py:ppo --workdir /tmp/smoke_ppo  # any algorithm preset
"""

from rftjax.configs import base_config


def get_config(algorithm: str = "grpo"):
    c = base_config()
    c.model.preset = "tiny"
    c.model.overrides.update(vision={"image_size": 48, "patch_size": 12}, text={"vocab_size": 512})
    c.model.dtype = "float32"  # the same numbers on every machine (tests compare runs against references)
    c.data.task = "digits"
    c.data.max_prompt_len = 64
    c.data.max_completion_len = 48
    c.data.sft_examples, c.data.val_examples, c.data.rl_examples = 64, 16, 256
    c.data.test_examples, c.data.ood_examples = 16, 8
    c.sft.batch_size, c.sft.max_steps, c.sft.eval_every, c.sft.warmup_steps = 8, 6, 3, 2
    c.rl.algorithm = algorithm
    c.rl.algo.group_size = 4
    c.rl.steps, c.rl.prompts_per_step, c.rl.max_new_tokens = 3, 2, 12
    if algorithm in ("dapo", "gspo"):  # also exercise mu > 1 and minibatches
        c.rl.algo.num_iterations = 2
        c.rl.minibatch_size = 4
    if algorithm == "dapo":
        c.reward.overlong_buffer_len = 4
        c.rl.gen_prompts_per_round = 4  # oversample: 4 prompts per rollout round for 2 kept
    c.eval.batch_size, c.eval.pass_n, c.eval.pass_problems, c.eval.every = 8, 2, 4, 2
    c.eval.during_rl_examples = 8
    c.log.samples_every, c.log.progress, c.log.tensorboard = 2, False, True
    c.checkpoint.every = 2
    return c

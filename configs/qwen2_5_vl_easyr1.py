"""GRPO on a pretrained Qwen2.5-VL (or Qwen2-VL / LLaVA) checkpoint with EasyR1-format dataset files.

    python -m rftjax.train --config configs/qwen2_5_vl_easyr1.py --workdir runs/geo3k \
        --config.model.checkpoint=/path/to/Qwen2.5-VL-3B-Instruct \
        --config.data.train=easyr1:/data/geometry3k/train.parquet \
        --config.data.test=easyr1:/data/geometry3k/test.parquet
    python -m rftjax.export --workdir runs/geo3k --out exported/geo3k

The model, its tokenizer and chat template come from `model.checkpoint`; rows are EasyR1's (`problem` with an
`<image>` placeholder, `answer`, `images`). There is no SFT cold start (the checkpoint is the start). Settings
follow EasyR1's Geometry3K example where they matter (GRPO, k3 KL at 1e-2 to the checkpoint, lr 1e-6, answers in
`\\boxed{}`), scaled to one host; raise `rl.prompts_per_step` and `mesh.*` on a pod.
"""

from rftjax.configs import base_config


def get_config():
    c = base_config()
    c.model.checkpoint = ""                     # required: an HF Qwen2.5-VL / Qwen2-VL / LLaVA directory
    c.model.dtype = "bfloat16"                  # Qwen-VL images: at most 1024 tokens (QwenVLConfig.max_image_tokens)
    c.data.train = ""                           # required: easyr1:PATH.(jsonl|parquet)
    c.data.test = ""                            # required: easyr1:PATH or mathv:PATH
    c.data.max_prompt_len = 1024                # rows whose prompt (with image tokens) is longer are dropped
    c.sft.enabled = False
    c.rl.algorithm = "grpo"
    c.rl.algo.group_size = 5
    c.rl.algo.kl_coef = 1e-2
    c.rl.steps = 200
    c.rl.prompts_per_step = 16
    c.rl.micro_batch_size = 4                   # rows per forward/backward pass (EasyR1's micro-batch for update)
    c.rl.lr = 1e-6
    c.rl.warmup_steps = 10
    c.rl.max_new_tokens = 1024
    c.reward.answer_format = "boxed"
    c.reward.format_weight = 0.1
    c.eval.every = 25
    c.eval.batch_size = 16
    c.eval.pass_n = 0
    c.eval.during_rl_examples = 128
    c.checkpoint.every = 25
    return c

"""GRPO on a pretrained Qwen2.5-VL (or Qwen2-VL / LLaVA) checkpoint with EasyR1-format dataset files.

    python -m rftjax.train --config configs/qwen2_5_vl_easyr1.py --workdir runs/geo3k \\
        --config.model.checkpoint=/path/to/Qwen2.5-VL-3B-Instruct \\
        --config.data.train=easyr1:/data/geometry3k/train.parquet \\
        --config.data.test=easyr1:/data/geometry3k/test.parquet
    python -m rftjax.export --workdir runs/geo3k --out exported/geo3k

The model, its tokenizer and chat template come from `model.checkpoint`; rows are EasyR1's (`problem` with an
`<image>` placeholder, `answer`, `images`). The settings are `rftjax.configs.easyr1_checkpoint_config`'s: no SFT
cold start (the checkpoint is the start), EasyR1's Geometry3K example where it matters (GRPO, k3 KL at 1e-2 to
the checkpoint, lr 1e-6, answers in `\\boxed{}`), scaled to one host; raise `rl.prompts_per_step` and `mesh.*` on
a pod.
"""

from rftjax.configs import easyr1_checkpoint_config


def get_config():
    return easyr1_checkpoint_config()

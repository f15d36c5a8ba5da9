"""GRPO on a pretrained Qwen3-VL checkpoint (Qwen/Qwen3-VL-2B/4B/8B-Instruct or -Thinking) with EasyR1-format
dataset files.

    python -m rftjax.train --config configs/qwen3_vl_easyr1.py --workdir runs/geo3k_qwen3 \\
        --config.model.checkpoint=/path/to/Qwen3-VL-4B-Instruct \\
        --config.data.train=easyr1:/data/geometry3k/train.parquet \\
        --config.data.test=easyr1:/data/geometry3k/test.parquet
    python -m rftjax.export --workdir runs/geo3k_qwen3 --out exported/geo3k_qwen3

The checkpoint's `preprocessor_config.json` sets the image processor (patch 16, mean/std 0.5, at least 65536 px
per image: small images are upscaled to 64 tokens); its chat template (a thinking template for the -Thinking
checkpoints: the generation prompt opens `<think>`) renders the prompts. The RL settings are
`rftjax.configs.easyr1_checkpoint_config`'s (EasyR1's Geometry3K example; EasyR1 trains Qwen3-VL with the same
recipe). MoE checkpoints (Qwen3-VL-30B-A3B) and video inputs are not supported.
"""

from rftjax.configs import easyr1_checkpoint_config


def get_config():
    return easyr1_checkpoint_config()

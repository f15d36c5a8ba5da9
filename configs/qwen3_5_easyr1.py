"""GRPO on a pretrained Qwen3.5 checkpoint (Qwen/Qwen3.5-0.8B/2B/4B/9B: multimodal, Gated DeltaNet decoder) with
EasyR1-format dataset files.

    python -m rftjax.train --config configs/qwen3_5_easyr1.py --workdir runs/geo3k_qwen3_5 \\
        --config.model.checkpoint=/path/to/Qwen3.5-4B \\
        --config.data.train=easyr1:/data/geometry3k/train.parquet \\
        --config.data.test=easyr1:/data/geometry3k/test.parquet
    python -m rftjax.export --workdir runs/geo3k_qwen3_5 --out exported/geo3k_qwen3_5

The decoder alternates three Gated DeltaNet layers (a conv window and a float32 recurrent state per layer while
decoding: no KV cache to grow) with one gated-attention layer. The checkpoint's `preprocessor_config.json` sets
the image processor (patch 16, mean/std 0.5, at least 65536 px per image) and its chat template renders the
prompts: Qwen3.5's template thinks by default (the generation prompt opens `<think>`), so leave room in
`rl.max_new_tokens`, or switch thinking off with `--config.data.chat_template_kwargs='{"enable_thinking": False}'`. The multi-token-prediction head (`mtp.*`) is not loaded. The RL settings are
`rftjax.configs.easyr1_checkpoint_config`'s. MoE checkpoints (Qwen3.5-35B-A3B) and video inputs are not supported.
"""

from rftjax.configs import easyr1_checkpoint_config


def get_config():
    return easyr1_checkpoint_config()

"""GRPO on short videos with a pretrained Qwen2.5-VL / Qwen3-VL (or Qwen2-VL) checkpoint: the procedural `motion`
task (direction of motion, objects appearing over time), or Video-R1 rows.

    python -m rftjax.train --config configs/qwen_video.py --workdir runs/motion \\
        --config.model.checkpoint=/path/to/Qwen2.5-VL-3B-Instruct
    python -m rftjax.train --config configs/qwen_video.py --workdir runs/video_r1 \\
        --config.model.checkpoint=/path/to/Qwen3-VL-4B-Instruct \\
        --config.data.train=videor1:/data/Video-R1-260k.json --config.data.test=videor1:/data/Video-R1-eval.json

Frames are sampled at `data.video.fps` within `[min_frames, max_frames]` and resized to at most
`frame_max_tokens` tokens each (`rftjax.data.video`); a row's frames must fit `model.overrides.max_image_tokens`
tokens and `max_media_items` grid rows (Qwen3-VL: one per temporal patch of 2 frames). The rest is
`easyr1_checkpoint_config`'s, with answers in `<answer>` tags (the task's cold-start traces use them).
"""

from rftjax.configs import easyr1_checkpoint_config


def get_config():
    c = easyr1_checkpoint_config()
    c.data.task = "motion"
    c.data.max_prompt_len = 512
    c.data.video.update(fps=4.0, min_frames=4, max_frames=8, frame_max_tokens=64)
    c.model.overrides.update(max_media_items=8, max_image_tokens=256)  # 8 frames = 4 temporal patches
    c.reward.answer_format = "tags"
    return c

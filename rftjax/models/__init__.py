"""Models: SigLIP ViT + Llama/Qwen2 decoder (LLaVA layout), Qwen2-VL / Qwen2.5-VL, HF interop (`rftjax.models.hf`).

`model_for(config)` gives the Linen module of either family; `init_params`, `abstract_params`,
`check_image_tokens`, `cast_for_compute` work for both.
"""

from rftjax.models.lora import LoraConfig
from rftjax.models.config import (PRESETS, QwenVisionConfig, QwenVLConfig, TextConfig, VisionConfig, VLMConfig,
                                  config_from_dict, forward_flops, get_preset, param_count, text_flops_per_token,
                                  vision_flops_per_image)
from rftjax.models.family import (abstract_params, cast_for_compute, check_image_tokens, dummy_inputs, init_params,
                                  model_for, num_rows, placeholder_ids, uses_dropout)
from rftjax.models.llm import DecoderLM, KVCache, init_cache, positions_from_mask
from rftjax.models.qwen_vl import QwenImageFeatures, QwenImages, QwenVL
from rftjax.models.vit import VisionTransformer
from rftjax.models.vlm import VLM

__all__ = [
    "LoraConfig", "PRESETS", "QwenVisionConfig", "QwenVLConfig", "TextConfig", "VisionConfig", "VLMConfig", "config_from_dict",
    "forward_flops", "get_preset", "param_count", "text_flops_per_token", "vision_flops_per_image",
    "abstract_params", "cast_for_compute", "check_image_tokens", "dummy_inputs", "init_params", "model_for",
    "num_rows", "placeholder_ids", "uses_dropout", "DecoderLM", "KVCache", "init_cache", "positions_from_mask", "QwenImageFeatures",
    "QwenImages", "QwenVL", "VisionTransformer", "VLM",
]

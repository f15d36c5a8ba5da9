"""Models: SigLIP ViT, Llama/Qwen2 decoder, the LLaVA-layout VLM, HF interop (`rftjax.models.hf`)."""

from rftjax.models.config import (PRESETS, TextConfig, VisionConfig, VLMConfig, forward_flops, get_preset,
                                  param_count, text_flops_per_token, vision_flops_per_image)
from rftjax.models.llm import DecoderLM, KVCache, init_cache, positions_from_mask
from rftjax.models.vit import VisionTransformer
from rftjax.models.vlm import VLM, abstract_params, cast_for_compute, check_image_tokens, dummy_inputs, init_params

__all__ = [
    "PRESETS", "TextConfig", "VisionConfig", "VLMConfig", "forward_flops", "get_preset", "param_count",
    "text_flops_per_token", "vision_flops_per_image", "DecoderLM", "KVCache", "init_cache",
    "positions_from_mask", "VisionTransformer", "VLM", "abstract_params", "cast_for_compute", "check_image_tokens",
    "dummy_inputs", "init_params",
]

"""Models: the family registry (`rftjax.models.family`), the decoder and its layer kinds (`rftjax.models.llm`:
attention; `rftjax.models.gated_delta_net`: Qwen3.5's linear attention), the LLaVA family (`rftjax.models.vlm`),
Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 (`rftjax.models.qwen_vl`), HF interop (`rftjax.models.hf`).

`model_for(config)` gives the Linen module of any registered family; `init_params`, `abstract_params`,
`check_image_tokens`, `cast_for_compute`, `param_count`, `forward_flops` work for all of them.
"""

from rftjax.models.lora import LoraConfig
from rftjax.models.config import (PRESETS, QwenVisionConfig, QwenVLConfig, TextConfig, VisionConfig, VLMConfig,
                                  get_preset, vision_flops_per_image)
from rftjax.models.family import (Family, ModelConfig, abstract_params, abstract_state, cast_for_compute,
                                  check_image_tokens, config_from_dict, dummy_inputs, families, family_of, forward_flops, init_params,
                                  model_for, num_rows, param_count, placeholder_ids, register, uses_dropout)
from rftjax.models.llm import (LAYER_KINDS, DecoderLM, DecoderState, LayerInputs, LayerKind, ModelOutput, init_state,
                               positions_from_mask, register_layer_kind, text_flops_per_token, text_param_count)
from rftjax.models.gated_delta_net import GatedDeltaNetLayer  # registers the "gated_delta_net" layer kind
from rftjax.models.qwen_vl import QwenImageFeatures, QwenImages, QwenVL
from rftjax.models.vit import VisionTransformer
from rftjax.models.vlm import VLM

__all__ = [
    "LoraConfig", "PRESETS", "QwenVisionConfig", "QwenVLConfig", "TextConfig", "VisionConfig", "VLMConfig",
    "get_preset", "text_flops_per_token", "vision_flops_per_image",
    "Family", "ModelConfig", "abstract_params", "abstract_state", "cast_for_compute", "check_image_tokens",
    "config_from_dict", "dummy_inputs", "families", "family_of", "forward_flops", "init_params", "model_for",
    "num_rows", "param_count", "placeholder_ids", "register", "uses_dropout",
    "LAYER_KINDS", "DecoderLM", "DecoderState", "LayerInputs", "LayerKind", "ModelOutput", "init_state",
    "positions_from_mask", "register_layer_kind", "text_flops_per_token", "text_param_count",
    "GatedDeltaNetLayer", "QwenImageFeatures", "QwenImages", "QwenVL", "VisionTransformer", "VLM",
]

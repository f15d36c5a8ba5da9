"""Hugging Face interop: read and write `LlavaForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`,
`Qwen2VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration` and `Qwen3_5ForConditionalGeneration`
directories, dispatching on `config.json`'s `model_type` (`load_pretrained`,
`save_pretrained`; `load_llava`/`save_llava`, `load_qwen_vl`/`save_qwen_vl` for one family).

Each family's layout is one `HFLayout` (`Family.hf`): its config parser/writer, its tensor-name map (canonical HF
name, rftjax param path, conversion kind) and the on-disk name prefixes it accepts and writes.

LLaVA: a SigLIP vision tower (`siglip_vision_model`), the 2-layer GELU projector, a Llama or Qwen2 text
model, `vision_feature_select_strategy="full"` with one int `vision_feature_layer`, default RoPE.
Anything else raises a ValueError naming the config field.

Files: `config.json` plus `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`. Tensor names follow the Hub layout (`language_model.model.layers.0...`,
`vision_tower.vision_model.encoder...`, `multi_modal_projector.linear_1...`); reading also accepts the
in-memory layout of transformers 5 (`model.language_model...`, `model.vision_tower...`, `lm_head...`).

Qwen-VL: both layouts in the wild: Qwen2.x's Hub layout (`model.layers...`, `model.embed_tokens`,
`visual.blocks...`, `visual.merger...`, `lm_head`; what we write for Qwen2.x) and transformers 5's
(`model.language_model...`, `model.visual...`; Qwen3-VL's Hub layout, what we write for Qwen3-VL). A checkpoint's
`preprocessor_config.json` sets the image processor's mean, std and smallest area. Config fields rftjax does not
implement (rope scaling other than default/mrope, sliding-window attention, other activations) raise a ValueError
naming the field; video inputs are not supported (the weights load, but the model takes images only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.flax

from rftjax.models.config import (QWEN3_MODEL_TYPES, QWEN_MODEL_TYPES, QwenVisionConfig, QwenVLConfig, TextConfig,
                                  VisionConfig, VLMConfig)
from rftjax.models.family import abstract_params, families, family_of

log = logging.getLogger("rftjax")

CONFIG_NAME = "config.json"
PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# ----------------------------------------------------------------------------------------------------------
# Name mapping. Kinds: "linear" (HF [out, in] weight <-> kernel [*in, *out]), "bias", "conv" (HF [D, C, p, p]
# <-> [p, p, C, D]), "patch" (HF Conv3d [D, C, t, p, p] <-> kernel [C*t*p*p, D]), "depthwise" (HF depthwise Conv1d
# [C, 1, K] <-> [K, C]), "copy".
# Canonical HF names drop the model-level prefixes: "vision.", "projector.", "text.", "visual." stand for them.


class Entry(NamedTuple):
    """One tensor: canonical HF name, rftjax param path, conversion kind, HF shape (only for "patch"), and for
    "linear" the number of leading kernel dims that are input dims (2 for the `[H, hd, D]` output projections)."""

    name: str
    path: tuple[str, ...]
    kind: str
    hf_shape: tuple[int, ...] | None = None
    num_in: int = 1


def _norm_entries(hf: str, ours: tuple[str, ...], with_bias: bool):
    yield Entry(hf + ".weight", (*ours, "scale"), "copy")
    if with_bias:
        yield Entry(hf + ".bias", (*ours, "bias"), "copy")


def _linear_entries(hf: str, ours: tuple[str, ...], with_bias: bool, num_in: int = 1):
    yield Entry(hf + ".weight", (*ours, "kernel"), "linear", num_in=num_in)
    if with_bias:
        yield Entry(hf + ".bias", (*ours, "bias"), "bias")


def _vision_entries(v: VisionConfig):
    yield Entry("vision.embeddings.patch_embedding.weight", ("vision_tower", "patch_embedding", "kernel"), "conv")
    yield Entry("vision.embeddings.patch_embedding.bias", ("vision_tower", "patch_embedding", "bias"), "bias")
    yield Entry("vision.embeddings.position_embedding.weight", ("vision_tower", "position_embedding"), "copy")
    for i in range(v.num_layers):
        hf, ours = f"vision.encoder.layers.{i}.", ("vision_tower", f"layers_{i}")
        for ln in ("layer_norm1", "layer_norm2"):
            yield from _norm_entries(hf + ln, (*ours, ln), True)
        for name, hf_name in (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                              ("v_proj", "self_attn.v_proj"), ("out_proj", "self_attn.out_proj"),
                              ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            yield from _linear_entries(hf + hf_name, (*ours, name), True, 2 if name == "out_proj" else 1)
    yield from _norm_entries("vision.post_layernorm", ("vision_tower", "post_layernorm"), True)


def _projector_entries(c: VLMConfig):
    for lin in ("linear_1", "linear_2"):
        yield from _linear_entries(f"projector.{lin}", ("multi_modal_projector", lin), c.projector_bias)


def _gated_delta_net_entries(hf: str, ours: tuple[str, ...]):
    """A Qwen3.5 `linear_attn` block (`rftjax.models.gated_delta_net`)."""
    for proj in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"):
        yield from _linear_entries(hf + proj, (*ours, proj), False)
    yield Entry(hf + "conv1d.weight", (*ours, "conv1d"), "depthwise")
    yield Entry(hf + "dt_bias", (*ours, "dt_bias"), "copy")
    yield Entry(hf + "A_log", (*ours, "A_log"), "copy")
    yield from _norm_entries(hf + "norm", (*ours, "linear_norm"), False)
    yield from _linear_entries(hf + "out_proj", (*ours, "out_proj"), False, 2)


def _text_entries(t: TextConfig):
    yield Entry("text.embed_tokens.weight", ("language_model", "embed_tokens"), "copy")
    for i in range(t.num_layers):
        hf, ours = f"text.layers.{i}.", ("language_model", f"layers_{i}")
        yield from _norm_entries(hf + "input_layernorm", (*ours, "input_layernorm"), False)
        yield from _norm_entries(hf + "post_attention_layernorm", (*ours, "post_attention_layernorm"), False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield from _linear_entries(hf + f"mlp.{proj}", (*ours, proj), False)
        if t.layer_kinds[i] == "gated_delta_net":
            yield from _gated_delta_net_entries(hf + "linear_attn.", ours)
            continue
        if t.qk_norm:
            for norm in ("q_norm", "k_norm"):
                yield from _norm_entries(hf + f"self_attn.{norm}", (*ours, norm), False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            bias = (t.qkv_bias and proj != "o_proj") or (t.o_bias and proj == "o_proj")
            yield from _linear_entries(hf + f"self_attn.{proj}", (*ours, proj), bias, 2 if proj == "o_proj" else 1)
    yield from _norm_entries("text.norm", ("language_model", "norm"), False)
    if not t.tie_word_embeddings:
        yield Entry("text.lm_head.weight", ("language_model", "lm_head", "kernel"), "linear")


def _llava_entries(c: VLMConfig) -> Iterator[Entry]:
    yield from _vision_entries(c.vision)
    yield from _projector_entries(c)
    yield from _text_entries(c.text)


def _merger_entries(hf: str, ours: tuple[str, ...], qwen3: bool, layer_norm: bool):
    """A patch merger: Qwen2.x `ln_q` + `mlp.0` / `mlp.2`, Qwen3-VL `norm` + `linear_fc1` / `linear_fc2`."""
    yield from _norm_entries(hf + ("norm" if qwen3 else "ln_q"), (*ours, "ln_q"), layer_norm)
    for i, name in ((0, "linear_fc1"), (2, "linear_fc2")):
        yield from _linear_entries(hf + (name if qwen3 else f"mlp.{i}"), (*ours, f"mlp_{i}"), True)


def _qwen_entries(c: QwenVLConfig) -> Iterator[Entry]:
    v, qwen3 = c.vision, c.model_type in QWEN3_MODEL_TYPES
    hf_patch = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    yield Entry("visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"), "patch", hf_patch)
    if v.patch_bias:
        yield Entry("visual.patch_embed.proj.bias", ("visual", "patch_embed", "bias"), "bias")
    if v.num_position_embeddings is not None:
        yield Entry("visual.pos_embed.weight", ("visual", "position_embedding"), "copy")
    layer_norm = v.norm == "layer"
    mlp = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"} if v.gated_mlp else (
        {"fc1": "linear_fc1", "fc2": "linear_fc2"} if qwen3 else {"fc1": "fc1", "fc2": "fc2"})
    for i in range(v.depth):
        hf, ours = f"visual.blocks.{i}.", ("visual", f"blocks_{i}")
        for norm in ("norm1", "norm2"):
            yield from _norm_entries(hf + norm, (*ours, norm), layer_norm)
        for proj in ("qkv", "proj"):
            yield from _linear_entries(hf + f"attn.{proj}", (*ours, proj), True, 2 if proj == "proj" else 1)
        for proj, hf_proj in mlp.items():
            yield from _linear_entries(hf + f"mlp.{hf_proj}", (*ours, proj), True)
    yield from _merger_entries("visual.merger.", ("visual", "merger"), qwen3, layer_norm)
    for j in range(len(v.deepstack_visual_indexes)):
        yield from _merger_entries(f"visual.deepstack_merger_list.{j}.", ("visual", f"deepstack_merger_{j}"), True,
                                   layer_norm)
    yield from _text_entries(c.text)


# Accepted on-disk prefixes -> canonical prefix (first match wins), and canonical prefix -> the Hub layout we
# write (longest canonical prefix first).
_LLAVA_PREFIXES = [
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.", "projector."),
    (r"^language_model\.lm_head\.", "text.lm_head."),
    (r"^lm_head\.", "text.lm_head."),
    (r"^(?:model\.)?language_model\.(?:model\.)?", "text."),
]
_LLAVA_HUB = {"text.lm_head.": "language_model.lm_head.", "vision.": "vision_tower.vision_model.",
              "projector.": "multi_modal_projector.", "text.": "language_model.model."}
_QWEN_PREFIXES = [
    (r"^(?:model\.)?visual\.", "visual."),
    (r"^lm_head\.", "text.lm_head."),
    (r"^model\.language_model\.", "text."),
    (r"^model\.", "text."),
]
_QWEN_HUB = {"text.lm_head.": "lm_head.", "visual.": "visual.", "text.": "model."}
_QWEN3_HUB = {"text.lm_head.": "lm_head.", "visual.": "model.visual.", "text.": "model.language_model."}


def canonical_name(key: str, prefixes=_LLAVA_PREFIXES) -> str | None:
    """Canonical name of an on-disk tensor name, or None for tensors rftjax does not use."""
    for pattern, repl in prefixes:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


def _hub_name(canonical: str, hub: dict[str, str]) -> str:
    for prefix, on_disk in hub.items():
        if canonical.startswith(prefix):
            return on_disk + canonical[len(prefix):]
    raise AssertionError(canonical)


# ----------------------------------------------------------------------------------------------------------
# Config conversion


def _unsupported(field: str, value: Any, supported: str, family: str = "LLaVA") -> ValueError:
    return ValueError(f"unsupported {family} config: {field}={value!r}; rftjax supports {supported}")


def _text_from_hf(tc: dict, root: dict, qkv_bias: bool, o_bias: bool, family: str, prefix: str,
                  qk_norm: bool = False, **extra) -> TextConfig:
    """`TextConfig` from a text-config dict `tc` (a nested `text_config`, or the root of older Qwen-VL files);
    `root` supplies fields some files keep at the top level (tie_word_embeddings). M-RoPE is read when the
    rope parameters carry an `mrope_section` (rope type `default` or `mrope`; `mrope_interleaved` too); `extra`:
    more `TextConfig` fields, replacing the parsed ones."""
    def bad(field, value, supported):
        return _unsupported(prefix + field, value, supported, family)

    if tc.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", tc.get("hidden_act"), "'silu' (SwiGLU)")
    if tc.get("mlp_bias"):
        raise bad("mlp_bias", True, "False")
    if tc.get("use_sliding_window"):
        raise bad("use_sliding_window", True, "False (no sliding-window attention)")
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    mrope = rope.get("mrope_section")
    if rope_type not in ("default", "mrope") or (rope_type == "mrope" and mrope is None):
        raise bad("rope_parameters.rope_type (rope scaling)", rope_type, "'default' or 'mrope'")
    theta = rope.get("rope_theta", tc.get("rope_theta", 10000.0))
    tie = tc.get("tie_word_embeddings", root.get("tie_word_embeddings", False))
    fields = dict(
        vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"], intermediate_size=tc["intermediate_size"],
        num_layers=tc["num_hidden_layers"], num_heads=tc["num_attention_heads"],
        num_kv_heads=tc.get("num_key_value_heads") or tc["num_attention_heads"], head_dim=tc.get("head_dim"),
        rope_theta=float(theta), rms_norm_eps=tc.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(tie),
        qkv_bias=qkv_bias, o_bias=o_bias, max_position_embeddings=tc.get("max_position_embeddings", 4096),
        mrope_section=None if mrope is None else tuple(mrope), mrope_interleaved=bool(rope.get("mrope_interleaved")),
        qk_norm=qk_norm)
    return TextConfig(**{**fields, **extra})


def _text_to_hf(t: TextConfig, model_type: str) -> dict:
    if t.layer_pattern != ("attention",) and model_type != "qwen3_5_text":
        raise ValueError(f"text.layer_pattern={t.layer_pattern} has no {model_type} equivalent (attention layers "
                         f"only)")
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.mrope_section is not None:
        rope["mrope_section"] = list(t.mrope_section)
    if t.mrope_interleaved:
        rope["mrope_interleaved"] = True
    return {
        "model_type": model_type,
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim, "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta, "rope_parameters": rope,
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
    }


def config_from_hf(hf: dict, **overrides) -> VLMConfig:
    """`VLMConfig` from a LLaVA `config.json` dict; `overrides` replace VLMConfig fields (e.g. dtype).

    Raises:
      ValueError: a field rftjax does not implement (names the field and what is supported).
    """
    if hf.get("model_type") != "llava":
        raise _unsupported("model_type", hf.get("model_type"), "'llava' (LlavaForConditionalGeneration)")
    vc, tc = hf.get("vision_config") or {}, hf.get("text_config") or {}
    if vc.get("model_type") != "siglip_vision_model":
        raise _unsupported("vision_config.model_type", vc.get("model_type"), "'siglip_vision_model'")
    if vc.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise _unsupported("vision_config.hidden_act", vc.get("hidden_act"), "'gelu_pytorch_tanh'")
    if hf.get("vision_feature_select_strategy", "default") != "full":
        raise _unsupported("vision_feature_select_strategy", hf.get("vision_feature_select_strategy"),
                           "'full' (SigLIP has no CLS token to drop)")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise _unsupported("vision_feature_layer", layer, "a single int layer")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise _unsupported("projector_hidden_act", hf.get("projector_hidden_act"), "'gelu'")
    text_type = tc.get("model_type", "llama")
    if text_type not in ("llama", "qwen2"):
        raise _unsupported("text_config.model_type", text_type, "'llama' or 'qwen2'")
    if text_type == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(tc.get("attention_bias", False))
    text = _text_from_hf(tc, hf, qkv_bias, o_bias, "LLaVA", "text_config.")
    if text.mrope_section is not None:
        raise _unsupported("text_config.rope_parameters.mrope_section", text.mrope_section, "None for LLaVA")
    vision = VisionConfig(
        image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 16),
        num_channels=vc.get("num_channels", 3), hidden_size=vc.get("hidden_size", 768),
        intermediate_size=vc.get("intermediate_size", 3072), num_layers=vc.get("num_hidden_layers", 12),
        num_heads=vc.get("num_attention_heads", 12), layer_norm_eps=vc.get("layer_norm_eps", 1e-6))
    config = VLMConfig(vision=vision, text=text,
                       image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
                       vision_feature_layer=layer,
                       projector_bias=hf.get("multimodal_projector_bias", True)).replace(**overrides)
    seq = hf.get("image_seq_length")
    if seq is not None and seq != config.num_image_tokens:
        raise ValueError(f"config.json image_seq_length={seq} but the vision tower gives "
                         f"{config.num_image_tokens} patches ((image_size / patch_size) ** 2)")
    return config


def config_to_hf(config: VLMConfig) -> dict:
    """LLaVA `config.json` dict for `config` (Llama text model, or Qwen2 when it has q/k/v but no o bias).

    Raises:
      ValueError: an o_proj bias without q/k/v biases (neither Llama nor Qwen2 has that).
    """
    t, v = config.text, config.vision
    if t.o_bias and not t.qkv_bias:
        raise ValueError("text.o_bias without text.qkv_bias has no HF equivalent (Llama: both, Qwen2: qkv only)")
    qwen2 = t.qkv_bias and not t.o_bias
    text = _text_to_hf(t, "qwen2" if qwen2 else "llama")
    text.update({"use_sliding_window": False} if qwen2 else {"attention_bias": t.qkv_bias, "mlp_bias": False})
    vision = {
        "model_type": "siglip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
        "num_channels": v.num_channels, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
        "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh",
        "vision_use_head": False,  # LLaVA never uses SigLIP's pooling head; rftjax has none to save
    }
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": config.image_token_id, "image_seq_length": config.num_image_tokens,
        "vision_feature_select_strategy": "full", "vision_feature_layer": config.vision_feature_layer,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": config.projector_bias,
        "tie_word_embeddings": t.tie_word_embeddings, "text_config": text, "vision_config": vision,
    }


_QWEN_ARCH = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
              "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_5": "Qwen3_5ForConditionalGeneration"}


_LAYER_TYPES = {"linear_attention": "gated_delta_net", "full_attention": "attention"}


def _qwen3_5_text_fields(tc: dict, prefix: str) -> dict:
    """The Qwen3.5 `TextConfig` fields of a `text_config` dict: `layer_types` as the shortest repeating
    `layer_pattern`, the Gated DeltaNet sizes, partial rotary, (1+w) norms, gated attention.

    Raises:
      ValueError: a layer type rftjax does not implement, or `layer_types` that do not match the layer count.
    """
    n = tc["num_hidden_layers"]
    types = tc.get("layer_types") or [
        "full_attention" if (i + 1) % tc.get("full_attention_interval", 4) == 0 else "linear_attention"
        for i in range(n)]
    bad = sorted(set(types) - set(_LAYER_TYPES))
    if bad or len(types) != n:
        raise _unsupported(prefix + "layer_types", bad or types, f"{n} of {sorted(_LAYER_TYPES)}", "Qwen3.5")
    period = next(p for p in range(1, n + 1) if n % p == 0 and all(types[i] == types[i % p] for i in range(n)))
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    return dict(layer_pattern=tuple(_LAYER_TYPES[t] for t in types[:period]), zero_centered_norm=True,
                attn_output_gate=True, partial_rotary_factor=float(rope.get("partial_rotary_factor",
                                                                            tc.get("partial_rotary_factor", 1.0))),
                linear_conv_kernel=tc.get("linear_conv_kernel_dim", 4),
                linear_key_head_dim=tc.get("linear_key_head_dim", 128),
                linear_value_head_dim=tc.get("linear_value_head_dim", 128),
                linear_num_key_heads=tc.get("linear_num_key_heads", 16),
                linear_num_value_heads=tc.get("linear_num_value_heads", 32))


def qwen_config_from_hf(hf: dict, **overrides) -> QwenVLConfig:
    """`QwenVLConfig` from a Qwen2.5-VL or Qwen2-VL `config.json` dict (text fields nested in `text_config`, as
    transformers 5 writes, or at the top level, as older files do); `overrides` replace QwenVLConfig fields
    (`dtype`, `max_image_tokens`, ...).

    Raises:
      ValueError: a field rftjax does not implement (names the field and what is supported).
    """
    model_type = hf.get("model_type")
    if model_type not in _QWEN_ARCH:
        raise _unsupported("model_type", model_type, "'qwen2_5_vl', 'qwen2_vl', 'qwen3_vl' or 'qwen3_5'", "Qwen-VL")
    family = {"qwen2_5_vl": "Qwen2.5-VL", "qwen2_vl": "Qwen2-VL", "qwen3_vl": "Qwen3-VL", "qwen3_5": "Qwen3.5"}[
        model_type]
    qwen3 = model_type in QWEN3_MODEL_TYPES
    vc = hf.get("vision_config") or {}
    tc = hf.get("text_config") or hf
    prefix = "text_config." if "text_config" in hf else ""
    if qwen3:
        bias = bool(tc.get("attention_bias", False))
        extra = _qwen3_5_text_fields(tc, prefix) if model_type == "qwen3_5" else {}
        if "tie_word_embeddings" in hf:  # transformers ties Qwen3 models by the top-level flag
            extra["tie_word_embeddings"] = bool(hf["tie_word_embeddings"])
        text = _text_from_hf(tc, hf, bias, bias, family, prefix, qk_norm=True, **extra)
    else:
        text = _text_from_hf(tc, hf, True, False, family, prefix)
    if text.mrope_section is None:
        raise _unsupported("text_config.rope_parameters.mrope_section", None, "3 ints (M-RoPE)", family)
    act = vc.get("hidden_act", "gelu_pytorch_tanh" if qwen3 else {"qwen2_5_vl": "silu", "qwen2_vl": "quick_gelu"}[
        model_type])
    act = {"gelu_pytorch_tanh": "gelu_tanh"}.get(act, act)
    if act not in ("silu", "quick_gelu", "gelu", "gelu_tanh"):
        raise _unsupported("vision_config.hidden_act", act, "'silu', 'quick_gelu', 'gelu' or 'gelu_pytorch_tanh'",
                           family)
    vrope = vc.get("rope_parameters") or {}
    common = dict(depth=vc.get("depth", 32), num_heads=vc.get("num_heads", 16),
                  patch_size=vc.get("patch_size", 14), temporal_patch_size=vc.get("temporal_patch_size", 2),
                  spatial_merge_size=vc.get("spatial_merge_size", 2),
                  in_channels=vc.get("in_channels", vc.get("in_chans", 3)), hidden_act=act,
                  rope_theta=float(vrope.get("rope_theta", 10000.0)))
    if model_type == "qwen2_5_vl":
        vision = QwenVisionConfig(hidden_size=vc.get("hidden_size", 1280), intermediate_size=vc.get(
            "intermediate_size", 3420), out_hidden_size=vc.get("out_hidden_size", text.hidden_size),
            window_size=vc.get("window_size", 112), tokens_per_second=int(vc.get("tokens_per_second", 4)),
            fullatt_block_indexes=tuple(vc.get("fullatt_block_indexes", (7, 15, 23, 31))), **common)
    elif qwen3:
        vision = QwenVisionConfig(
            hidden_size=vc.get("hidden_size", 1152), intermediate_size=vc.get("intermediate_size", 4304),
            out_hidden_size=vc.get("out_hidden_size", text.hidden_size), window_size=None, fullatt_block_indexes=(),
            norm="layer", gated_mlp=False, patch_bias=True, num_position_embeddings=vc.get(
                "num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(vc.get("deepstack_visual_indexes",
                                                  (8, 16, 24) if model_type == "qwen3_vl" else ())), **common)
    else:
        embed = vc.get("embed_dim", 1280)
        vision = QwenVisionConfig(hidden_size=embed, intermediate_size=int(embed * vc.get("mlp_ratio", 4)),
                                  out_hidden_size=vc.get("hidden_size", text.hidden_size), window_size=None,
                                  fullatt_block_indexes=(), norm="layer", gated_mlp=False, **common)
    ids = {name: hf[name] for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                                       "vision_end_token_id") if name in hf}
    return QwenVLConfig(vision=vision, text=text, model_type=model_type, **ids).replace(**overrides)


def qwen_config_to_hf(config: QwenVLConfig) -> dict:
    """`config.json` dict of `Qwen2_5_VLForConditionalGeneration` / `Qwen2VLForConditionalGeneration` for
    `config` (transformers 5 layout: `text_config` and `vision_config` nested; the token ids at the top).

    Raises:
      ValueError: a Qwen2-VL vision MLP width that is not an integer multiple of its hidden size.
    """
    v, t = config.vision, config.text
    text = _text_to_hf(t, config.model_type + "_text")
    if config.model_type in QWEN3_MODEL_TYPES:
        if t.qkv_bias != t.o_bias or not t.qk_norm:
            raise ValueError("a Qwen3 text config has q/k norms and one attention_bias for q, k, v and o")
        text.update({"attention_bias": t.qkv_bias})
    if config.model_type == "qwen3_5":
        kinds = {v: k for k, v in _LAYER_TYPES.items()}
        text["rope_parameters"]["partial_rotary_factor"] = t.partial_rotary_factor
        text.update(layer_types=[kinds[name] for name in t.layer_kinds],
                    linear_conv_kernel_dim=t.linear_conv_kernel, linear_key_head_dim=t.linear_key_head_dim,
                    linear_value_head_dim=t.linear_value_head_dim, linear_num_key_heads=t.linear_num_key_heads,
                    linear_num_value_heads=t.linear_num_value_heads)
    else:
        text.update({"use_sliding_window": False, "sliding_window": None})
    act = {"gelu_tanh": "gelu_pytorch_tanh"}.get(v.hidden_act, v.hidden_act)
    vision = {"model_type": config.model_type + ("" if config.model_type == "qwen2_vl" else "_vision"),
              "depth": v.depth, "num_heads": v.num_heads, "patch_size": v.patch_size,
              "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
              "in_channels": v.in_channels, "hidden_act": act,
              "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
    if config.model_type in QWEN3_MODEL_TYPES:
        vision.update(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                      out_hidden_size=v.out_hidden_size, num_position_embeddings=v.num_position_embeddings)
        if config.model_type == "qwen3_vl":
            vision["deepstack_visual_indexes"] = list(v.deepstack_visual_indexes)
        elif v.deepstack_visual_indexes:
            raise ValueError("Qwen3.5 has no DeepStack: vision.deepstack_visual_indexes must be empty")
    elif config.model_type == "qwen2_5_vl":
        vision.update(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                      out_hidden_size=v.out_hidden_size, window_size=v.window_size,
                      fullatt_block_indexes=list(v.fullatt_block_indexes),
                      tokens_per_second=v.tokens_per_second)
    else:
        if v.intermediate_size % v.hidden_size:
            raise ValueError(f"Qwen2-VL's vision MLP width is embed_dim * an int mlp_ratio; vision.intermediate_size="
                             f"{v.intermediate_size} is not a multiple of vision.hidden_size={v.hidden_size}")
        vision.update(model_type="qwen2_vl_vision", embed_dim=v.hidden_size, hidden_size=v.out_hidden_size,
                      mlp_ratio=v.intermediate_size // v.hidden_size)
    return {"architectures": [_QWEN_ARCH[config.model_type]], "model_type": config.model_type,
            "image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
            "vision_start_token_id": config.vision_start_token_id, "vision_end_token_id": config.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings, "text_config": text, "vision_config": vision}


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """How one HF model family maps onto rftjax (a model family's `Family.hf`): config parser/writer, tensor map,
    on-disk name prefixes."""

    model_types: tuple[str, ...]  # config.json model_type values it reads
    config_from_hf: Callable[..., Any]
    config_to_hf: Callable[[Any], dict]
    entries: Callable[[Any], Iterator[Entry]]
    prefixes: list
    hub: dict  # canonical prefix -> the on-disk prefix written
    modules: dict  # canonical prefix -> the module names of the transformers model (PEFT adapters name them)
    skip: tuple[str, ...] = ()  # canonical prefixes of tensors rftjax does not use
    hub_by_model_type: dict = dataclasses.field(default_factory=dict)  # model types whose Hub layout differs
    processor: Callable[[dict], dict] | None = None  # preprocessor_config.json dict -> model config overrides
    vision_blocks: Callable[[Any], int] | None = None  # config -> vision blocks stacked under `visual/blocks` (scan)

    def hub_of(self, config) -> dict:
        """The on-disk prefixes written for `config` (its model type's Hub layout)."""
        return self.hub_by_model_type.get(getattr(config, "model_type", None), self.hub)

    def overrides_from(self, path: str) -> dict:
        """Model config fields the directory's `preprocessor_config.json` sets (none without the file)."""
        file = os.path.join(path, PROCESSOR_CONFIG_NAME)
        if self.processor is None or not os.path.exists(file):
            return {}
        with open(file) as f:
            return self.processor(json.load(f))


def qwen_processor_overrides(pre: dict) -> dict:
    """`QwenVLConfig` fields from a Qwen-VL `preprocessor_config.json` dict: `image_mean`, `image_std` and
    `min_pixels` (`size.shortest_edge`, or the older top-level `min_pixels`). The largest image stays
    `max_image_tokens`'s (a training budget, not the checkpoint's).

    Raises:
      ValueError: an image processor of another kind (names it).
    """
    kind = pre.get("image_processor_type", "Qwen2VLImageProcessor")
    if not kind.startswith("Qwen2VLImageProcessor"):
        raise ValueError(f"{PROCESSOR_CONFIG_NAME}: image_processor_type={kind!r}; rftjax implements "
                         f"Qwen2VLImageProcessor (what Qwen2-VL, Qwen2.5-VL and Qwen3-VL ship)")
    out = {k: tuple(pre[k]) for k in ("image_mean", "image_std") if k in pre}
    size = pre.get("size") or {}
    min_pixels = size.get("shortest_edge", pre.get("min_pixels"))
    if min_pixels is not None:
        out["min_pixels"] = int(min_pixels)
    return out


LLAVA = HFLayout(("llava",), config_from_hf, config_to_hf, _llava_entries, _LLAVA_PREFIXES, _LLAVA_HUB, {
    "text.lm_head.": "lm_head.", "vision.": "model.vision_tower.vision_model.",
    "projector.": "model.multi_modal_projector.", "text.": "model.language_model."}, ("vision.head.",))
QWEN_VL = HFLayout(QWEN_MODEL_TYPES, qwen_config_from_hf, qwen_config_to_hf, _qwen_entries, _QWEN_PREFIXES,
                   hub=_QWEN_HUB, modules=_QWEN3_HUB,  # transformers 5 names its modules as Qwen3's Hub layout
                   hub_by_model_type=dict.fromkeys(QWEN3_MODEL_TYPES, _QWEN3_HUB),
                   processor=qwen_processor_overrides, vision_blocks=lambda c: c.vision.depth)


def _layout_for(config) -> HFLayout:
    """The `HFLayout` of `config`'s family.

    Raises:
      ValueError: the family has no HF layout.
    """
    family = family_of(config)
    if family.hf is None:
        raise ValueError(f"model family {family.name!r} has no Hugging Face layout: it cannot be saved or loaded "
                         f"as an HF directory")
    return family.hf


def layout_of(model_type: str | None) -> HFLayout:
    """The `HFLayout` of a `config.json` `model_type` (among the registered families').

    Raises:
      ValueError: a model type rftjax does not support (lists the supported ones).
    """
    layouts = {t: f.hf for f in families() if f.hf is not None for t in f.hf.model_types}
    if model_type not in layouts:
        raise ValueError(f"config.json model_type={model_type!r} is not supported; rftjax loads {sorted(layouts)}")
    return layouts[model_type]


# ----------------------------------------------------------------------------------------------------------
# Tensor conversion


def _to_ours(e: Entry, x: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    kind = e.kind
    if kind == "patch":
        if x.ndim != 5 or (x.shape[0], int(np.prod(x.shape[1:]))) != (shape[1], shape[0]):
            raise ValueError(f"tensor {name} has shape {x.shape}, expected [{shape[1]}, C, t, p, p] with C*t*p*p = "
                             f"{shape[0]} from config.json")
        return x.reshape(x.shape[0], -1).T
    if kind == "linear":
        n_in = e.num_in
        want = (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))
        if x.shape != want:
            raise ValueError(f"tensor {name} has shape {x.shape}, expected {want} from config.json")
        return x.T.reshape(shape)
    if kind == "depthwise":
        if x.shape != (shape[1], 1, shape[0]):
            raise ValueError(f"tensor {name} has shape {x.shape}, expected {(shape[1], 1, shape[0])} from config.json")
        return x[:, 0, :].T
    if kind == "conv":
        want = (shape[3], shape[2], shape[0], shape[1])
        if x.shape != want:
            raise ValueError(f"tensor {name} has shape {x.shape}, expected {want} from config.json")
        return x.transpose(2, 3, 1, 0)
    if x.size != int(np.prod(shape)) or (kind == "copy" and x.shape != shape):
        raise ValueError(f"tensor {name} has shape {x.shape}, expected {shape} from config.json")
    return x.reshape(shape)


def _to_hf(e: Entry, x: np.ndarray) -> np.ndarray:
    kind = e.kind
    if kind == "patch":
        return x.T.reshape(e.hf_shape)
    if kind == "linear":
        return x.reshape(int(np.prod(x.shape[:e.num_in])), -1).T
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    if kind == "depthwise":
        return x.T[:, None, :]
    if kind == "bias":
        return x.reshape(-1)
    return x


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _stacks(config) -> list[tuple[str, str, int, tuple[str, ...]]]:
    """`(module, block name, count, pattern)` of each run of blocks a `scan_layers` model scans: the decoder's
    layers, and the vision blocks where the family's tower scans them (`HFLayout.vision_blocks`)."""
    out = [("language_model", "layers", config.text.num_layers, tuple(config.text.layer_pattern))]
    layout = family_of(config).hf
    if layout is not None and layout.vision_blocks is not None:
        out.append(("visual", "blocks", layout.vision_blocks(config), ("block",)))
    return out


def stack_layers(params: dict, config) -> dict:
    """Unscanned params (`language_model/layers_{i}`; a Qwen-VL tower's `visual/blocks_{i}` too) -> the layout of
    the same model with `scan_layers`: `layers` / `blocks`, leaves with a leading `[L / p]` axis; for a decoder
    `layer_pattern` of p > 1 kinds, `layers/{kind}_{j}` stacks layers j, j + p, ... (`DecoderLM`'s scanned
    block)."""
    stack = lambda group: jax.tree.map(lambda *xs: jnp.stack(xs), *group)  # noqa: E731
    for module, name, n, pattern in _stacks(config):
        tree = dict(params[module])
        blocks, p = [tree.pop(f"{name}_{i}") for i in range(n)], len(pattern)
        tree[name] = stack(blocks) if p == 1 else {f"{kind}_{j}": stack(blocks[j::p]) for j, kind in enumerate(pattern)}
        params = {**params, module: tree}
    return params


def unstack_layers(params: dict, config) -> dict:
    """Inverse of `stack_layers`."""
    for module, name, n, pattern in _stacks(config):
        tree = dict(params[module])
        stacked, p = tree.pop(name), len(pattern)
        for i in range(n):
            block = stacked if p == 1 else stacked[f"{pattern[i % p]}_{i % p}"]
            tree[f"{name}_{i}"] = jax.tree.map(lambda x, k=i // p: x[k], block)
        params = {**params, module: tree}
    return params


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.exists(os.path.join(path, WEIGHTS_NAME)):
        return [WEIGHTS_NAME]
    raise ValueError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path}: not a safetensors checkpoint directory")


def read_tensors(path: str, names: set[str] | frozenset[str]) -> dict[str, np.ndarray]:
    """The tensors of a Hugging Face directory's safetensors files (single or sharded) named in `names`, as
    float32 numpy arrays (names the files lack are absent).

    Raises:
      ValueError: no safetensors weights in `path`.
    """
    out = {}
    for fname in _weight_files(path):
        with safetensors.safe_open(os.path.join(path, fname), framework="flax") as f:
            for key in set(f.keys()) & set(names):
                out[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
    return out


def read_hf_config(path: str) -> dict:
    """The `config.json` of a Hugging Face model directory, as a dict."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        return json.load(f)


def _load(path: str, family: HFLayout, hf_config: dict, overrides: dict, without: tuple[str, ...] = ()):
    config = family.config_from_hf(hf_config, **{**family.overrides_from(path), **overrides})
    tensors: dict[str, Any] = {}
    unused: list[str] = []
    for fname in _weight_files(path):
        with safetensors.safe_open(os.path.join(path, fname), framework="flax") as f:
            for key in f.keys():
                canonical = canonical_name(key, family.prefixes)
                if canonical is not None and not canonical.startswith(family.skip):
                    tensors[canonical] = (key, f.get_tensor(key))
                else:
                    unused.append(key)
    if unused:  # e.g. Qwen3.5's multi-token-prediction head (mtp.*), SigLIP's pooling head
        prefixes = sorted({k.split(".")[0] for k in unused})
        log.info("%s: skipped %d tensors rftjax does not use (%s...)", path, len(unused), ", ".join(prefixes))
    shapes = abstract_params(config.replace(scan_layers=False))
    params: dict = {}
    for e in family.entries(config):
        if without and e.name.startswith(without):
            continue
        if e.name not in tensors:
            raise ValueError(f"checkpoint {path} lacks tensor {_hub_name(e.name, family.hub_of(config))!r} that its "
                             f"config.json needs")
        key, x = tensors[e.name]
        value = _to_ours(e, np.asarray(x.astype(jnp.float32)), tuple(_get(shapes, e.path).shape), key)
        _set(params, e.path, jnp.asarray(value, config.params_dtype))
    if config.scan_layers:
        params = stack_layers(params, config)
    return config, params


def load_config(path: str, **overrides) -> VLMConfig | QwenVLConfig:
    """Only the config of a Hugging Face model directory of any supported family (no tensors are read).

    Raises:
      ValueError: unsupported model type or config field.
    """
    hf_config = read_hf_config(path)
    layout = layout_of(hf_config.get("model_type"))
    return layout.config_from_hf(hf_config, **{**layout.overrides_from(path), **overrides})


def load_pretrained(path: str, **overrides) -> tuple[VLMConfig | QwenVLConfig, dict]:
    """Read a Hugging Face model directory of any supported family (by `config.json`'s `model_type`: `llava`,
    `qwen2_5_vl`, `qwen2_vl`): config.json + safetensors, single or sharded, float32/bf16, tied or untied.

    Args:
      path: the directory.
      **overrides: config fields to set on the loaded config (`dtype="bfloat16"`, `scan_layers=True`,
        Qwen-VL's `max_image_tokens`).

    Returns:
      `(config, params)`: params as a nested dict of `jax.Array` in `config.param_dtype` (float32 by
      default), laid out as `model_for(config).init` makes them (stacked when `scan_layers`). Tensors rftjax
      does not use (SigLIP's pooling head) are skipped.

    Raises:
      ValueError: unsupported model type or config field; missing or misshapen tensor (names it).
    """
    hf_config = read_hf_config(path)
    return _load(path, layout_of(hf_config.get("model_type")), hf_config, overrides)


def load_body(path: str, **overrides) -> tuple[VLMConfig | QwenVLConfig, dict]:
    """`load_pretrained` without the LM head: the vision tower and decoder of a directory whose head is another
    (a `*ForSequenceClassification`'s `score`, a value head beside the body), for `return_hidden` forward
    passes. A checkpoint's `lm_head` tensor, when present, is skipped.

    Raises:
      ValueError: as `load_pretrained`.
    """
    hf_config = read_hf_config(path)
    return _load(path, layout_of(hf_config.get("model_type")), hf_config, overrides, without=("text.lm_head.",))


def load_llava(path: str, **overrides) -> tuple[VLMConfig, dict]:
    """`load_pretrained` for a `LlavaForConditionalGeneration` directory (ValueError for any other family)."""
    return _load(path, LLAVA, read_hf_config(path), overrides)


def load_qwen_vl(path: str, **overrides) -> tuple[QwenVLConfig, dict]:
    """`load_pretrained` for a Qwen2.5-VL / Qwen2-VL directory (ValueError for any other family)."""
    return _load(path, QWEN_VL, read_hf_config(path), overrides)


def save_pretrained(path: str, config: VLMConfig | QwenVLConfig, params: dict, max_shard_size: int | None = None,
                    dtype: str | None = None) -> None:
    """Write `params` as a Hugging Face directory transformers loads: `LlavaForConditionalGeneration` for a
    `VLMConfig`, `Qwen2_5_VLForConditionalGeneration` / `Qwen2VLForConditionalGeneration` for a `QwenVLConfig`
    (by its `model_type`), in the Hub's tensor-name layout.

    Args:
      path: output directory (created).
      config: the model config.
      params: params of `model_for(config)` (scanned or not, any param dtype); LoRA adapters (`config.lora`) are
        merged into their kernels (`rftjax.models.lora.merge`; `save_adapter` writes them alone).
      max_shard_size: bytes per safetensors shard; None writes one `model.safetensors`, otherwise shards
        `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
      dtype: tensor dtype on disk (`float32`, `bfloat16`); default the params' own.

    Raises:
      ValueError: a config with no HF equivalent (see `config_to_hf`).
    """
    family = _layout_for(config)
    hf_config = family.config_to_hf(config)
    if config.lora is not None:  # the adapters folded into the weights they adapt
        from rftjax.models import lora as lora_lib

        params = lora_lib.merge(params, config.lora)
    if config.scan_layers:
        params = unstack_layers(params, config)
    tensors = {}
    for e in family.entries(config):
        x = np.asarray(jax.device_get(_get(params, e.path)))
        x = np.ascontiguousarray(_to_hf(e, x))
        tensors[_hub_name(e.name, family.hub_of(config))] = jnp.asarray(x, dtype) if dtype else jnp.asarray(x)
    os.makedirs(path, exist_ok=True)
    hf_config["torch_dtype"] = hf_config["dtype"] = str(next(iter(tensors.values())).dtype)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(hf_config, f, indent=2)
    _write_tensors(path, tensors, max_shard_size)


def _write_tensors(path: str, tensors: dict, max_shard_size: int | None) -> None:
    meta = {"format": "pt"}
    if max_shard_size is None:
        safetensors.flax.save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata=meta)
        return
    shards: list[dict] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.flax.save_file(shard, os.path.join(path, fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))}, "weight_map": weight_map}
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)


ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(path: str, config: VLMConfig | QwenVLConfig, params: dict, base_model: str = "") -> list[str]:
    """Write the LoRA adapters in `params` (`rftjax.models.lora`; scanned or not) as a PEFT adapter directory:
    `adapter_config.json` + `adapter_model.safetensors` (float32), which `peft.PeftModel.from_pretrained(base, path)`
    loads onto the transformers model of `config`'s family (`save_pretrained`'s directory of the base weights).
    Returns the adapted modules' transformers names.

    Raises:
      ValueError: `config.lora` is None, or an adapter sits on a layer that is not an `nn.Linear` in transformers
        (a patch embedding).
    """
    from rftjax.models import lora as lora_lib

    if config.lora is None:
        raise ValueError("save_adapter: the model config has no LoRA (config.lora is None)")
    family = _layout_for(config)
    if config.scan_layers:
        params = unstack_layers(params, config)
    entries = {e.path: e for e in family.entries(config)}
    tensors, modules = {}, []
    for kernel_path, (a, b) in lora_lib.adapted_kernels(params).items():
        e = entries.get(kernel_path)
        if e is None or e.kind != "linear":
            raise ValueError(f"LoRA on {'/'.join(kernel_path[:-1])}: PEFT export covers linear layers only; "
                             f"narrow model.lora.targets")
        module = _hub_name(e.name[:-len(".weight")], family.modules)
        modules.append(module)
        tensors.update({k: jnp.asarray(v, jnp.float32) for k, v in lora_lib.peft_tensors(
            np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b)), module).items()})
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ADAPTER_CONFIG_NAME), "w") as f:
        json.dump(lora_lib.peft_config(config.lora, modules, base_model), f, indent=2)
    safetensors.flax.save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return modules


def save_llava(path: str, config: VLMConfig, params: dict, max_shard_size: int | None = None,
               dtype: str | None = None) -> None:
    """`save_pretrained` for a LLaVA-layout model (`LlavaForConditionalGeneration`)."""
    save_pretrained(path, config, params, max_shard_size, dtype)


def save_qwen_vl(path: str, config: QwenVLConfig, params: dict, max_shard_size: int | None = None,
                 dtype: str | None = None) -> None:
    """`save_pretrained` for a Qwen2.5-VL / Qwen2-VL model."""
    save_pretrained(path, config, params, max_shard_size, dtype)

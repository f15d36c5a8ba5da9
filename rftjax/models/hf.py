"""Hugging Face interop: read and write `transformers.LlavaForConditionalGeneration` directories.

Supported: a SigLIP vision tower (`siglip_vision_model`), the 2-layer GELU projector, a Llama or Qwen2 text
model, `vision_feature_select_strategy="full"` with one int `vision_feature_layer`, default RoPE.
Anything else raises a ValueError naming the config field.

Files: `config.json` plus `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`. Tensor names follow the Hub layout (`language_model.model.layers.0...`,
`vision_tower.vision_model.encoder...`, `multi_modal_projector.linear_1...`); reading also accepts the
in-memory layout of transformers 5 (`model.language_model...`, `model.vision_tower...`, `lm_head...`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.flax

from rftjax.models.config import TextConfig, VisionConfig, VLMConfig
from rftjax.models.vlm import abstract_params

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# ----------------------------------------------------------------------------------------------------------
# Name mapping. Each entry: (canonical HF name, rftjax param path, kind). Kinds: "linear" (HF [out, in]
# weight <-> kernel [*in, *out]), "bias", "conv" (HF [D, C, p, p] <-> [p, p, C, D]), "copy".
# Canonical HF names drop the model-level prefixes: "vision.", "projector.", "text." stand for them.


def _vision_entries(v: VisionConfig):
    yield "vision.embeddings.patch_embedding.weight", ("vision_tower", "patch_embedding", "kernel"), "conv"
    yield "vision.embeddings.patch_embedding.bias", ("vision_tower", "patch_embedding", "bias"), "bias"
    yield "vision.embeddings.position_embedding.weight", ("vision_tower", "position_embedding"), "copy"
    for i in range(v.num_layers):
        hf, ours = f"vision.encoder.layers.{i}.", ("vision_tower", f"layers_{i}")
        for ln in ("layer_norm1", "layer_norm2"):
            yield hf + ln + ".weight", (*ours, ln, "scale"), "copy"
            yield hf + ln + ".bias", (*ours, ln, "bias"), "copy"
        for name, hf_name in (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                              ("v_proj", "self_attn.v_proj"), ("out_proj", "self_attn.out_proj"),
                              ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            yield hf + hf_name + ".weight", (*ours, name, "kernel"), "linear"
            yield hf + hf_name + ".bias", (*ours, name, "bias"), "bias"
    yield "vision.post_layernorm.weight", ("vision_tower", "post_layernorm", "scale"), "copy"
    yield "vision.post_layernorm.bias", ("vision_tower", "post_layernorm", "bias"), "copy"


def _projector_entries(c: VLMConfig):
    for lin in ("linear_1", "linear_2"):
        yield f"projector.{lin}.weight", ("multi_modal_projector", lin, "kernel"), "linear"
        if c.projector_bias:
            yield f"projector.{lin}.bias", ("multi_modal_projector", lin, "bias"), "bias"


def _text_entries(t: TextConfig):
    yield "text.embed_tokens.weight", ("language_model", "embed_tokens"), "copy"
    for i in range(t.num_layers):
        hf, ours = f"text.layers.{i}.", ("language_model", f"layers_{i}")
        yield hf + "input_layernorm.weight", (*ours, "input_layernorm", "scale"), "copy"
        yield hf + "post_attention_layernorm.weight", (*ours, "post_attention_layernorm", "scale"), "copy"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield hf + f"self_attn.{proj}.weight", (*ours, proj, "kernel"), "linear"
            if (t.qkv_bias and proj != "o_proj") or (t.o_bias and proj == "o_proj"):
                yield hf + f"self_attn.{proj}.bias", (*ours, proj, "bias"), "bias"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield hf + f"mlp.{proj}.weight", (*ours, proj, "kernel"), "linear"
    yield "text.norm.weight", ("language_model", "norm", "scale"), "copy"
    if not t.tie_word_embeddings:
        yield "text.lm_head.weight", ("language_model", "lm_head", "kernel"), "linear"


def _entries(c: VLMConfig) -> Iterator[tuple[str, tuple[str, ...], str]]:
    yield from _vision_entries(c.vision)
    yield from _projector_entries(c)
    yield from _text_entries(c.text)


# Accepted on-disk prefixes -> canonical prefix (first match wins).
_PREFIXES = [
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.", "projector."),
    (r"^language_model\.lm_head\.", "text.lm_head."),
    (r"^lm_head\.", "text.lm_head."),
    (r"^(?:model\.)?language_model\.(?:model\.)?", "text."),
]
# Canonical prefix -> the Hub layout we write.
_HUB_PREFIXES = {"vision.": "vision_tower.vision_model.", "projector.": "multi_modal_projector.",
                 "text.lm_head.": "language_model.lm_head.", "text.": "language_model.model."}


def canonical_name(key: str) -> str | None:
    """Canonical name of an on-disk tensor name, or None for tensors rftjax does not use."""
    for pattern, repl in _PREFIXES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


def _hub_name(canonical: str) -> str:
    for prefix in ("text.lm_head.", "vision.", "projector.", "text."):
        if canonical.startswith(prefix):
            return _HUB_PREFIXES[prefix] + canonical[len(prefix):]
    raise AssertionError(canonical)


# ----------------------------------------------------------------------------------------------------------
# Config conversion


def _unsupported(field: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"unsupported LLaVA config: {field}={value!r}; rftjax supports {supported}")


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
    if tc.get("hidden_act", "silu") != "silu":
        raise _unsupported("text_config.hidden_act", tc.get("hidden_act"), "'silu' (SwiGLU)")
    if tc.get("mlp_bias"):
        raise _unsupported("text_config.mlp_bias", True, "False")
    if tc.get("use_sliding_window"):
        raise _unsupported("text_config.use_sliding_window", True, "False")
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise _unsupported("text_config.rope_parameters.rope_type (rope scaling)", rope_type, "'default'")
    theta = rope.get("rope_theta", tc.get("rope_theta", 10000.0))
    if text_type == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(tc.get("attention_bias", False))
    tie = tc.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    vision = VisionConfig(
        image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 16),
        num_channels=vc.get("num_channels", 3), hidden_size=vc.get("hidden_size", 768),
        intermediate_size=vc.get("intermediate_size", 3072), num_layers=vc.get("num_hidden_layers", 12),
        num_heads=vc.get("num_attention_heads", 12), layer_norm_eps=vc.get("layer_norm_eps", 1e-6))
    text = TextConfig(
        vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"], intermediate_size=tc["intermediate_size"],
        num_layers=tc["num_hidden_layers"], num_heads=tc["num_attention_heads"],
        num_kv_heads=tc.get("num_key_value_heads") or tc["num_attention_heads"], head_dim=tc.get("head_dim"),
        rope_theta=float(theta), rms_norm_eps=tc.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(tie),
        qkv_bias=qkv_bias, o_bias=o_bias, max_position_embeddings=tc.get("max_position_embeddings", 4096))
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
    text = {
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim, "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
    }
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


# ----------------------------------------------------------------------------------------------------------
# Tensor conversion


def _num_in(path: tuple[str, ...]) -> int:
    """Number of leading kernel dims that are input dims (2 for the `[H, hd, D]` output projections)."""
    return 2 if path[-2] in ("o_proj", "out_proj") else 1


def _to_ours(kind: str, path, x: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    if kind == "linear":
        n_in = _num_in(path)
        want = (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))
        if x.shape != want:
            raise ValueError(f"tensor {name} has shape {x.shape}, expected {want} from config.json")
        return x.T.reshape(shape)
    if kind == "conv":
        want = (shape[3], shape[2], shape[0], shape[1])
        if x.shape != want:
            raise ValueError(f"tensor {name} has shape {x.shape}, expected {want} from config.json")
        return x.transpose(2, 3, 1, 0)
    if x.size != int(np.prod(shape)) or (kind == "copy" and x.shape != shape):
        raise ValueError(f"tensor {name} has shape {x.shape}, expected {shape} from config.json")
    return x.reshape(shape)


def _to_hf(kind: str, path, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        n_in = _num_in(path)
        return x.reshape(int(np.prod(x.shape[:n_in])), -1).T
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
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


def stack_layers(params: dict, num_layers: int) -> dict:
    """Unscanned LM params (`layers_0..layers_{L-1}`) -> scanned (`layers`, leaves with a leading [L] axis)."""
    lm = dict(params["language_model"])
    layers = [lm.pop(f"layers_{i}") for i in range(num_layers)]
    lm["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "language_model": lm}


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Inverse of `stack_layers`."""
    lm = dict(params["language_model"])
    stacked = lm.pop("layers")
    for i in range(num_layers):
        lm[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "language_model": lm}


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.exists(os.path.join(path, WEIGHTS_NAME)):
        return [WEIGHTS_NAME]
    raise ValueError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path}: not a safetensors checkpoint directory")


def load_llava(path: str, **overrides) -> tuple[VLMConfig, dict]:
    """Read a `LlavaForConditionalGeneration` directory (config.json + safetensors, single or sharded).

    Args:
      path: the directory.
      **overrides: VLMConfig fields to set on the loaded config (`dtype="bfloat16"`, `scan_layers=True`).

    Returns:
      `(config, params)`: params as a nested dict of `jax.Array` in `config.param_dtype` (float32 by
      default), laid out as `VLM(config).init` makes them (stacked when `scan_layers`). SigLIP's pooling
      head, unused by LLaVA, is skipped.

    Raises:
      ValueError: unsupported config field; missing or misshapen tensor (names it).
    """
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = config_from_hf(json.load(f), **overrides)
    tensors: dict[str, Any] = {}
    for fname in _weight_files(path):
        with safetensors.safe_open(os.path.join(path, fname), framework="flax") as f:
            for key in f.keys():
                canonical = canonical_name(key)
                if canonical is not None and not canonical.startswith("vision.head."):
                    tensors[canonical] = (key, f.get_tensor(key))
    shapes = abstract_params(config.replace(scan_layers=False))
    params: dict = {}
    for canonical, ours, kind in _entries(config):
        if canonical not in tensors:
            raise ValueError(f"checkpoint {path} lacks tensor {_hub_name(canonical)!r} that its config.json needs")
        key, x = tensors[canonical]
        shape = tuple(_get(shapes, ours).shape)
        value = _to_ours(kind, ours, np.asarray(x.astype(jnp.float32)), shape, key)
        _set(params, ours, jnp.asarray(value, config.params_dtype))
    if config.scan_layers:
        params = stack_layers(params, config.text.num_layers)
    return config, params


def save_llava(path: str, config: VLMConfig, params: dict, max_shard_size: int | None = None,
               dtype: str | None = None) -> None:
    """Write `params` as a `LlavaForConditionalGeneration` directory that transformers loads.

    Args:
      path: output directory (created).
      config: the model config.
      params: params of `VLM(config)` (scanned or not, any param dtype).
      max_shard_size: bytes per safetensors shard; None writes one `model.safetensors`, otherwise shards
        `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
      dtype: tensor dtype on disk (`float32`, `bfloat16`); default the params' own.

    Raises:
      ValueError: a config with no HF equivalent (see `config_to_hf`).
    """
    hf_config = config_to_hf(config)
    if config.scan_layers:
        params = unstack_layers(params, config.text.num_layers)
    tensors = {}
    for canonical, ours, kind in _entries(config):
        x = np.asarray(jax.device_get(_get(params, ours)))
        x = np.ascontiguousarray(_to_hf(kind, ours, x))
        tensors[_hub_name(canonical)] = jnp.asarray(x, dtype) if dtype else jnp.asarray(x)
    os.makedirs(path, exist_ok=True)
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(hf_config, f, indent=2)
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

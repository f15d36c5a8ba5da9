"""One place that dispatches on the model family: LLaVA layout (`VLMConfig` -> `VLM`) or Qwen2-VL /
Qwen2.5-VL (`QwenVLConfig` -> `QwenVL`).

The sampler, the trainer's loss functions and the checkpoint code call these instead of naming a module, so a
new family is one entry here (plus its HF tensor map in `rftjax.models.hf`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rftjax.models import lora, qwen_vl, vlm
from rftjax.models.config import QwenVLConfig, VLMConfig

Array = jax.Array
ModelConfig = VLMConfig | QwenVLConfig
VISION_MODULES = ("vision_tower", "visual")
"""Top-level param modules of the vision towers (LLaVA's SigLIP, Qwen-VL's): `optim.vision_lr_scale`, freezing."""


def model_for(config: ModelConfig, train: bool = False) -> nn.Module:
    """The Linen module of `config`'s family (`VLM` or `QwenVL`), with the same call contract; with LoRA adapters
    when `config.lora` is set (`rftjax.models.lora.adapt`: their params sit next to the kernels they adapt).
    `train=True` turns on the adapters' dropout (the call then takes `rngs={"dropout": key}`)."""
    if isinstance(config, QwenVLConfig):
        module = qwen_vl.QwenVL(config)
    elif isinstance(config, VLMConfig):
        module = vlm.VLM(config)
    else:
        raise TypeError(f"not a model config: {type(config).__name__}")
    return module if config.lora is None else lora.adapt(module, config.lora, train=train)


def uses_dropout(config: ModelConfig) -> bool:
    """Whether training forward passes of `model_for(config, train=True)` need a `dropout` rng."""
    return config.lora is not None and config.lora.dropout > 0


def dummy_inputs(config: ModelConfig, batch_size: int = 1, text_len: int = 4):
    """`(images, input_ids)` of the right kinds and shapes for `model_for(config).init`."""
    module = qwen_vl if isinstance(config, QwenVLConfig) else vlm
    return module.dummy_inputs(config, batch_size, text_len)


def init_params(config: ModelConfig, rng: Array) -> dict:
    """Randomly initialised, unboxed params of `model_for(config)` (leaves in `config.param_dtype`).

    One jitted program (an eager init dispatches every op of a forward pass: ~40 s for `qwen_vl_tiny` on a 2-core
    CPU). For sharded initialisation use `rftjax.sharding.init_sharded_params`.
    """
    return jax.jit(lambda key: nn.unbox(model_for(config).init(key, *dummy_inputs(config))["params"]))(rng)


def abstract_params(config: ModelConfig):
    """Shapes and dtypes of `init_params(config, ...)` as a pytree of `jax.ShapeDtypeStruct` (no compute)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def check_image_tokens(input_ids, config: ModelConfig, images) -> None:
    """Raise a ValueError (naming the row and both counts) unless each row's image placeholders match its
    image: `images` is LLaVA pixel values `[B, H, W, C]`, `QwenImages` / `QwenImageFeatures`, or None."""
    if isinstance(config, QwenVLConfig):
        qwen_vl.check_image_tokens(input_ids, config, None if images is None else images.grid_thw)
    else:
        vlm.check_image_tokens(input_ids, config, images is not None)


def placeholder_ids(config: ModelConfig) -> tuple[int, ...]:
    """Token ids a policy must never generate (image/video placeholders): the sampler suppresses them."""
    if isinstance(config, QwenVLConfig):
        return (config.image_token_id, config.video_token_id)
    return (config.image_token_id,)


def num_rows(images) -> int:
    """Rows of an image batch (LLaVA pixel array or `QwenImages`)."""
    return int(jax.tree.leaves(images)[0].shape[0])


# Leaves the model itself casts to the compute dtype before use (Linear kernels, embedding tables); norms
# and biases are used in float32 and stay as they are.
_CAST_LEAVES = ("kernel", "embed_tokens", "position_embedding")


def cast_for_compute(params: dict, config: ModelConfig) -> dict:
    """Params with the weights the model casts to `config.dtype` anyway cast once, up front.

    Numerically identical to passing the float32 params (the model would do the same casts inside every
    call), but a decode loop then reads half the bytes per step and skips a cast of every weight per
    token. A no-op when compute and param dtypes agree.
    """
    dtype = config.compute_dtype
    if dtype == config.params_dtype:
        return params

    def cast(path, x):
        name = getattr(path[-1], "key", None)
        return x.astype(jnp.dtype(dtype)) if name in _CAST_LEAVES else x

    return jax.tree_util.tree_map_with_path(cast, params)

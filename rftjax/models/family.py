"""Model families as plugins: one `Family` object per family, and the functions everything else calls.

A family (LLaVA in `rftjax.models.vlm`, Qwen2-VL / Qwen2.5-VL in `rftjax.models.qwen_vl`) registers one
`Family` with `register`: its config class, Linen module, dummy inputs, media processor, placeholder ids, HF
layout, LoRA targets, vision modules and parameter / FLOP / activation terms. The sampler, the trainer, the
planner, the data pipeline and the checkpoint code look the family up with `family_of(config)`; none of them
names a family. A new family is one module that calls `register` (tests/test_family.py registers a toy one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from rftjax.models import lora
from rftjax.models.llm import text_flops_per_token, text_param_count

Array = jax.Array


class ModelConfig(Protocol):
    """What every family's model config offers the rest of rftjax (frozen dataclasses: hashable, so they are
    static arguments of `jax.jit`): the decoder's `text` (`TextConfig`), `lora` (`LoraConfig` or None), the
    dtype names and their `compute_dtype` / `params_dtype`, `scan_layers`, `remat`, `replace`, `to_dict`."""

    text: Any
    lora: Any
    dtype: str
    param_dtype: str
    scan_layers: bool
    remat: bool

    @property
    def compute_dtype(self) -> Any: ...

    @property
    def params_dtype(self) -> Any: ...

    def replace(self, **kwargs) -> "ModelConfig": ...

    def to_dict(self) -> dict: ...


class VisionDims(NamedTuple):
    """What the planner's activation estimate needs of a vision tower, for its largest media item.

    Attributes:
      patches: tokens the tower attends over per item; hidden, depth, heads, mlp: its width, blocks, heads, MLP
      width; remat: whether the tower rematerialises its blocks when `config.remat` is on.
    """

    patches: int
    hidden: int
    depth: int
    heads: int
    mlp: int
    remat: bool


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything rftjax knows about one model family.

    Attributes:
      name: written as `"family"` by the config's `to_dict` (LLaVA configs write none: `"llava"` is the default).
      config_cls: the frozen config dataclass (`to_dict` / `from_dict`, `lora`, `text: TextConfig`, dtypes).
      module: `config -> nn.Module` (call contract of `rftjax.models.vlm.VLM`: `(media, input_ids,
        attention_mask, state=None, image_features=None, return_hidden=False) -> ModelOutput`, with
        `encode_images` and `init_state`).
      dummy_inputs: `(config, batch_size, text_len) -> (media, input_ids)` for `init`.
      media_input: `config -> ` the data pipeline's media processor (`rftjax.data.pipeline.SquareImages` /
        `QwenPatchImages`: `prompt_len`, `__call__`, `fit_batch`).
      placeholder_ids: `config -> ` token ids the policy must never generate (media placeholders).
      check_media_tokens: `(input_ids [B, T], config, media or None) -> None`, raising a ValueError (naming the
        row and both counts) when a row's placeholders do not match its media.
      media_param_count: `config -> ` parameters outside the decoder (vision tower, projector / merger).
      media_flops: `(config, image_tokens or None) -> ` forward FLOPs of the vision side for one image.
      vision_dims: `config -> VisionDims` (the planner's activation term).
      vision_modules: top-level param modules of the vision side (`optim.vision_lr_scale`, freezing).
      lora_vision_targets: module-path regex of the vision linears LoRA's `decoder+vision` / `vision` adapt.
      hf: the family's `rftjax.models.hf.HFLayout` (config parser/writer, tensor map, names), or None.
      needs_checkpoint_tokenizer: the packaged tokenizer cannot serve it (its chat template and special tokens
        come from `model.checkpoint`).
      augmentable: `data.augment` (square-image augmentations) applies to its images.
      media_shapes: `(config, n) -> ` the media batch of n items at the config's largest size, as a pytree of
        `jax.ShapeDtypeStruct` (ahead-of-time compilation: `rftjax.aot`); None: the family cannot be compiled
        ahead of time.
    """

    name: str
    config_cls: type
    module: Callable[[Any], nn.Module]
    dummy_inputs: Callable[..., tuple]
    media_input: Callable[[Any], Any]
    placeholder_ids: Callable[[Any], tuple[int, ...]]
    check_media_tokens: Callable[[Any, Any, Any], None]
    media_param_count: Callable[[Any], int]
    media_flops: Callable[[Any, int | None], float]
    vision_dims: Callable[[Any], VisionDims]
    vision_modules: tuple[str, ...]
    lora_vision_targets: str
    hf: Any = None
    needs_checkpoint_tokenizer: bool = False
    augmentable: bool = True
    media_shapes: Callable[[Any, int], Any] | None = None


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add `family` to the registry (replacing one of the same name) and return it.

    Raises:
      ValueError: another family already owns its config class.
    """
    for other in _FAMILIES.values():
        if other.config_cls is family.config_cls and other.name != family.name:
            raise ValueError(f"family {family.name!r}: config class {family.config_cls.__name__} already belongs "
                             f"to family {other.name!r}")
    _FAMILIES[family.name] = family
    return family


def families() -> tuple[Family, ...]:
    """The registered families, in registration order."""
    return tuple(_FAMILIES.values())


def family_of(config) -> Family:
    """The `Family` whose config class `config` is an instance of.

    Raises:
      TypeError: `config` is not the config of a registered family (names the registered ones).
    """
    for cls in type(config).__mro__:
        for family in _FAMILIES.values():
            if family.config_cls is cls:
                return family
    raise TypeError(f"not a model config: {type(config).__name__}; registered families: "
                    f"{ {f.name: f.config_cls.__name__ for f in _FAMILIES.values()} }")


def family_named(name: str) -> Family:
    """The registered family called `name`.

    Raises:
      ValueError: no such family (lists the registered ones).
    """
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def config_from_dict(d: dict):
    """The model config a config's `to_dict()` wrote (its `"family"` key; LLaVA when absent)."""
    family = family_named(d.get("family", "llava"))
    return family.config_cls.from_dict(d)


def model_for(config, train: bool = False) -> nn.Module:
    """The Linen module of `config`'s family, with LoRA adapters when `config.lora` is set
    (`rftjax.models.lora.adapt`: their params sit next to the kernels they adapt). `train=True` turns on the
    adapters' dropout (the call then takes `rngs={"dropout": key}`)."""
    family = family_of(config)
    module = family.module(config)
    if config.lora is None:
        return module
    return lora.adapt(module, config.lora, train=train, vision_targets=family.lora_vision_targets)


def uses_dropout(config) -> bool:
    """Whether training forward passes of `model_for(config, train=True)` need a `dropout` rng."""
    return config.lora is not None and config.lora.dropout > 0


def dummy_inputs(config, batch_size: int = 1, text_len: int = 4):
    """`(media, input_ids)` of the right kinds and shapes for `model_for(config).init`."""
    return family_of(config).dummy_inputs(config, batch_size, text_len)


def init_params(config, rng: Array) -> dict:
    """Randomly initialised, unboxed params of `model_for(config)` (leaves in `config.param_dtype`).

    One jitted program (an eager init dispatches every op of a forward pass: ~40 s for `qwen_vl_tiny` on a 2-core
    CPU). For sharded initialisation use `rftjax.sharding.init_sharded_params`.
    """
    return jax.jit(lambda key: nn.unbox(model_for(config).init(key, *dummy_inputs(config))["params"]))(rng)


def abstract_params(config):
    """Shapes and dtypes of `init_params(config, ...)` as a pytree of `jax.ShapeDtypeStruct` (no compute)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def abstract_state(config, batch_size: int, max_len: int):
    """Shapes and dtypes of the model's empty decode state (`init_state(batch_size, max_len)`; compute dtype)
    as a pytree of `jax.ShapeDtypeStruct` (no compute): what the planner counts."""
    model = family_of(config).module(config)
    return jax.eval_shape(lambda: model.init_state(batch_size, max_len))


def check_image_tokens(input_ids, config, images) -> None:
    """Raise a ValueError (naming the row and both counts) unless each row's media placeholders match its
    media (`images`: the family's media batch, or None for text only)."""
    family_of(config).check_media_tokens(input_ids, config, images)


def placeholder_ids(config) -> tuple[int, ...]:
    """Token ids a policy must never generate (image/video placeholders): the sampler suppresses them."""
    return tuple(family_of(config).placeholder_ids(config))


def vision_modules(config) -> tuple[str, ...]:
    """Top-level param modules of `config`'s vision side (`optim.vision_lr_scale`, a frozen vision tower)."""
    return family_of(config).vision_modules


def num_rows(images) -> int:
    """Rows of a media batch (any pytree whose leaves lead with the row axis)."""
    return int(jax.tree.leaves(images)[0].shape[0])


def param_count(config) -> int:
    """Total number of parameters of the model of `config` (embeddings included)."""
    return family_of(config).media_param_count(config) + text_param_count(config.text)


def forward_flops(config, seq_len: int, num_images: int = 1, image_tokens: int | None = None) -> float:
    """Forward FLOPs of one sequence of `seq_len` tokens (causal: mean context `(seq_len + 1) / 2`) with
    `num_images` images (of `image_tokens` LM tokens each where the family's images vary in size; default its
    largest)."""
    text = seq_len * text_flops_per_token(config.text, (seq_len + 1) / 2)
    return text + num_images * family_of(config).media_flops(config, image_tokens)


# Leaves the model itself casts to the compute dtype before use (Linear kernels, embedding tables); norms
# and biases are used in float32 and stay as they are.
_CAST_LEAVES = ("kernel", "embed_tokens", "position_embedding")


def cast_for_compute(params: dict, config) -> dict:
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

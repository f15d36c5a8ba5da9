"""Model configuration: `VisionConfig`, `TextConfig`, `VLMConfig`, presets, parameter and FLOP counts.

Configs are frozen dataclasses (hashable, so they can be static attributes of Linen modules and static
arguments of `jax.jit`), validated in `__post_init__` with errors that name the field and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP-style ViT encoder (HF `SiglipVisionConfig`).

    Images are `[B, image_size, image_size, num_channels]` (channels last), cut into
    `(image_size // patch_size) ** 2` patches, each one image token of the LM.
    """

    image_size: int = 64
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_layers: int = 6
    num_heads: int = 4
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        _check_positive(self, "image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
                        "num_layers", "num_heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig.image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}; pick sizes that divide")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"VisionConfig.hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}")

    @property
    def num_patches(self) -> int:
        """Number of patches (= image tokens) per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Llama/Qwen2-style decoder (HF `LlamaConfig` / `Qwen2Config`).

    `head_dim` defaults to `hidden_size // num_heads`. `qkv_bias` is Qwen2's bias on q/k/v; `o_bias` together
    with `qkv_bias` is Llama's `attention_bias=True`. `rope_theta` is the RoPE base (Llama 1e4, Qwen2 1e6).
    """

    vocab_size: int = 512
    hidden_size: int = 384
    intermediate_size: int = 1152
    num_layers: int = 8
    num_heads: int = 6
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    max_position_embeddings: int = 4096

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        _check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                        "num_kv_heads", "head_dim", "max_position_embeddings")
        if self.num_kv_heads > self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"TextConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"TextConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0:
            raise ValueError(f"TextConfig.rope_theta must be > 0, got {self.rope_theta}")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """LLaVA layout: vision encoder + 2-layer GELU projector + decoder LM.

    Attributes:
      vision, text: the two towers.
      image_token_id: id of the image placeholder token in the LM vocabulary; each image expands to
        `vision.num_patches` such tokens, replaced by the projected patch features in order.
      vision_feature_layer: which ViT hidden state feeds the projector, indexing
        `[embeddings, block_1, ..., block_L]` as HF does (-1: last block's output, before the post-LayerNorm).
      projector_bias: biases on both projector layers (HF `multimodal_projector_bias`).
      dtype: compute dtype name (`float32`, `bfloat16`); params are stored in `param_dtype`. Logits are
        always returned in float32.
      scan_layers: run the decoder layers with `nn.scan` (params stacked on a leading `layers` axis):
        compile time independent of depth.
      remat: rematerialise each decoder layer in the backward pass (less memory, ~1/3 more compute).
    """

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 3
    vision_feature_layer: int = -1
    projector_bias: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: bool = False

    def __post_init__(self):
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"VLMConfig.image_token_id={self.image_token_id} must be a token id in "
                             f"[0, text.vocab_size={self.text.vocab_size})")
        n_states = self.vision.num_layers + 1
        if not -n_states <= self.vision_feature_layer < n_states:
            raise ValueError(f"VLMConfig.vision_feature_layer={self.vision_feature_layer} is out of range for "
                             f"{n_states} ViT hidden states (embeddings + {self.vision.num_layers} blocks)")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"VLMConfig.{name}={getattr(self, name)!r}; choose one of {sorted(_DTYPES)}")

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def num_image_tokens(self) -> int:
        """Image placeholder tokens per image (= ViT patches)."""
        return self.vision.num_patches

    def replace(self, **kwargs) -> "VLMConfig":
        """A copy with fields replaced (`vision=`/`text=` may be dicts of their fields)."""
        for name, cls in (("vision", VisionConfig), ("text", TextConfig)):
            if isinstance(kwargs.get(name), dict):
                kwargs[name] = dataclasses.replace(getattr(self, name), **kwargs[name])
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        d = dict(d)
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


PRESETS: dict[str, VLMConfig] = {
    # For unit tests: compiles in seconds; GQA (4 heads, 2 kv heads).
    "tiny": VLMConfig(
        vision=VisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4),
        text=TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2),
        image_token_id=3,
    ),
    # ~19M parameters: the CPU demo (64x64 images, 64 image tokens, the packaged 403-token tokenizer).
    "default": VLMConfig(),
    # ~150M parameters: the "larger model" of the update-step benchmark.
    "large": VLMConfig(
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=512, intermediate_size=2048, num_layers=8,
                            num_heads=8),
        text=TextConfig(vocab_size=2048, hidden_size=768, intermediate_size=2048, num_layers=16, num_heads=12,
                        num_kv_heads=4),
    ),
}


def get_preset(name: str, **overrides) -> VLMConfig:
    """The preset `name` (`tiny`, `default`, `large`), with fields replaced by `overrides`.

    Raises:
      ValueError: unknown preset name.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# ----------------------------------------------------------------------------------------------------------
# Parameter and FLOP counts (analytic; tests check them against initialised params).


def vision_param_count(v: VisionConfig) -> int:
    d, m = v.hidden_size, v.intermediate_size
    patch = v.patch_size * v.patch_size * v.num_channels * d + d
    pos = v.num_patches * d
    block = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 2 * 2 * d
    return patch + pos + v.num_layers * block + 2 * d


def text_param_count(t: TextConfig) -> int:
    d, m, hd = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    attn = d * q + 2 * d * kv + q * d
    if t.qkv_bias:
        attn += q + 2 * kv
    if t.o_bias:
        attn += d
    block = attn + 3 * d * m + 2 * d
    emb = t.vocab_size * d
    return emb + t.num_layers * block + d + (0 if t.tie_word_embeddings else emb)


def projector_param_count(c: VLMConfig) -> int:
    dv, d = c.vision.hidden_size, c.text.hidden_size
    return dv * d + d * d + (2 * d if c.projector_bias else 0)


def param_count(c: VLMConfig) -> int:
    """Total number of parameters of `VLM(c)` (embeddings included)."""
    return vision_param_count(c.vision) + projector_param_count(c) + text_param_count(c.text)


def text_flops_per_token(t: TextConfig, context_len: int) -> float:
    """Forward FLOPs of the decoder per token at a mean attended context of `context_len` tokens.

    Counts matmuls only (2 FLOPs per multiply-add): the layer weights, the LM head, and attention
    (`QK^T` and `AV`, `2 * 2 * num_heads * head_dim * context_len` per layer). The embedding lookup is free.
    Backward is ~2x forward, so a training step costs ~3x this per token (the PaLM/MaxText MFU convention).
    """
    d, m, hd = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    layer = 2 * (d * q + 2 * d * kv + q * d + 3 * d * m) + 4 * q * context_len
    return float(t.num_layers * layer + 2 * d * t.vocab_size)


def vision_flops_per_image(c: VLMConfig) -> float:
    """Forward FLOPs of ViT + projector for one image (matmuls only, incl. patch embedding and attention)."""
    v = c.vision
    p, d, m = v.num_patches, v.hidden_size, v.intermediate_size
    patch = 2 * p * v.patch_size * v.patch_size * v.num_channels * d
    block = 2 * p * (4 * d * d + 2 * d * m) + 4 * p * p * d
    proj = 2 * p * (d * c.text.hidden_size + c.text.hidden_size ** 2)
    return float(patch + v.num_layers * block + proj)


def forward_flops(c: VLMConfig, seq_len: int, num_images: int = 1) -> float:
    """Forward FLOPs of one sequence of `seq_len` tokens (causal: mean context `(seq_len + 1) / 2`) with
    `num_images` images."""
    return seq_len * text_flops_per_token(c.text, (seq_len + 1) / 2) + num_images * vision_flops_per_image(c)

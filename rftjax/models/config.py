"""Model configuration: `VisionConfig`, `TextConfig`, `VLMConfig`, presets, parameter and FLOP counts.

Configs are frozen dataclasses (hashable, so they can be static attributes of Linen modules and static
arguments of `jax.jit`), validated in `__post_init__` with errors that name the field and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rftjax.models.common import QUERY_BLOCK
from rftjax.models.lora import LoraConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {"full": None, "dots": "dots_with_no_batch_dims_saveable", "dots_all": "dots_saveable"}
"""`remat_policy` names -> `jax.checkpoint_policies` attribute: `full` keeps only each layer's input and recomputes
the layer in the backward pass (least memory); `dots` also keeps the weight matmuls' outputs (MaxText's
`minimal`: less recompute, more memory); `dots_all` keeps every matmul output, the attention scores too."""


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ModelConfig:
    """What the model configs share: how the model computes and trains, and `replace` with nested
    `vision=`/`text=` dicts. These fields are keyword-only (they come after a family's own fields).

    Attributes:
      dtype: compute dtype name (`float32`, `bfloat16`); params are stored in `param_dtype`. Logits are
        always returned in float32.
      scan_layers: run the decoder layers with `nn.scan` (params stacked on a leading `layers` axis), and a
        Qwen-VL vision tower's blocks (`visual/blocks`): compile time independent of depth.
      remat: rematerialise each decoder layer (and ViT block) in the backward pass (less memory, ~1/3 more
        compute), keeping what `remat_policy` says (`REMAT_POLICIES`).
      lora: a `LoraConfig` (or its dict): `model_for` adds LoRA adapters (`rftjax.models.lora`); None: no adapters.
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "full"
    lora: LoraConfig | None = None

    def _check_dtypes(self) -> None:
        """Validate the dtype names and the remat policy; turn a `lora` dict into a `LoraConfig`."""
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r}; choose one of "
                                 f"{sorted(_DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"{type(self).__name__}.remat_policy={self.remat_policy!r}; choose one of "
                             f"{sorted(REMAT_POLICIES)}")
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))

    @property
    def checkpoint_policy(self):
        """The `jax.checkpoint` policy of `remat_policy` (None: save nothing, recompute the whole layer)."""
        name = REMAT_POLICIES[self.remat_policy]
        return None if name is None else getattr(jax.checkpoint_policies, name)

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **kwargs):
        """A copy with fields replaced (`vision=`/`text=` may be dicts of their fields)."""
        for name in ("vision", "text", "lora"):
            if isinstance(kwargs.get(name), dict) and getattr(self, name) is not None:
                kwargs[name] = dataclasses.replace(getattr(self, name), **kwargs[name])
        return dataclasses.replace(self, **kwargs)


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
    `mrope_section`: Qwen2-VL's multimodal RoPE (M-RoPE): how many of the `head_dim / 2` rotary frequencies
    take the temporal, height and width position (HF `rope_parameters["mrope_section"]`); None: 1-D RoPE.
    `mrope_interleaved`: Qwen3-VL's interleaved M-RoPE: frequency j takes the height position when `j % 3 == 1`
    and `j < 3 * mrope_section[1]`, the width position when `j % 3 == 2` and `j < 3 * mrope_section[2]`, the
    temporal one otherwise (HF `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`); False: the sections are
    contiguous runs (Qwen2-VL). `qk_norm`: Qwen3's RMSNorm over each head's query and key before RoPE.
    `layer_pattern`: the repeating block of decoder layer kinds (`rftjax.models.llm.LAYER_KINDS`; layer i has
    kind `layer_pattern[i % len(layer_pattern)]`); `("attention",)` is the Llama/Qwen2/Qwen3 decoder, Qwen3.5's
    is `("gated_delta_net",) * 3 + ("attention",)`.

    Qwen3.5 switches: `zero_centered_norm`: every RMSNorm of the decoder scales by `1 + w` with `w` initialised
    to 0 (HF `Qwen3_5RMSNorm`); `attn_output_gate`: the query projection gives `[query | gate]` per head and the
    attention output is multiplied by `sigmoid(gate)` (gated attention); `partial_rotary_factor`: RoPE turns only
    the first `rotary_dim = head_dim * factor` dims of each head (`mrope_section` then sums to `rotary_dim / 2`).
    Gated DeltaNet layers (`rftjax.models.gated_delta_net`): `linear_num_key_heads` query/key heads of
    `linear_key_head_dim` and `linear_num_value_heads` (a multiple) value heads of `linear_value_head_dim`, a
    causal depthwise convolution of `linear_conv_kernel` taps.
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
    mrope_section: tuple[int, ...] | None = None
    mrope_interleaved: bool = False
    qk_norm: bool = False
    layer_pattern: tuple[str, ...] = ("attention",)
    zero_centered_norm: bool = False
    attn_output_gate: bool = False
    partial_rotary_factor: float = 1.0
    linear_conv_kernel: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32

    def __post_init__(self):
        object.__setattr__(self, "layer_pattern", tuple(str(k) for k in self.layer_pattern))
        if not self.layer_pattern or self.num_layers % len(self.layer_pattern):
            raise ValueError(f"TextConfig.layer_pattern={self.layer_pattern} must be a non-empty repeating block of "
                             f"layer kinds whose length divides num_layers={self.num_layers}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
            if len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.rotary_dim:
                raise ValueError(f"TextConfig.mrope_section={self.mrope_section} must be 3 ints (temporal, height, "
                                 f"width) summing to rotary_dim / 2 = {self.rotary_dim // 2} (head_dim * "
                                 f"partial_rotary_factor / 2)")
        elif self.mrope_interleaved:
            raise ValueError("TextConfig.mrope_interleaved needs mrope_section (3 ints summing to head_dim / 2)")
        _check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                        "num_kv_heads", "head_dim", "max_position_embeddings")
        if self.num_kv_heads > self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"TextConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.rotary_dim % 2 or not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"TextConfig.head_dim={self.head_dim} * partial_rotary_factor="
                             f"{self.partial_rotary_factor} must be an even number of dims in (0, head_dim] for RoPE")
        if "gated_delta_net" in self.layer_pattern:
            _check_positive(self, "linear_conv_kernel", "linear_key_head_dim", "linear_value_head_dim",
                            "linear_num_key_heads", "linear_num_value_heads")
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise ValueError(f"TextConfig.linear_num_value_heads={self.linear_num_value_heads} must be a multiple "
                                 f"of linear_num_key_heads={self.linear_num_key_heads}")
        if self.rope_theta <= 0:
            raise ValueError(f"TextConfig.rope_theta must be > 0, got {self.rope_theta}")

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The layer kind of every layer, `[num_layers]` (`layer_pattern` repeated)."""
        return tuple(self.layer_pattern[i % len(self.layer_pattern)] for i in range(self.num_layers))

    @property
    def rotary_dim(self) -> int:
        """Dims of each attention head that RoPE turns (the first ones): `head_dim * partial_rotary_factor`."""
        return int(self.head_dim * self.partial_rotary_factor)


@dataclasses.dataclass(frozen=True)
class VLMConfig(_ModelConfig):
    """LLaVA layout: vision encoder + 2-layer GELU projector + decoder LM.

    Attributes:
      vision, text: the two towers.
      image_token_id: id of the image placeholder token in the LM vocabulary; each image expands to
        `vision.num_patches` such tokens, replaced by the projected patch features in order.
      vision_feature_layer: which ViT hidden state feeds the projector, indexing
        `[embeddings, block_1, ..., block_L]` as HF does (-1: last block's output, before the post-LayerNorm).
      projector_bias: biases on both projector layers (HF `multimodal_projector_bias`).
      dtype, param_dtype, scan_layers, remat, remat_policy, lora: see `_ModelConfig`.
    """

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 3
    vision_feature_layer: int = -1
    projector_bias: bool = True

    def __post_init__(self):
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"VLMConfig.image_token_id={self.image_token_id} must be a token id in "
                             f"[0, text.vocab_size={self.text.vocab_size})")
        n_states = self.vision.num_layers + 1
        if not -n_states <= self.vision_feature_layer < n_states:
            raise ValueError(f"VLMConfig.vision_feature_layer={self.vision_feature_layer} is out of range for "
                             f"{n_states} ViT hidden states (embeddings + {self.vision.num_layers} blocks)")
        self._check_dtypes()

    @property
    def num_image_tokens(self) -> int:
        """Image placeholder tokens per image (= ViT patches)."""
        return self.vision.num_patches

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        d = dict(d)
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower (HF `Qwen2_5_VLVisionConfig`, `Qwen2VLVisionConfig`,
    `Qwen3VLVisionConfig`).

    An image resized to multiples of `patch_size * spatial_merge_size` px is cut into `grid_h x grid_w` patches of
    `temporal_patch_size x patch_size x patch_size x in_channels` values (a still image repeated over the
    temporal patch); `spatial_merge_size ** 2` neighbouring patches merge into one LM token.

    Attributes:
      depth, hidden_size, intermediate_size, num_heads: the ViT blocks (Qwen2-VL: `embed_dim`, and
        `intermediate_size = embed_dim * mlp_ratio`).
      out_hidden_size: width of the merged tokens fed to the LM (the LM's hidden size).
      window_size: side in pixels of the attention windows (Qwen2.5-VL 112 px = 4 x 4 merged tokens); None:
        every block attends over the whole image (Qwen2-VL).
      fullatt_block_indexes: blocks that attend over the whole image when windows are on.
      norm: `"rms"` (Qwen2.5-VL RMSNorm) or `"layer"` (Qwen2-VL LayerNorm), in the blocks and the merger's `ln_q`.
      gated_mlp: `down(act(gate(x)) * up(x))` (Qwen2.5-VL) or `fc2(act(fc1(x)))` (Qwen2-VL); both with biases.
      hidden_act: `"silu"` (Qwen2.5-VL) or `"quick_gelu"` (Qwen2-VL) or `"gelu"` or `"gelu_tanh"` (Qwen3-VL).
      rope_theta: base of the 2-D rotary embedding over (row, column) of each patch.
      patch_bias: the patch embedding has a bias (Qwen3-VL's Conv3d).
      num_position_embeddings: side ** 2 of Qwen3-VL's learned position-embedding table, resampled bilinearly
        (align_corners) to each image's patch grid and added after the patch embedding; None: none (Qwen2.x).
      deepstack_visual_indexes: blocks whose outputs pass their own merger (LayerNorm after the 2x2 merge) and
        are added to the decoder's hidden states at the image positions after decoder layers 0, 1, ...
        (Qwen3-VL's DeepStack, Meng et al. 2024); empty: none.
      tokens_per_second: Qwen2.5-VL's temporal M-RoPE rate: a video's temporal position advances
        `tokens_per_second * second_per_grid_t` per temporal patch (HF `vision_config.tokens_per_second`); None:
        by 1 (Qwen2-VL; Qwen3-VL timestamps its frames in text instead).
    """

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 2048
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int | None = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    norm: str = "rms"
    gated_mlp: bool = True
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    patch_bias: bool = False
    num_position_embeddings: int | None = None
    deepstack_visual_indexes: tuple[int, ...] = ()
    tokens_per_second: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        object.__setattr__(self, "deepstack_visual_indexes", tuple(int(i) for i in self.deepstack_visual_indexes))
        _check_positive(self, "depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                        "patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"QwenVisionConfig.hidden_size={self.hidden_size} / num_heads={self.num_heads} must "
                             f"be a head_dim divisible by 4 (2-D RoPE rotates head_dim/4 frequencies per axis)")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"QwenVisionConfig.norm={self.norm!r}; choose 'rms' or 'layer'")
        if self.hidden_act not in _VISION_ACTS:
            raise ValueError(f"QwenVisionConfig.hidden_act={self.hidden_act!r}; choose one of {sorted(_VISION_ACTS)}")
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size is not None and (self.window_size <= 0 or self.window_size % unit):
            raise ValueError(f"QwenVisionConfig.window_size={self.window_size} must be a positive multiple of "
                             f"patch_size * spatial_merge_size = {unit} px, or None (no windows)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"QwenVisionConfig.fullatt_block_indexes has {bad} outside [0, depth={self.depth})")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"QwenVisionConfig.deepstack_visual_indexes has {bad} outside [0, depth={self.depth})")
        if self.deepstack_visual_indexes and self.window_size is not None:
            raise ValueError("QwenVisionConfig.deepstack_visual_indexes needs window_size=None (Qwen3-VL attends over "
                             "whole frames; windows with DeepStack exist in no published model)")
        side = self.position_grid_side
        if self.num_position_embeddings is not None and (side < 2 or side * side != self.num_position_embeddings):
            raise ValueError(f"QwenVisionConfig.num_position_embeddings={self.num_position_embeddings} must be the "
                             f"square of an int >= 2 (a square table of learned position embeddings), or None")

    @property
    def position_grid_side(self) -> int:
        """Side of the learned position-embedding table (0 without one)."""
        return int(round((self.num_position_embeddings or 0) ** 0.5))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch: `in_channels * temporal_patch_size * patch_size ** 2` (1176 for the published models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        """Patches per LM token (`spatial_merge_size ** 2`)."""
        return self.spatial_merge_size ** 2

    @property
    def window_units(self) -> int | None:
        """Side of an attention window in merged tokens (`window_size / patch_size / spatial_merge_size`)."""
        return None if self.window_size is None else self.window_size // self.patch_size // self.spatial_merge_size

    def is_windowed(self, block: int) -> bool:
        """Whether block `block` attends within windows (else over its whole image)."""
        return self.window_size is not None and block not in self.fullatt_block_indexes


_VISION_ACTS = ("silu", "quick_gelu", "gelu", "gelu_tanh")
QWEN3_MODEL_TYPES = ("qwen3_vl", "qwen3_5")
"""Qwen-VL model types with Qwen3's vision tower (patch 16, position table) and decoder (q/k norms, interleaved
M-RoPE)."""
QWEN_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", *QWEN3_MODEL_TYPES)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class QwenVLConfig(_ModelConfig):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5: dynamic-resolution vision tower + patch merger + decoder with
    M-RoPE (Qwen2's; Qwen3's with q/k norms, interleaved M-RoPE and DeepStack; Qwen3.5's Gated DeltaNet and
    gated-attention layers).

    Attributes:
      vision, text: the two towers (`text.mrope_section` set: the decoder uses 3-D positions).
      model_type: `"qwen2_5_vl"`, `"qwen2_vl"`, `"qwen3_vl"` or `"qwen3_5"` (the HF family written on export).
      image_token_id, video_token_id, vision_start_token_id, vision_end_token_id: special token ids; each
        image is `<|vision_start|>` + `grid_t * grid_h * grid_w / 4` image tokens + `<|vision_end|>`.
      max_image_tokens: the media tokens a row can hold (all its images and video frames), in LM tokens (merged
        patches): the static patch budget per row is `max_image_tokens * spatial_merge_size ** 2`. Images are
        resized (aspect ratio kept) to at most `max_image_tokens * (patch_size * spatial_merge_size) ** 2` pixels.
      max_media_items: grid rows per row: images + videos (Qwen3-VL: + each video's temporal patches); rows
        with more are dropped from file datasets and counted.
      text_after_video: where M-RoPE positions continue after a video of several temporal patches: `spatial`
        (transformers 5's `get_rope_index`: `max(h, w) / 2` past the video's start, as after an image) or `max`
        (Qwen's reference code and transformers 4: one past the video's largest position on any axis, its
        temporal one included). The two differ only for Qwen2.5-VL / Qwen2-VL videos whose temporal positions
        outgrow their spatial grid.
      image_token_buckets: smaller budgets a batch may be padded to (each a separate compilation); the batch
        takes the smallest bucket that holds its largest image. Empty: always `max_image_tokens`.
      image_mean, image_std: the image processor's per-channel normalisation (None: the family's, OpenAI CLIP's
        for Qwen2.x, 0.5 for Qwen3-VL / Qwen3.5; a checkpoint's `preprocessor_config.json` sets them when loaded).
      min_pixels: the processor's smallest image area in px (None: the family's, 56 * 56 for Qwen2.x and
        65536 for Qwen3-VL / Qwen3.5), capped at `max_pixels`.
      dtype, param_dtype, scan_layers, remat, remat_policy, lora: see `_ModelConfig` (scan applies to the decoder and the vision tower).
    """

    vision: QwenVisionConfig = dataclasses.field(default_factory=QwenVisionConfig)
    text: TextConfig = dataclasses.field(default_factory=lambda: TextConfig(mrope_section=(16, 24, 24)))
    model_type: str = "qwen2_5_vl"
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    max_image_tokens: int = 1024
    max_media_items: int = 1
    text_after_video: str = "spatial"
    image_token_buckets: tuple[int, ...] = ()
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    min_pixels: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "image_token_buckets", tuple(int(b) for b in self.image_token_buckets))
        if self.model_type not in QWEN_MODEL_TYPES:
            raise ValueError(f"QwenVLConfig.model_type={self.model_type!r}; choose one of {QWEN_MODEL_TYPES}")
        qwen3 = self.model_type in QWEN3_MODEL_TYPES
        for name, default in (("image_mean", (0.5,) * 3 if qwen3 else OPENAI_CLIP_MEAN),
                              ("image_std", (0.5,) * 3 if qwen3 else OPENAI_CLIP_STD)):
            value = getattr(self, name)
            object.__setattr__(self, name, default if value is None else tuple(float(x) for x in value))
            if len(getattr(self, name)) != self.vision.in_channels:
                raise ValueError(f"QwenVLConfig.{name}={getattr(self, name)} needs one value per channel "
                                 f"({self.vision.in_channels})")
        if self.min_pixels is None:
            object.__setattr__(self, "min_pixels", 65536 if qwen3 else 56 * 56)
        if self.model_type == "qwen2_5_vl" and self.vision.tokens_per_second is None:  # HF's default
            object.__setattr__(self, "vision", dataclasses.replace(self.vision, tokens_per_second=4))
        if self.text_after_video not in ("spatial", "max"):
            raise ValueError(f"QwenVLConfig.text_after_video={self.text_after_video!r}; choose 'spatial' "
                             f"(transformers 5) or 'max' (Qwen's reference code)")
        if self.text.mrope_section is None:
            raise ValueError("QwenVLConfig.text.mrope_section is None; Qwen-VL decoders use M-RoPE (3 ints summing "
                             "to head_dim / 2, e.g. (16, 24, 24))")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"QwenVLConfig.vision.out_hidden_size={self.vision.out_hidden_size} must equal "
                             f"text.hidden_size={self.text.hidden_size}")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, name) < self.text.vocab_size:
                raise ValueError(f"QwenVLConfig.{name}={getattr(self, name)} must be a token id in "
                                 f"[0, text.vocab_size={self.text.vocab_size})")
        _check_positive(self, "max_image_tokens", "max_media_items")
        bad = [b for b in self.image_token_buckets if not 0 < b <= self.max_image_tokens]
        if bad:
            raise ValueError(f"QwenVLConfig.image_token_buckets has {bad} outside (0, max_image_tokens="
                             f"{self.max_image_tokens}]")
        self._check_dtypes()

    @property
    def buckets(self) -> tuple[int, ...]:
        """Image-token budgets a batch may be padded to, ascending (the last is `max_image_tokens`)."""
        return tuple(sorted(set(self.image_token_buckets) | {self.max_image_tokens}))

    @property
    def max_pixels(self) -> int:
        """Largest image area (px) that fits `max_image_tokens`."""
        return self.max_image_tokens * (self.vision.patch_size * self.vision.spatial_merge_size) ** 2

    def to_dict(self) -> dict:
        return {"family": "qwen_vl", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "QwenVLConfig":
        d = {k: v for k, v in d.items() if k != "family"}
        return cls(vision=QwenVisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


def _qwen2_5_vl(out: int, text: TextConfig) -> QwenVLConfig:
    return QwenVLConfig(vision=QwenVisionConfig(out_hidden_size=out), text=text)


def _qwen2_vl(text: TextConfig) -> QwenVLConfig:
    vision = QwenVisionConfig(hidden_size=1280, intermediate_size=5120, num_heads=16, depth=32,
                              out_hidden_size=text.hidden_size, window_size=None, fullatt_block_indexes=(),
                              norm="layer", gated_mlp=False, hidden_act="quick_gelu")
    return QwenVLConfig(vision=vision, text=text, model_type="qwen2_vl")


def _qwen_text(vocab, hidden, inter, layers, heads, kv, tie) -> TextConfig:
    return TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                      qkv_bias=True, max_position_embeddings=128000, mrope_section=(16, 24, 24))


def _qwen3_vl(text_dims: tuple, tie: bool, vision_dims: tuple, deepstack: tuple[int, ...]) -> QwenVLConfig:
    hidden, inter, layers, heads, kv = text_dims
    depth, v_hidden, v_inter = vision_dims
    text = TextConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv, head_dim=128, rope_theta=5e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=tie, max_position_embeddings=262144, mrope_section=(24, 20, 20),
                      mrope_interleaved=True, qk_norm=True)
    vision = QwenVisionConfig(depth=depth, hidden_size=v_hidden, intermediate_size=v_inter, num_heads=16,
                              out_hidden_size=hidden, patch_size=16, window_size=None, fullatt_block_indexes=(),
                              norm="layer", gated_mlp=False, hidden_act="gelu_tanh", patch_bias=True,
                              num_position_embeddings=2304, deepstack_visual_indexes=deepstack)
    return QwenVLConfig(vision=vision, text=text, model_type="qwen3_vl")


def _qwen3_5(text_dims: tuple, linear_value_heads: int, tie: bool, vision_dims: tuple) -> QwenVLConfig:
    hidden, inter, layers, heads, kv = text_dims
    depth, v_hidden, v_inter, v_heads = vision_dims
    text = TextConfig(vocab_size=248320, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv, head_dim=256, rope_theta=1e7, rms_norm_eps=1e-6,
                      tie_word_embeddings=tie, max_position_embeddings=262144, mrope_section=(11, 11, 10),
                      mrope_interleaved=True, qk_norm=True, layer_pattern=("gated_delta_net",) * 3 + ("attention",),
                      zero_centered_norm=True, attn_output_gate=True, partial_rotary_factor=0.25,
                      linear_conv_kernel=4, linear_key_head_dim=128, linear_value_head_dim=128,
                      linear_num_key_heads=16, linear_num_value_heads=linear_value_heads)
    vision = QwenVisionConfig(depth=depth, hidden_size=v_hidden, intermediate_size=v_inter, num_heads=v_heads,
                              out_hidden_size=hidden, patch_size=16, window_size=None, fullatt_block_indexes=(),
                              norm="layer", gated_mlp=False, hidden_act="gelu_tanh", patch_bias=True,
                              num_position_embeddings=2304)
    return QwenVLConfig(vision=vision, text=text, model_type="qwen3_5", image_token_id=248056,
                        video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054)


PRESETS: dict[str, VLMConfig | QwenVLConfig] = {
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
    # The published Qwen shapes (HF Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct, Qwen/Qwen2-VL-2B/7B-Instruct).
    "qwen2_5_vl_3b": _qwen2_5_vl(2048, _qwen_text(151936, 2048, 11008, 36, 16, 2, True)),
    "qwen2_5_vl_7b": _qwen2_5_vl(3584, _qwen_text(152064, 3584, 18944, 28, 28, 4, False)),
    "qwen2_vl_2b": _qwen2_vl(_qwen_text(151936, 1536, 8960, 28, 12, 2, True)),
    "qwen2_vl_7b": _qwen2_vl(_qwen_text(152064, 3584, 18944, 28, 28, 4, False)),
    # Qwen/Qwen3-VL-2B-Instruct, -4B-Instruct, -8B-Instruct (their config.json on the Hub).
    "qwen3_vl_2b": _qwen3_vl((2048, 6144, 28, 16, 8), True, (24, 1024, 4096), (5, 11, 17)),
    "qwen3_vl_4b": _qwen3_vl((2560, 9728, 36, 32, 8), True, (24, 1024, 4096), (5, 11, 17)),
    "qwen3_vl_8b": _qwen3_vl((4096, 12288, 36, 32, 8), False, (27, 1152, 4304), (8, 16, 24)),
    # A Qwen2.5-VL for unit tests: 2 vision blocks (one windowed, one full), 4 x 4-token windows; 112 px images.
    "qwen_vl_tiny": QwenVLConfig(
        vision=QwenVisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32,
                                window_size=56, fullatt_block_indexes=(1,)),
        text=TextConfig(vocab_size=160, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, qkv_bias=True, rope_theta=1e6, mrope_section=(1, 1, 2)),
        image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153,
        max_image_tokens=64),
    # Qwen/Qwen3.5-0.8B, -2B, -4B, -9B (config.json on the Hub; -2B's text from its model card, its vision tower
    # assumed equal to -4B's).
    "qwen3_5_0_8b": _qwen3_5((1024, 3584, 24, 8, 2), 16, True, (12, 768, 3072, 12)),
    "qwen3_5_2b": _qwen3_5((2048, 6144, 24, 8, 2), 16, True, (24, 1024, 4096, 16)),
    "qwen3_5_4b": _qwen3_5((2560, 9216, 32, 16, 4), 32, True, (24, 1024, 4096, 16)),
    "qwen3_5_9b": _qwen3_5((4096, 12288, 32, 16, 4), 32, False, (27, 1152, 4304, 16)),
    # A Qwen3.5 for unit tests: Gated DeltaNet and gated attention alternating, GQA in both, partial rotary.
    "qwen3_5_tiny": QwenVLConfig(
        vision=QwenVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                patch_size=16, window_size=None, fullatt_block_indexes=(), norm="layer",
                                gated_mlp=False, hidden_act="gelu_tanh", patch_bias=True, num_position_embeddings=64),
        text=TextConfig(vocab_size=160, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=2,
                        num_kv_heads=1, head_dim=32, rope_theta=1e7, mrope_section=(2, 1, 1), mrope_interleaved=True,
                        qk_norm=True, layer_pattern=("gated_delta_net", "attention"), zero_centered_norm=True,
                        attn_output_gate=True, partial_rotary_factor=0.25, linear_key_head_dim=16,
                        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4),
        model_type="qwen3_5", image_token_id=150, video_token_id=151, vision_start_token_id=152,
        vision_end_token_id=153, max_image_tokens=64, min_pixels=32 * 32),
    # A Qwen3-VL for unit tests: 3 vision blocks with DeepStack after blocks 0 and 1, an 8 x 8 position table;
    # 64 px images are 4 tokens (min_pixels lowered from the published 65536).
    "qwen3_vl_tiny": QwenVLConfig(
        vision=QwenVisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                patch_size=16, window_size=None, fullatt_block_indexes=(), norm="layer",
                                gated_mlp=False, hidden_act="gelu_tanh", patch_bias=True, num_position_embeddings=64,
                                deepstack_visual_indexes=(0, 1)),
        text=TextConfig(vocab_size=160, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=16, rope_theta=5e6, mrope_section=(3, 3, 2), mrope_interleaved=True,
                        qk_norm=True),
        model_type="qwen3_vl", image_token_id=150, video_token_id=151, vision_start_token_id=152,
        vision_end_token_id=153, max_image_tokens=64, min_pixels=32 * 32),
}


def get_preset(name: str, **overrides) -> VLMConfig | QwenVLConfig:
    """The preset `name` (`tiny`, `default`, `large`, the Qwen presets), with fields replaced by `overrides`.

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


def attention_layer_params(t: TextConfig) -> int:
    """Parameters of one attention decoder layer (GQA projections with their biases, SwiGLU MLP, two RMSNorms)."""
    d, m, hd = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    attn = d * q * (2 if t.attn_output_gate else 1) + 2 * d * kv + q * d
    if t.qkv_bias:
        attn += q + 2 * kv
    if t.o_bias:
        attn += d
    if t.qk_norm:
        attn += 2 * hd
    return attn + 3 * d * m + 2 * d


def projector_param_count(c: VLMConfig) -> int:
    dv, d = c.vision.hidden_size, c.text.hidden_size
    return dv * d + d * d + (2 * d if c.projector_bias else 0)


def qwen_vision_param_count(v: QwenVisionConfig) -> int:
    """Parameters of the Qwen-VL vision tower incl. the patch merger."""
    d, m, merged = v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit
    norm = d if v.norm == "rms" else 2 * d
    mlp = 2 * (d * m + m) + (m * d + d) if v.gated_mlp else (d * m + m) + (m * d + d)
    block = 2 * norm + (d * 3 * d + 3 * d) + (d * d + d) + mlp
    merger_mlp = (merged * merged + merged) + (merged * v.out_hidden_size + v.out_hidden_size)
    deepstack = len(v.deepstack_visual_indexes) * (2 * merged + merger_mlp)  # LayerNorm after the merge
    embed = v.patch_dim * d + (d if v.patch_bias else 0) + (v.num_position_embeddings or 0) * d
    return embed + v.depth * block + norm + merger_mlp + deepstack


def mlp_activations(m: int, e: int) -> float:
    """Bytes per token a SwiGLU MLP of intermediate size `m` holds while its backward pass runs in an `e`-byte
    compute dtype: the gate and up projections' outputs in float32 (the matmuls' accumulation dtype, `Linear`)
    and four `[m]` intermediates in the compute dtype (what XLA keeps for Qwen2.5-VL-7B's layer on TPU)."""
    return float(m * (2 * 4 + 4 * e))


def attention_layer_activations(t: TextConfig, seq: int, e: int) -> tuple[float, float]:
    """`(bytes per token while the layer's backward pass runs, bytes per token of its matmul outputs)` of one
    attention decoder layer over `seq` tokens in an `e`-byte compute dtype (the planner's estimate, Korthikanti et
    al. 2022 sec. 4 for SwiGLU/GQA): norm, projection and MLP (`mlp_activations`) intermediates and the float32
    scores and probabilities of one block of `QUERY_BLOCK` queries (the attention runs one block at a time,
    `common.dot_product_attention`), spread over the `seq` tokens; the outputs of q, k, v, o, gate, up, down (what remat policy
    `dots` keeps)."""
    d, hd, h, k, m = t.hidden_size, t.head_dim, t.num_heads, t.num_kv_heads, t.intermediate_size
    per_token = e * (6 * d + 2 * h * hd + 4 * k * hd) + mlp_activations(m, e) + h * min(seq, QUERY_BLOCK) * (4 + e)
    return float(per_token), float(e * (h * hd + 2 * k * hd + d + 2 * m + d))


def attention_layer_flops(t: TextConfig, context_len: float) -> float:
    """Forward FLOPs per token of one attention decoder layer at a mean attended context of `context_len` tokens:
    matmuls only (2 FLOPs per multiply-add), the layer's weights and attention (`QK^T` and `AV`,
    `2 * 2 * num_heads * head_dim * context_len`)."""
    d, m, hd = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    q_proj = d * q * (2 if t.attn_output_gate else 1)
    return float(2 * (q_proj + 2 * d * kv + q * d + 3 * d * m) + 4 * q * context_len)


def vision_flops_per_image(c: VLMConfig) -> float:
    """Forward FLOPs of ViT + projector for one image (matmuls only, incl. patch embedding and attention)."""
    v = c.vision
    p, d, m = v.num_patches, v.hidden_size, v.intermediate_size
    patch = 2 * p * v.patch_size * v.patch_size * v.num_channels * d
    block = 2 * p * (4 * d * d + 2 * d * m) + 4 * p * p * d
    proj = 2 * p * (d * c.text.hidden_size + c.text.hidden_size ** 2)
    return float(patch + v.num_layers * block + proj)


def qwen_vision_flops(v: QwenVisionConfig, image_tokens: int) -> float:
    """Forward FLOPs of the Qwen-VL vision tower + merger for one image of `image_tokens` LM tokens.

    Matmuls only: patch embedding, per block the qkv/proj/MLP weights and attention (`4 * P * context * D`
    with context the whole image in full-attention blocks and one window, `(window_size / patch_size) ** 2`
    patches or the image if smaller, in windowed blocks: the work a windowed kernel does, not the dense
    masked attention rftjax runs today), and the merger MLPs (DeepStack's too).
    """
    p, d, m = image_tokens * v.merge_unit, v.hidden_size, v.intermediate_size
    window = p if v.window_size is None else min(p, (v.window_size // v.patch_size) ** 2)
    linear = 2 * p * (4 * d * d + (3 if v.gated_mlp else 2) * d * m)
    attn = sum(4 * p * (window if v.is_windowed(i) else p) * d for i in range(v.depth))
    merged = d * v.merge_unit
    mergers = 1 + len(v.deepstack_visual_indexes)
    merger = mergers * 2 * image_tokens * (merged * merged + merged * v.out_hidden_size)
    return float(2 * p * v.patch_dim * d + v.depth * linear + attn + merger)

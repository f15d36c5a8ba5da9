"""The multimodal policy: ViT encoder + 2-layer GELU projector + decoder LM (the LLaVA layout).

Image placeholder tokens (`config.image_token_id`) in `input_ids` take the projected image features, in
order: the j-th placeholder of row b gets feature j of image b. This equals HF LLaVA's `masked_scatter`
whenever every row holds exactly `num_image_tokens` placeholders, the only case HF accepts. Source:
Liu et al. 2023, "Visual Instruction Tuning"; transformers' `modeling_llava.py`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rftjax.models import hf
from rftjax.models.common import Linear, gelu_exact, local_rows, merge_image_features
from rftjax.models.config import VLMConfig, projector_param_count, vision_flops_per_image, vision_param_count
from rftjax.models.family import Family, VisionDims, register
from rftjax.models.llm import DecoderLM, DecoderState, ModelOutput, ModelStateMixin
from rftjax.models.vit import VisionTransformer

Array = jax.Array


class Projector(nn.Module):
    """LLaVA projector: `linear_2(gelu(linear_1(x)))`, `[B, P, D_v] -> [B, P, D]` (exact-erf GELU)."""

    out_features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = gelu_exact(Linear(self.out_features, ("embed", "mlp"), name="linear_1", **kw)(x))
        return Linear(self.out_features, ("mlp", "embed"), name="linear_2", **kw)(h)


def check_image_tokens(input_ids, config: VLMConfig, has_images: bool = True) -> None:
    """Raise a ValueError unless every row of `input_ids` `[B, T]` holds exactly `config.num_image_tokens`
    image placeholders (or none at all when `has_images` is False).

    Call it on host data before jitting (the VLM calls it itself whenever `input_ids` is concrete). The
    usual cause of a mismatch is a prompt truncated through its image tokens.
    """
    counts = np.sum(local_rows(input_ids) == config.image_token_id, axis=1)
    want = config.num_image_tokens if has_images else 0
    bad = np.nonzero(counts != want)[0]
    if bad.size:
        row = int(bad[0])
        if has_images:
            raise ValueError(
                f"image tokens and image features do not match: row {row} of input_ids has {int(counts[row])} "
                f"image tokens (id {config.image_token_id}) but its image gives {want} features "
                f"(vision.num_patches). A prompt truncated through its image tokens does this: raise the "
                f"maximum prompt length, or shorten the text.")
        raise ValueError(
            f"image tokens and image features do not match: row {row} of input_ids has {int(counts[row])} "
            f"image tokens (id {config.image_token_id}) but no image was given (0 features)")


class VLM(ModelStateMixin, nn.Module):
    """Vision-language policy model (LLaVA layout).

    Call:
      `VLM(config).apply({'params': params}, pixel_values, input_ids, attention_mask=None, state=None,
      image_features=None, return_hidden=False)`

      - pixel_values: float `[B, H, W, C]` normalised images (channels last), one per row, or None for a
        text-only call (decode steps).
      - input_ids: int32 `[B, T]`, with `num_image_tokens` placeholders per row where an image is given.
      - attention_mask: `[B, T]` (bool or 0/1), False on padding; default all True. Prompts are left-padded.
      - state: a `DecoderState` (see `init_state`) to continue from; the output then holds the new state.
      - image_features: precomputed `encode_images` output `[B, P, D]` instead of pixel_values (lets the
        sampler encode each image once and reuse it for the G samples of its group).

      - return_hidden: the decoder's final hidden states `[B, T, D]` instead of logits (value heads).

    Returns:
      `ModelOutput`: logits float32 `[B, T, V]` (or hidden), and the new state when given one.

    Raises:
      ValueError: (when input_ids is concrete, i.e. outside jit) a row's image-token count differs from the
        image's feature count; pixel_values of the wrong shape.
    """

    config: VLMConfig

    def setup(self):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        self.vision_tower = VisionTransformer(c.vision, dt, pdt)
        self.multi_modal_projector = Projector(c.text.hidden_size, c.projector_bias, dt, pdt)
        self.language_model = DecoderLM(c.text, dt, pdt, scan_layers=c.scan_layers, remat=c.remat,
                                        remat_policy=c.checkpoint_policy)

    def encode_images(self, pixel_values: Array) -> Array:
        """Projected image features `[B, P, D]` (compute dtype) of `pixel_values` `[B, H, W, C]`."""
        feats = self.vision_tower(pixel_values, feature_layer=self.config.vision_feature_layer)
        return self.multi_modal_projector(feats)

    def embed(self, input_ids: Array, image_features: Array | None) -> Array:
        """Token embeddings `[B, T, D]` with image placeholders replaced by `image_features` `[B, P, D]`."""
        embeds = self.language_model.embed(input_ids)
        if image_features is None:
            return embeds
        return merge_image_features(embeds, input_ids == self.config.image_token_id, image_features)

    def __call__(self, pixel_values, input_ids, attention_mask=None, state: DecoderState | None = None,
                 image_features=None, return_hidden: bool = False) -> ModelOutput:
        if pixel_values is not None and image_features is not None:
            raise ValueError("give pixel_values or image_features, not both")
        if not isinstance(input_ids, jax.core.Tracer):
            check_image_tokens(input_ids, self.config, pixel_values is not None or image_features is not None)
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        if image_features is not None and image_features.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{image_features.shape[0]} images for {input_ids.shape[0]} rows of input_ids: "
                             f"give one image per row")
        embeds = self.embed(input_ids, image_features)
        return self.language_model(None, attention_mask, inputs_embeds=embeds, state=state,
                                   return_hidden=return_hidden)


def dummy_inputs(config: VLMConfig, batch_size: int = 1, text_len: int = 4):
    """`(pixel_values, input_ids)` of the right shapes for `VLM.init`: one image + `text_len` text tokens."""
    v = config.vision
    pixels = jnp.zeros((batch_size, v.image_size, v.image_size, v.num_channels), jnp.float32)
    ids = jnp.concatenate([jnp.full((batch_size, config.num_image_tokens), config.image_token_id, jnp.int32),
                           jnp.zeros((batch_size, text_len), jnp.int32)], axis=1)
    return pixels, ids


def _media_input(config: VLMConfig):
    from rftjax.data.pipeline import SquareImages

    return SquareImages(config.vision.image_size, config.num_image_tokens)


def _vision_dims(c: VLMConfig) -> VisionDims:
    v = c.vision
    return VisionDims(v.num_patches, v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size, remat=False)


LLAVA = register(Family(
    name="llava", config_cls=VLMConfig, module=VLM, dummy_inputs=dummy_inputs, media_input=_media_input,
    placeholder_ids=lambda c: (c.image_token_id,),
    check_media_tokens=lambda ids, c, images: check_image_tokens(ids, c, images is not None),
    media_param_count=lambda c: vision_param_count(c.vision) + projector_param_count(c),
    media_flops=lambda c, image_tokens: vision_flops_per_image(c), vision_dims=_vision_dims,
    vision_modules=("vision_tower",),
    lora_vision_targets=r"vision_tower/layers_\d+/(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",  # SigLIP
    hf=hf.LLAVA, media_shapes=lambda c, n: jax.ShapeDtypeStruct(
        (n, c.vision.image_size, c.vision.image_size, c.vision.num_channels), jnp.float32)))
"""The LLaVA family: SigLIP ViT + GELU projector + Llama/Qwen2 decoder, square images."""

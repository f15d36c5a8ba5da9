"""The model-side seams: a toy family registered from this file alone runs through the sampler, the counts and the
config round trip; a test-only recurrent layer kind (gated linear attention) alternates with attention layers in a
`layer_pattern`, ignores left padding, and its cached decode equals its full forward, through `sampling.generate`
too (with finished rows dropped from the decode batch)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rftjax import batches, sampling, steps
from rftjax.models import (Family, LayerKind, TextConfig, config_from_dict, family_of, get_preset, init_params,
                           model_for, param_count, placeholder_ids, register, register_layer_kind)
from rftjax.models import family as family_lib
from rftjax.models.common import RMSNorm, merge_image_features
from rftjax.models.family import VisionDims
from rftjax.models.llm import DecoderLM, LayerInputs, ModelStateMixin


# ----------------------------------------------------------------------------------------------------------
# A toy family: each image is a feature vector, projected to one LM token.


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    text: TextConfig = TextConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                                  num_kv_heads=1)
    image_dim: int = 6
    image_token_id: int = 3
    lora: Any = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: bool = False
    compute_dtype = jnp.float32
    params_dtype = jnp.float32

    def replace(self, **kwargs) -> "ToyConfig":
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        return {"family": "toy", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ToyConfig":
        d = {k: v for k, v in d.items() if k != "family"}
        return cls(text=TextConfig(**d.pop("text")), **d)


class ToyVLM(ModelStateMixin, nn.Module):
    """Images `[B, image_dim]` -> one feature per row at the placeholder; the shared decoder."""

    config: ToyConfig

    def setup(self):
        self.projector = nn.Dense(self.config.text.hidden_size)
        self.language_model = DecoderLM(self.config.text)

    def encode_images(self, images):
        return self.projector(images)[:, None, :]

    def __call__(self, pixel_values, input_ids, attention_mask=None, state=None, image_features=None,
                 return_hidden=False):
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        embeds = self.language_model.embed(input_ids)
        if image_features is not None:
            embeds = merge_image_features(embeds, input_ids == self.config.image_token_id, image_features)
        return self.language_model(None, attention_mask, inputs_embeds=embeds, state=state,
                                   return_hidden=return_hidden)


def _toy_inputs(config, batch_size=1, text_len=4):
    ids = jnp.concatenate([jnp.full((batch_size, 1), config.image_token_id, jnp.int32),
                           jnp.zeros((batch_size, text_len), jnp.int32)], axis=1)
    return jnp.zeros((batch_size, config.image_dim)), ids


def _check_toy_tokens(input_ids, config, images):
    counts = np.sum(np.asarray(input_ids) == config.image_token_id, axis=1)
    want = 0 if images is None else 1
    if np.any(counts != want):
        raise ValueError(f"toy rows need {want} image token(s), got {counts.tolist()}")


TOY = Family(
    name="toy", config_cls=ToyConfig, module=ToyVLM, dummy_inputs=_toy_inputs, media_input=lambda c: None,
    placeholder_ids=lambda c: (c.image_token_id,), check_media_tokens=_check_toy_tokens,
    media_param_count=lambda c: c.image_dim * c.text.hidden_size + c.text.hidden_size,
    media_flops=lambda c, tokens: 2.0 * c.image_dim * c.text.hidden_size,
    vision_dims=lambda c: VisionDims(1, c.image_dim, 1, 1, c.image_dim, False), vision_modules=("projector",),
    lora_vision_targets="projector")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(family_lib, "_FAMILIES", dict(family_lib._FAMILIES))  # the registration ends with the test
    register(TOY)
    config = ToyConfig()
    return config, init_params(config, jax.random.key(0))


def _prompts(config, pads=(0, 2)):
    """Left-padded prompts `[B, T]` `[text][image token][text]` with their mask and toy images."""
    rng = np.random.default_rng(0)
    length = max(pads) + 6
    ids = np.zeros((len(pads), length), np.int32)
    for row, pad in enumerate(pads):
        ids[row, pad:] = np.concatenate([[7], [config.image_token_id], rng.integers(4, config.text.vocab_size,
                                                                                     length - pad - 2)])
    mask = np.arange(length)[None] >= np.asarray(pads)[:, None]
    images = rng.standard_normal((len(pads), config.image_dim)).astype(np.float32)
    return jnp.asarray(images), jnp.asarray(ids), jnp.asarray(mask)


def test_a_registered_toy_family_runs_through_the_house(toy):
    config, params = toy
    assert family_of(config) is TOY and placeholder_ids(config) == (config.image_token_id,)
    assert param_count(config) == sum(x.size for x in jax.tree.leaves(params))
    assert config_from_dict(config.to_dict()) == config
    images, ids, mask = _prompts(config)
    out = sampling.generate(params, config, images, ids, mask, jax.random.key(1),
        sampling.SamplingParams(group_size=3, max_new_tokens=5,
                            greedy=True))
    assert out.completion_ids.shape == (6, 5)
    assert not np.any(np.asarray(out.completion_ids) == config.image_token_id)  # placeholders suppressed
    # Greedy rows of one prompt agree; the image matters.
    np.testing.assert_array_equal(out.completion_ids[0], out.completion_ids[2])
    with pytest.raises(ValueError, match="toy rows need 1 image token"):
        sampling.generate(params, config, images, jnp.where(ids == config.image_token_id, 5, ids), mask,
                          jax.random.key(1))


def test_an_unregistered_config_is_named_in_the_error():
    with pytest.raises(TypeError, match="not a model config: ToyConfig"):
        model_for(ToyConfig())


# ----------------------------------------------------------------------------------------------------------
# A test-only recurrent layer kind: gated linear attention (Yang et al. 2024, "Gated Linear Attention
# Transformers", with a scalar gate per head): S_t = g_t S_{t-1} + k_t^T v_t, o_t = q_t S_t.


class GatedLinearAttention(nn.Module):
    """`x + out(o)` with `o_t = q_t S_t` over the row's real tokens; state `{'s': float32 [B, H, hd, hd]}`; padding
    tokens leave S unchanged (their outputs are never read)."""

    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, state, inputs: LayerInputs):
        c = self.config
        b, t, _ = x.shape
        h = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        q, k, v = (nn.Dense(c.num_heads * c.head_dim, name=n)(h).reshape(b, t, c.num_heads, c.head_dim) / 2
                   for n in ("q", "k", "v"))
        gate = jax.nn.sigmoid(nn.Dense(c.num_heads, name="gate")(h))  # [B, T, H]
        s0 = jnp.zeros((b, c.num_heads, c.head_dim, c.head_dim)) if state is None else state["s"]

        def step(s, xs):
            q_t, k_t, v_t, g_t, m_t = xs
            updated = g_t[..., None, None] * s + k_t[..., :, None] * v_t[..., None, :]
            s = jnp.where(m_t[:, None, None, None], updated, s)
            return s, jnp.einsum("bhk,bhkv->bhv", q_t, s)

        s, o = jax.lax.scan(step, s0, tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, gate, inputs.token_mask)))
        o = jnp.moveaxis(o, 0, 1).reshape(b, t, -1)
        return x + nn.Dense(c.hidden_size, name="out")(o), (None if state is None else {"s": s})


def _gla_params(c: TextConfig) -> int:
    d, inner = c.hidden_size, c.num_heads * c.head_dim
    return d + 3 * (d * inner + inner) + (d * c.num_heads + c.num_heads) + (inner * d + d)


def _gla_flops(c: TextConfig, context_len: float) -> float:
    d, inner = c.hidden_size, c.num_heads * c.head_dim
    return 2.0 * (4 * d * inner + d * c.num_heads) + 4.0 * inner * c.head_dim  # projections, k^T v and q S


register_layer_kind("gla", LayerKind(GatedLinearAttention, lambda c, b, max_len, dtype: {
    "s": jnp.zeros((b, c.num_heads, c.head_dim, c.head_dim), jnp.float32)}, _gla_params, _gla_flops))


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def hybrid(request):
    """The tiny LLaVA preset with a 4-layer decoder alternating GLA and attention layers, noisy params."""
    config = get_preset("tiny", scan_layers=request.param).replace(
        text={"num_layers": 4, "layer_pattern": ("gla", "attention")})
    params = init_params(config, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return config, params


def _llava_prompts(config, pads):
    rng = np.random.default_rng(2)
    p = config.num_image_tokens
    length = max(pads) + p + 5
    ids = np.zeros((len(pads), length), np.int32)
    for row, pad in enumerate(pads):
        ids[row, pad:] = np.concatenate([[9], np.full(p, config.image_token_id),
                                         rng.integers(4, config.text.vocab_size, length - pad - p - 1)])
    mask = np.arange(length)[None] >= np.asarray(pads)[:, None]
    v = config.vision
    pixels = rng.standard_normal((len(pads), v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    return jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask)


def test_hybrid_params_follow_the_pattern(hybrid):
    config, params = hybrid
    assert param_count(config) == sum(x.size for x in jax.tree.leaves(params))  # counted per layer kind
    lm = params["language_model"]
    if config.scan_layers:
        assert sorted(lm["layers"]) == ["attention_1", "gla_0"]
        assert lm["layers"]["gla_0"]["gate"]["kernel"].shape[0] == 2  # 4 layers = 2 scanned blocks
    else:
        assert "gate" in lm["layers_0"] and "q_proj" in lm["layers_1"] and "gate" in lm["layers_2"]


def test_recurrent_layers_do_not_absorb_left_padding(hybrid):
    config, params = hybrid
    model = model_for(config)
    pixels, ids, mask = _llava_prompts(config, (0,))
    pad = 3
    padded_ids = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), ids], axis=1)
    padded_mask = jnp.concatenate([jnp.zeros((1, pad), bool), mask], axis=1)
    a = model.apply({"params": params}, pixels, ids, mask).logits
    b = model.apply({"params": params}, pixels, padded_ids, padded_mask).logits
    np.testing.assert_allclose(b[:, pad:], a, atol=1e-5, rtol=0)


def test_hybrid_cached_decode_equals_full_forward(hybrid):
    config, params = hybrid
    model = model_for(config)
    pixels, prompt, prompt_mask = _llava_prompts(config, (0, 3))
    new = jax.random.randint(jax.random.key(3), (2, 5), 4, config.text.vocab_size)
    full = model.apply({"params": params}, pixels, jnp.concatenate([prompt, new], 1),
                       jnp.concatenate([prompt_mask, jnp.ones_like(new, bool)], 1)).logits
    out = model.apply({"params": params}, pixels, prompt, prompt_mask,
                      state=model.init_state(2, prompt.shape[1] + 7))
    decoded, state = [out.logits], out.state
    step = jax.jit(lambda p, ids, s: model.apply({"params": p}, None, ids, jnp.ones_like(ids, bool), state=s))
    for j in range(new.shape[1]):
        out = step(params, new[:, j:j + 1], state)
        decoded.append(out.logits)
        state = out.state
    cached = jnp.concatenate(decoded, axis=1)
    valid = jnp.concatenate([prompt_mask, jnp.ones_like(new, bool)], 1)
    np.testing.assert_allclose(cached[valid], full[valid], atol=1e-5, rtol=0)


def test_hybrid_model_samples_what_the_trainer_scores(hybrid):
    """`sampling.generate` on the hybrid decoder (16 rows: finished rows are dropped into an 8-row phase): its
    log-probs equal the trainer's full forward over prompt + completion within 1e-5."""
    config, params = hybrid
    pixels, ids, mask = _llava_prompts(config, (0, 3, 1, 2))
    out = sampling.generate(params, config, pixels, ids, mask, jax.random.key(5),
        sampling.SamplingParams(group_size=4, max_new_tokens=8,
                            eos_ids=(4, 5, 6, 7, 8, 9, 10, 11), compact=True))
    assert sampling.decode_sizes(16, True) == (16, 8)
    assert 0 < int(out.completion_mask.sum()) < out.completion_mask.size  # some rows end early
    g = 4
    seq = batches.SequenceBatch(pixel_values=jnp.repeat(pixels, g, 0), prompt_ids=jnp.repeat(ids, g, 0),
                              prompt_mask=jnp.repeat(mask, g, 0), completion_ids=out.completion_ids,
                              completion_mask=out.completion_mask)
    trainer, _ = steps.completion_logprobs(params, config, seq)
    np.testing.assert_allclose(trainer, out.model_logprobs, atol=1e-5, rtol=0)

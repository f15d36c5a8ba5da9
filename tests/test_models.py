"""The Flax VLM on its own: KV-cache decoding, causality, image conditioning, configs, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rftjax.models import (VLM, TextConfig, VisionConfig, VLMConfig, dummy_inputs, forward_flops, get_preset,
                           init_params, param_count, positions_from_mask, text_flops_per_token)
from rftjax.models.config import vision_flops_per_image


def _batch(config, seed=0, pad=(0, 3, 1), text_before=2, text_after=4):
    """Left-padded prompts `[B, T]` (each `[text][image x P][text]`), their mask, and random images."""
    rng = np.random.default_rng(seed)
    p = config.num_image_tokens
    length = max(pad) + text_before + p + text_after
    ids = np.zeros((len(pad), length), np.int32)
    mask = np.zeros((len(pad), length), bool)
    for row, n_pad in enumerate(pad):
        n_after = length - n_pad - text_before - p
        ids[row, n_pad:] = np.concatenate([rng.integers(4, config.text.vocab_size, text_before),
                                           np.full(p, config.image_token_id),
                                           rng.integers(4, config.text.vocab_size, n_after)])
        mask[row, n_pad:] = True
    v = config.vision
    pixels = rng.standard_normal((len(pad), v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    return jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask)


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def tiny(request):
    config = get_preset("tiny", scan_layers=request.param)
    params = init_params(config, jax.random.key(0))
    # Non-trivial norms and biases.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return config, params


def test_kv_cache_prefill_then_decode_equals_full_forward(tiny):
    config, params = tiny
    model = VLM(config)
    pixels, prompt, prompt_mask = _batch(config)
    n_new = 6
    new_tokens = jax.random.randint(jax.random.key(3), (prompt.shape[0], n_new), 4, config.text.vocab_size)
    full_ids = jnp.concatenate([prompt, new_tokens], axis=1)
    full_mask = jnp.concatenate([prompt_mask, jnp.ones_like(new_tokens, bool)], axis=1)
    full = model.apply({"params": params}, pixels, full_ids, full_mask).logits

    state = model.init_state(prompt.shape[0], full_ids.shape[1] + 3)  # spare slots stay masked
    out = model.apply({"params": params}, pixels, prompt, prompt_mask, state=state)
    prefill, state = out.logits, out.state
    step = jax.jit(lambda p, ids, s: model.apply({"params": p}, None, ids, jnp.ones_like(ids, bool), state=s))
    decoded = []
    for j in range(n_new):
        out = step(params, new_tokens[:, j:j + 1], state)
        state = out.state
        decoded.append(out.logits)
    decoded = jnp.concatenate(decoded, axis=1)
    p = prompt.shape[1]
    np.testing.assert_allclose(prefill[prompt_mask], full[:, :p][prompt_mask], atol=1e-5, rtol=0)
    np.testing.assert_allclose(decoded, full[:, p:], atol=1e-5, rtol=0)
    assert int(state.index) == full_ids.shape[1]
    np.testing.assert_array_equal(state.next_pos, full_mask.sum(1))


def test_cache_positions_follow_the_mask():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(positions_from_mask(jnp.ones((2, 2), bool), jnp.array([3, 5])),
                                  [[3, 4], [5, 6]])


def test_left_padding_does_not_change_logits(tiny):
    """The same prompt with 0 or 3 padding tokens gives the same logits at its real positions."""
    config, params = tiny
    pixels, ids, mask = _batch(config, pad=(0,))
    pad = 3
    padded_ids = jnp.pad(ids, ((0, 0), (pad, 0)))
    padded_mask = jnp.pad(mask, ((0, 0), (pad, 0)))
    a = VLM(config).apply({"params": params}, pixels, ids, mask).logits
    b = VLM(config).apply({"params": params}, pixels, padded_ids, padded_mask).logits
    np.testing.assert_allclose(a[0], b[0, pad:], atol=1e-5, rtol=0)


def test_causality_and_image_conditioning(tiny):
    config, params = tiny
    model = VLM(config)
    pixels, ids, mask = _batch(config, pad=(0, 0))
    base = model.apply({"params": params}, pixels, ids, mask).logits
    # A later token never changes earlier logits.
    t = ids.shape[1] - 2
    changed = ids.at[:, t].set((ids[:, t] + 1) % config.text.vocab_size)
    after = model.apply({"params": params}, pixels, changed, mask).logits
    np.testing.assert_array_equal(np.asarray(after[:, :t]), np.asarray(base[:, :t]))
    assert np.abs(np.asarray(after[:, t:] - base[:, t:])).max() > 1e-3
    # Another image changes the text logits after the image tokens, not before.
    first_img = int(np.argmax(np.asarray(ids[0]) == config.image_token_id))
    last_img = first_img + config.num_image_tokens
    other = model.apply({"params": params}, pixels[::-1] + 1.0, ids, mask).logits
    np.testing.assert_array_equal(np.asarray(other[:, :first_img]), np.asarray(base[:, :first_img]))
    assert np.abs(np.asarray(other[:, last_img:] - base[:, last_img:])).min(axis=-1).max() > 0
    assert np.abs(np.asarray(other[:, last_img:] - base[:, last_img:])).max() > 1e-3


def test_image_token_count_mismatch_names_both_counts(tiny):
    config, params = tiny
    pixels, ids, mask = _batch(config, pad=(0,))
    truncated = ids[:, 3:]  # cuts the first text tokens and one image token
    with pytest.raises(ValueError, match=rf"{config.num_image_tokens - 1} image tokens.*{config.num_image_tokens} "
                                         r"features"):
        VLM(config).apply({"params": params}, pixels, truncated, mask[:, 3:]).logits
    with pytest.raises(ValueError, match="no image was given"):
        VLM(config).apply({"params": params}, None, ids, mask).logits


def test_bfloat16_compute_is_close_to_float32(tiny):
    config, params = tiny
    pixels, ids, mask = _batch(config, pad=(0, 2))
    f32 = VLM(config).apply({"params": params}, pixels, ids, mask).logits
    bf16 = VLM(config.replace(dtype="bfloat16")).apply({"params": params}, pixels, ids, mask).logits
    assert bf16.dtype == jnp.float32  # logits always float32
    m = np.asarray(mask)
    err = np.abs(np.asarray(bf16)[m] - np.asarray(f32)[m]).max()
    assert 0 < err < 0.1 * np.abs(np.asarray(f32)[m]).max()


def test_param_count_matches_initialised_params():
    for name in ("tiny", "default"):
        for overrides in ({}, {"text": {"tie_word_embeddings": True, "qkv_bias": True}}):
            config = get_preset(name).replace(**overrides)
            shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
            assert sum(x.size for x in jax.tree.leaves(shapes)) == param_count(config)
    assert 15e6 < param_count(get_preset("default")) < 25e6


def test_flops_formula_by_hand_and_against_xla():
    t = TextConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1)
    # Per layer: q 8*8, k,v 8*4 each, o 8*8, mlp 3*8*16 = 64+64+64+384 = 576 MACs; attention 2*8*ctx MACs.
    assert text_flops_per_token(t, 10) == 2 * (2 * (576 + 2 * 8 * 10) + 8 * 100)
    # XLA's own count of the compiled forward (matmuls dominate at these sizes).
    config = get_preset("default").replace(text={"vocab_size": 256})
    pixels, ids = dummy_inputs(config, 1, 64)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    compiled = jax.jit(lambda p, x, i: VLM(config).apply({"params": p}, x, i).logits).lower(params, pixels, ids).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = forward_flops(config, ids.shape[1], 1)
    # Causal attention: XLA computes the full T x T scores; add back the masked half.
    t_len = ids.shape[1]
    masked_half = config.text.num_layers * 4 * config.text.num_heads * config.text.head_dim * (
        t_len * t_len - t_len * (t_len + 1) / 2)
    assert abs(cost["flops"] - (ours + masked_half)) / cost["flops"] < 0.05, (cost["flops"], ours)
    assert vision_flops_per_image(config) > 0


@pytest.mark.parametrize("bad", [
    lambda: VisionConfig(image_size=30, patch_size=8),
    lambda: VisionConfig(hidden_size=30, num_heads=4),
    lambda: TextConfig(num_heads=6, num_kv_heads=4),
    lambda: TextConfig(num_heads=0),
    lambda: TextConfig(hidden_size=30, num_heads=2, head_dim=15),
    lambda: VLMConfig(image_token_id=5000),
    lambda: VLMConfig(vision_feature_layer=99),
    lambda: VLMConfig(dtype="float8"),
    lambda: get_preset("huge"),
])
def test_bad_configs_raise(bad):
    with pytest.raises(ValueError):
        bad()


def test_config_dict_round_trip():
    config = get_preset("tiny", scan_layers=True, dtype="bfloat16")
    assert VLMConfig.from_dict(config.to_dict()) == config


def test_cast_for_compute_is_numerically_identical(tiny):
    from rftjax.models import cast_for_compute
    config, params = tiny
    config = config.replace(dtype="bfloat16")
    pixels, ids, mask = _batch(config, pad=(0, 2))
    cast = cast_for_compute(params, config)
    kinds = {str(x.dtype) for x in jax.tree.leaves(cast)}
    assert kinds == {"bfloat16", "float32"}  # kernels cast, norms and biases kept
    a = VLM(config).apply({"params": params}, pixels, ids, mask).logits
    b = VLM(config).apply({"params": cast}, pixels, ids, mask).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

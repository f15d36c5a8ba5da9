"""rftjax vs transformers' LlavaForConditionalGeneration on the same random checkpoints (float32)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import set_by_path
from hf_reference import hf_logits, left_padded_batch, make_hf_llava
from rftjax.models import VLM, get_preset, init_params
from rftjax.models import hf as rhf

CASES = {
    "mha_untied_16px_p4": dict(heads=4, kv_heads=4, tie=False, image_size=16, patch=4),
    "gqa_tied_24px_p8": dict(heads=4, kv_heads=2, tie=True, image_size=24, patch=8),
    "mqa_untied_theta1e6_layer-2": dict(heads=4, kv_heads=1, image_size=16, patch=4, rope_theta=1e6,
                                        feature_layer=-2),
    "qwen2_qkv_bias_gqa": dict(text_type="qwen2", heads=4, kv_heads=2, image_size=16, patch=4),
    "llama_attention_bias": dict(attention_bias=True, heads=4, kv_heads=2, image_size=16, patch=4),
}


def _inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = left_padded_batch(config.num_image_tokens, config.image_token_id, config.text.vocab_size, rng)
    v = config.vision
    pixels = rng.standard_normal((2, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    return pixels, ids, mask


def _ours(config, params, pixels, ids, mask):
    return np.asarray(VLM(config).apply({"params": params}, jnp.asarray(pixels), jnp.asarray(ids, jnp.int32),
                                        jnp.asarray(mask, bool)).logits)


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_llava_matches_transformers(tmp_path, case):
    model, path = make_hf_llava(tmp_path, **CASES[case])
    config, params = rhf.load_llava(path)
    assert config.text.num_kv_heads == CASES[case].get("kv_heads", 4)
    assert config.text.tie_word_embeddings == CASES[case].get("tie", False)
    pixels, ids, mask = _inputs(config)
    ref = hf_logits(model, pixels, ids, mask)
    ours = _ours(config, params, pixels, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ref).max() > 0.5  # logits are not trivially small
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_scanned_layers_load_and_match(tmp_path):
    model, path = make_hf_llava(tmp_path, heads=4, kv_heads=2)
    config, params = rhf.load_llava(path, scan_layers=True)
    assert params["language_model"]["layers"]["q_proj"]["kernel"].shape[0] == config.text.num_layers
    pixels, ids, mask = _inputs(config)
    ref = hf_logits(model, pixels, ids, mask)
    ours = _ours(config, params, pixels, ids, mask)
    np.testing.assert_allclose(ours[mask.astype(bool)], ref[mask.astype(bool)], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie,max_shard", [(False, None), (True, 20_000)])
def test_save_llava_round_trip_through_transformers(tmp_path, tie, max_shard):
    from transformers import LlavaForConditionalGeneration

    config = get_preset("tiny").replace(text={"tie_word_embeddings": tie, "vocab_size": 96})
    params = init_params(config, jax.random.key(1))
    # Noise on every leaf: norms (ones) and biases (zeros) must travel too.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    out = tmp_path / "saved"
    rhf.save_llava(str(out), config, params, max_shard_size=max_shard)
    if max_shard:
        assert os.path.exists(out / rhf.INDEX_NAME)
        assert len(json.load(open(out / rhf.INDEX_NAME))["weight_map"]) > 0
        assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    model, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    pixels, ids, mask = _inputs(config)
    ref = hf_logits(model, pixels, ids, mask)
    ours = _ours(config, params, pixels, ids, mask)
    np.testing.assert_allclose(ours[mask.astype(bool)], ref[mask.astype(bool)], atol=1e-4, rtol=0)
    # And back into rftjax: bit-identical params.
    config2, params2 = rhf.load_llava(str(out))
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_bfloat16_and_scanned(tmp_path):
    config = get_preset("tiny", scan_layers=True)
    params = init_params(config, jax.random.key(0))
    rhf.save_llava(str(tmp_path / "bf16"), config, params, dtype="bfloat16")
    config2, params2 = rhf.load_llava(str(tmp_path / "bf16"), scan_layers=True)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3, rtol=1e-2)


def _hf_config(**changes):
    cfg = rhf.config_to_hf(get_preset("tiny"))
    for key, value in changes.items():
        set_by_path(cfg, key, value)
    return cfg


@pytest.mark.parametrize("change,field", [
    ({"vision_config.model_type": "clip_vision_model"}, "vision_config.model_type"),
    ({"vision_feature_select_strategy": "default"}, "vision_feature_select_strategy"),
    ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
    ({"text_config.model_type": "mistral"}, "text_config.model_type"),
    ({"text_config.rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope"),
    ({"text_config.mlp_bias": True}, "text_config.mlp_bias"),
    ({"model_type": "llava_next"}, "model_type"),
    ({"image_seq_length": 7}, "image_seq_length"),
])
def test_unsupported_configs_name_the_field(change, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        rhf.config_from_hf(_hf_config(**change))


def test_missing_tensor_is_named(tmp_path):
    config = get_preset("tiny")
    rhf.save_llava(str(tmp_path / "m"), config, init_params(config, jax.random.key(0)))
    import safetensors.flax
    f = tmp_path / "m" / rhf.WEIGHTS_NAME
    tensors = safetensors.flax.load_file(str(f))
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    safetensors.flax.save_file(tensors, str(f))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj"):
        rhf.load_llava(str(tmp_path / "m"))

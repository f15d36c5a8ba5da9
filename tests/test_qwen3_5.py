"""Qwen3.5 against transformers on tiny random checkpoints (float32): Gated DeltaNet and gated-attention layers
alternating, GQA in both (more value heads than key heads in DeltaNet), partial rotary with interleaved M-RoPE,
(1+w) RMSNorms; sequences of 82 tokens (two delta-rule chunks); 2 rows with images of different sizes, one
left-padded. The recurrent decode, greedy generation, save/load, the delta rule's two forms, param counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import (HALF, hf_qwen_greedy, hf_qwen_logits, loaded_by_tie, make_hf_qwen3_5, qwen_batch,
                          qwen_cached_decode, qwen_images, qwen_logits, torch)
from rftjax import sampling
from rftjax.models import abstract_params, abstract_state, get_preset, model_for, param_count
from rftjax.models import hf as rhf
from rftjax.models.gated_delta_net import chunked_delta_rule, recurrent_delta_rule, unit_lower_inverse


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return loaded_by_tie(tmp_path_factory, make_hf_qwen3_5)


@pytest.fixture(scope="module")
def batch():
    return qwen_batch(np.random.default_rng(0), sizes=((64, 320), (160, 96)), budget_tokens=24, patch=16,
                      mean_std=HALF, text_before=(30, 20), text_after=(30, 40), pad=(0, 5))


_ours = qwen_logits


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(hf_models, batch, tie):
    model, _, config, params = hf_models(tie)
    t = config.text
    assert config.model_type == "qwen3_5" and t.tie_word_embeddings == tie
    assert t.layer_pattern == ("gated_delta_net", "attention") and t.linear_num_value_heads > t.linear_num_key_heads
    assert t.num_heads > t.num_kv_heads and t.rotary_dim < t.head_dim
    valid = batch["attention_mask"].astype(bool)
    assert valid.sum(1).min() > 64 and not valid[1, 0]  # several chunks; row 1 left-padded
    ref = hf_qwen_logits(model, batch)
    ours = _ours(config, params, batch)
    assert np.abs(ref[valid]).max() > 0.5
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_left_padding_never_reaches_the_state(hf_models, batch):
    """Row 1 alone without its padding gives the logits it has in the padded batch."""
    _, _, config, params = hf_models(False)
    valid = batch["attention_mask"][1].astype(bool)
    alone = {**batch, "input_ids": batch["input_ids"][1:, valid], "attention_mask": batch["attention_mask"][1:, valid],
             "patches": batch["patches"][1:], "grid_thw": batch["grid_thw"][1:]}
    np.testing.assert_allclose(_ours(config, params, alone)[0], _ours(config, params, batch)[1][valid], atol=1e-5,
                               rtol=0)


def test_chunked_delta_rule_equals_recurrent():
    """The chunked form (3 chunks of 16, a ragged last one, a non-zero initial state) equals the token-by-token
    recurrence, outputs and final state."""
    rng = np.random.default_rng(0)
    b, t, h, dk, dv = 2, 41, 3, 8, 5
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = jnp.asarray(unit(rng.standard_normal((b, t, h, dk))) * dk ** -0.5, jnp.float32)
    k = jnp.asarray(unit(rng.standard_normal((b, t, h, dk))), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    g = jnp.asarray(-rng.uniform(0.0, 2.0, (b, t, h)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0, 1, (b, t, h)), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    out_r, s_r = recurrent_delta_rule(q, k, v, g, beta, s0)
    out_c, s_c = chunked_delta_rule(q, k, v, g, beta, s0, chunk=16)
    np.testing.assert_allclose(np.asarray(out_c), np.asarray(out_r), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s_c), np.asarray(s_r), atol=1e-5, rtol=1e-5)


def test_unit_lower_inverse_and_its_gradient_equal_the_matrix_inverse():
    """`unit_lower_inverse` (forward substitution, closed-form gradient) equals `jnp.linalg.inv(I + tril(a, -1))`
    and its autodiff gradient, in float64; the entries on and above the diagonal get no gradient."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        a = jnp.asarray(rng.standard_normal((2, 3, 12, 12)) * 0.3)
        w = jnp.asarray(rng.standard_normal((2, 3, 12, 12)))
        naive = lambda a: jnp.linalg.inv(jnp.eye(12) + jnp.tril(a, -1))  # noqa: E731
        np.testing.assert_allclose(np.asarray(unit_lower_inverse(a)), np.asarray(naive(a)), atol=1e-12)
        ours, want = (jax.grad(lambda a: jnp.sum(w * f(a)))(a) for f in (unit_lower_inverse, naive))
        np.testing.assert_allclose(np.asarray(ours), np.asarray(want), atol=1e-12)
        assert not np.any(np.asarray(jnp.triu(ours)))


def test_chunked_delta_rule_gradients_equal_the_recurrence():
    """Gradients of a loss of the chunked form's outputs and state, w.r.t. every input, equal those of the
    token-by-token recurrence (plain autodiff: the independent reference for `unit_lower_inverse`'s gradient)."""
    rng = np.random.default_rng(2)
    b, t, h, dk, dv = 1, 37, 2, 8, 4
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    args = (jnp.asarray(unit(rng.standard_normal((b, t, h, dk))) * dk ** -0.5, jnp.float32),
            jnp.asarray(unit(rng.standard_normal((b, t, h, dk))), jnp.float32),
            jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32),
            jnp.asarray(-rng.uniform(0.0, 1.0, (b, t, h)), jnp.float32),
            jnp.asarray(rng.uniform(0, 1, (b, t, h)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32))
    wo, ws = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32), jnp.asarray(
        rng.standard_normal((b, h, dk, dv)), jnp.float32)

    def loss(f):
        def value(*xs):
            out, state = f(*xs)
            return jnp.sum(wo * out) + jnp.sum(ws * state)
        return jax.grad(value, argnums=tuple(range(6)))(*args)

    for ours, want in zip(loss(lambda *xs: chunked_delta_rule(*xs, chunk=16)), loss(recurrent_delta_rule)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(want), atol=2e-4, rtol=2e-4)


def test_recurrent_decode_equals_full_forward(hf_models, batch):
    """Prefill (chunked, state written) then 4 one-token steps (recurrent form) give the full forward's logits."""
    _, _, config, params = hf_models(False)
    state = model_for(config).init_state(2, 10)
    assert state.layers[0]["recurrent"].dtype == jnp.float32 and state.layers[0]["conv"].shape == (2, 128, 3)
    cached, full, valid = qwen_cached_decode(config, params, batch, np.random.default_rng(1).integers(4, 150, (2, 4)))
    np.testing.assert_allclose(cached[valid], full[valid], atol=1e-5, rtol=0)


def test_scanned_layers_equal_unscanned(hf_models, batch):
    """A pattern of two kinds scans its block (`layers/{kind}_{j}` stacked); save/load round-trips it."""
    _, _, config, params = hf_models(False)
    scanned = config.replace(scan_layers=True)
    stacked = rhf.stack_layers(params, config)
    assert set(stacked["language_model"]["layers"]) == {"gated_delta_net_0", "attention_1"}
    np.testing.assert_allclose(_ours(scanned, stacked, batch), _ours(config, params, batch), atol=1e-5, rtol=0)
    back = rhf.unstack_layers(stacked, config)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_greedy_generate_equals_transformers(hf_models, batch):
    model, _, config, params = hf_models(False)
    out = sampling.generate(params, config, qwen_images(batch), jnp.asarray(batch["input_ids"], jnp.int32),
                            jnp.asarray(batch["attention_mask"], bool), jax.random.key(0),
                            sampling.SamplingParams(max_new_tokens=16, greedy=True))
    ref_new = hf_qwen_greedy(model, batch)
    assert len(set(ref_new.ravel().tolist())) > 3
    np.testing.assert_array_equal(np.asarray(out.completion_ids), ref_new)


@pytest.mark.parametrize("tie", [False, True])
def test_save_loads_in_transformers_with_same_logits(hf_models, batch, tmp_path, tie):
    from transformers import Qwen3_5ForConditionalGeneration

    _, _, config, params = hf_models(tie)
    rhf.save_pretrained(str(tmp_path / "out"), config, params, max_shard_size=100_000)
    reloaded = Qwen3_5ForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(hf_qwen_logits(reloaded, batch)[valid], _ours(config, params, batch)[valid],
                               atol=1e-4, rtol=0)
    config2, params2 = rhf.load_pretrained(str(tmp_path / "out"), max_image_tokens=24,
                                           min_pixels=config.min_pixels)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_mtp_tensors_are_skipped_with_a_log(hf_models, tmp_path, caplog):
    """Published checkpoints carry a multi-token-prediction head (`mtp.*`); loading skips it and says so."""
    import logging
    import os
    import shutil

    import safetensors.numpy

    _, path, config, params = hf_models(False)
    out = tmp_path / "with_mtp"
    shutil.copytree(path, out)
    tensors = safetensors.numpy.load_file(str(out / rhf.WEIGHTS_NAME))
    tensors["mtp.fc.weight"] = np.zeros((4, 4), np.float32)
    safetensors.numpy.save_file(tensors, str(out / rhf.WEIGHTS_NAME), metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="rftjax"):
        _, params2 = rhf.load_pretrained(str(out), max_image_tokens=24)
    assert "skipped 1 tensors" in caplog.text and "mtp" in caplog.text
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    assert os.path.exists(out / rhf.PROCESSOR_CONFIG_NAME)


def test_presets_param_count_match_transformers():
    """The published shapes: param counts equal transformers' for the same config (meta device)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    for name in ("qwen3_5_0_8b", "qwen3_5_2b", "qwen3_5_4b", "qwen3_5_9b"):
        config = get_preset(name)
        with torch.device("meta"):
            model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**rhf.qwen_config_to_hf(config)))
        assert param_count(config) == sum(p.numel() for p in model.parameters()), name


def test_param_count_and_decode_state_of_the_tiny_preset():
    config = get_preset("qwen3_5_tiny")
    assert param_count(config) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
    state = abstract_state(config, 3, 100)
    t = config.text
    linear, attention = state.layers[0], state.layers[1]
    assert linear["recurrent"].shape == (3, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim)
    assert attention["k"].shape == (3, t.num_kv_heads, 100, t.head_dim)


@pytest.mark.parametrize("change, field", [
    (lambda c: c["text_config"].update(layer_types=["sliding_attention", "full_attention"] * 2), "layer_types"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"), "rope_type"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(model_type="qwen3_5_moe"), "model_type"),
])
def test_unsupported_config_fields_are_named(change, field):
    hf = rhf.qwen_config_to_hf(get_preset("qwen3_5_tiny"))
    change(hf)
    with pytest.raises(ValueError, match=field):
        rhf.layout_of(hf["model_type"]).config_from_hf(hf)


def test_config_round_trips_through_hf_and_dict():
    config = get_preset("qwen3_5_tiny")
    assert rhf.qwen_config_from_hf(rhf.qwen_config_to_hf(config), max_image_tokens=64, min_pixels=32 * 32) == config
    from rftjax.models import config_from_dict

    assert config_from_dict(config.to_dict()) == config

"""Qwen3-VL against transformers on tiny random checkpoints (float32): DeepStack at 2 levels, learned position
embeddings resampled to grids smaller and larger than the 8 x 8 table and not square, interleaved M-RoPE, q/k
norms, GQA; the cached decode, greedy generation, save/load, the image processor with the checkpoint's settings.

Batch: 2 rows, images of 64 x 320 px (4 x 20 patches: wider, shorter than the table) and 160 x 96 px (10 x 6
patches: taller, narrower), row 1 left-padded, text before and after each image.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import (HALF, hf_qwen_greedy, hf_qwen_logits, loaded_by_tie, make_hf_qwen3_vl, qwen_batch,
                          qwen_cached_decode, qwen_images, qwen_logits, torch)
from rftjax import sampling
from rftjax.data.qwen_image import QwenImageProcessor
from rftjax.models import get_preset, param_count
from rftjax.models import hf as rhf
from rftjax.models.llm import mrope_axes
from rftjax.models.qwen_vl import position_interpolation

SIZES = ((64, 320), (160, 96))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return loaded_by_tie(tmp_path_factory, make_hf_qwen3_vl)


@pytest.fixture(scope="module")
def batch():
    return qwen_batch(np.random.default_rng(0), sizes=SIZES, budget_tokens=24, patch=16, mean_std=HALF)


_ours = qwen_logits


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(hf_models, batch, tie):
    model, _, config, params = hf_models(tie)
    assert config.model_type == "qwen3_vl" and config.text.tie_word_embeddings == tie
    assert config.vision.deepstack_visual_indexes == (0, 1) and config.text.qk_norm and config.text.mrope_interleaved
    grids = np.asarray(batch["grid_thw"])[:, 1:]
    side = config.vision.position_grid_side
    assert (grids > side).any() and (grids < side).any() and (grids[:, 0] != grids[:, 1]).all()
    ref = hf_qwen_logits(model, batch)
    ours = _ours(config, params, batch)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(ref[valid]).max() > 0.5
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_deepstack_and_position_table_change_the_logits(hf_models, batch):
    """Each Qwen3-VL addition is live: zeroing the DeepStack mergers' output or the position table moves the
    logits at the image and text positions after it (so the match above tests them)."""
    _, _, config, params = hf_models(False)
    base = _ours(config, params, batch)
    for path in (("visual", "deepstack_merger_1", "mlp_2"), ("visual", "position_embedding")):
        changed = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.zeros_like(x) if tuple(k.key for k in p[:len(path)]) == path else x, params)
        assert np.abs(_ours(config, changed, batch) - base).max() > 1e-3, path


def test_interleaved_mrope_axes_equal_hf_recomposition():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    for section in ((3, 3, 2), (24, 20, 20)):
        freq = torch.arange(3, dtype=torch.float32)[:, None, None, None].expand(3, 1, 1, sum(section)).clone()
        stub = type("Stub", (), {"mrope_section": list(section)})()
        ref = Qwen3VLTextRotaryEmbedding.recomposition_frequencies(stub, freq)[0, 0, : sum(section)]
        np.testing.assert_array_equal(mrope_axes(section, interleaved=True), ref.numpy().astype(int))


def test_position_interpolation_equals_hf(hf_models):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    grids = np.asarray([[1, 4, 20], [1, 10, 6], [1, 8, 8], [1, 2, 2]])
    ref_idx, ref_w = get_vision_interpolation_indices_and_weights(
        torch.tensor(grids), num_grid_per_side=8, mode="bilinear", align_corners=True, spatial_merge_size=2)
    from rftjax.models.qwen_vl import patch_layout

    _, _, config, _ = hf_models(False)
    p = int(grids.prod(1).max())
    layout = patch_layout(jnp.asarray(grids), p, config.vision)
    idx, w = position_interpolation(layout["row"], layout["col"], layout["grid_h"], layout["grid_w"], 8)
    start = 0
    for b, n in enumerate(grids.prod(1)):
        np.testing.assert_array_equal(np.asarray(idx[b, :n]), ref_idx[start:start + n].numpy())
        np.testing.assert_allclose(np.asarray(w[b, :n]), ref_w[start:start + n].numpy(), atol=1e-6)
        start += n
    # the four grids as the media items of one row: HF's concatenation, slot for slot
    packed = patch_layout(jnp.asarray(grids)[None], start + 4, config.vision)
    idx, w = position_interpolation(packed["row"], packed["col"], packed["grid_h"], packed["grid_w"], 8)
    np.testing.assert_array_equal(np.asarray(idx[0, :start]), ref_idx.numpy())
    np.testing.assert_allclose(np.asarray(w[0, :start]), ref_w.numpy(), atol=1e-6)
    assert not np.asarray(packed["valid"][0, start:]).any()


def test_kv_cache_decode_equals_full_forward(hf_models, batch):
    _, _, config, params = hf_models(False)
    new = np.random.default_rng(1).integers(4, 150, (2, 4))
    cached, full, valid = qwen_cached_decode(config, params, batch, new)
    np.testing.assert_allclose(cached[valid], full[valid], atol=1e-5, rtol=0)


def test_scanned_layers_equal_unscanned(hf_models, batch):
    """DeepStack inside the scan over layers (the level index rides in the scan's carry)."""
    _, _, config, params = hf_models(False)
    scanned = config.replace(scan_layers=True)
    stacked = rhf.stack_layers(params, config)
    np.testing.assert_allclose(_ours(scanned, stacked, batch), _ours(config, params, batch), atol=1e-5, rtol=0)


def test_greedy_generate_equals_transformers(hf_models, batch):
    model, _, config, params = hf_models(False)
    out = sampling.generate(params, config, qwen_images(batch), jnp.asarray(batch["input_ids"], jnp.int32),
                            jnp.asarray(batch["attention_mask"], bool), jax.random.key(0),
                            sampling.SamplingParams(max_new_tokens=16, greedy=True))
    ref_new = hf_qwen_greedy(model, batch)
    assert len(set(ref_new.ravel().tolist())) > 3  # not a degenerate repeat of one token
    np.testing.assert_array_equal(np.asarray(out.completion_ids), ref_new)


@pytest.mark.parametrize("tie", [False, True])
def test_save_loads_in_transformers_with_same_logits(hf_models, batch, tmp_path, tie):
    from transformers import Qwen3VLForConditionalGeneration

    _, path, config, params = hf_models(tie)
    rhf.save_pretrained(str(tmp_path / "out"), config, params)
    with open(tmp_path / "out" / rhf.CONFIG_NAME) as f:
        assert json.load(f)["architectures"] == ["Qwen3VLForConditionalGeneration"]
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(hf_qwen_logits(reloaded, batch)[valid], _ours(config, params, batch)[valid],
                               atol=1e-4, rtol=0)
    config2, params2 = rhf.load_pretrained(str(tmp_path / "out"), max_image_tokens=24,
                                           min_pixels=config.min_pixels)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_checkpoint_processor_settings_are_read(hf_models):
    _, path, config, _ = hf_models(False)
    assert config.image_mean == (0.5,) * 3 and config.image_std == (0.5,) * 3 and config.min_pixels == 32 * 32
    os.rename(os.path.join(path, rhf.PROCESSOR_CONFIG_NAME), os.path.join(path, "moved.json"))
    try:  # without the file: the family's published defaults
        assert rhf.load_config(path).min_pixels == 65536
    finally:
        os.rename(os.path.join(path, "moved.json"), os.path.join(path, rhf.PROCESSOR_CONFIG_NAME))


@pytest.mark.parametrize("size", [(64, 320), (160, 96), (97, 203), (333, 41), (20, 20)])
def test_image_processor_equals_transformers(hf_models, size):
    """Patches and grids equal transformers' `Qwen2VLImageProcessorPil` set up as the checkpoint sets it
    (patch 16, mean/std 0.5, its smallest area) on sizes that are and are not multiples of 32 px."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    _, _, config, _ = hf_models(False)
    ours = QwenImageProcessor.for_model(config)
    ref = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, size={"shortest_edge": config.min_pixels,
                                                              "longest_edge": config.max_pixels})
    image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8))
    patches, grid = ours(image)
    out = ref(images=[image], return_tensors="np")
    np.testing.assert_array_equal(grid, out["image_grid_thw"][0])
    np.testing.assert_allclose(patches, out["pixel_values"], atol=1e-6)


def test_presets_param_count_match_transformers():
    """The published shapes: param counts equal transformers' for the same config (meta device, no memory)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    for name in ("qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b"):
        config = get_preset(name)
        hf_config = Qwen3VLConfig(**rhf.qwen_config_to_hf(config))
        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration(hf_config)
        ours = param_count(config)
        assert ours == sum(p.numel() for p in model.parameters()), name


def test_param_count_equals_initialised_params():
    from rftjax.models import abstract_params

    config = get_preset("qwen3_vl_tiny")
    assert param_count(config) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))

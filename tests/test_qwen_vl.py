"""Qwen2.5-VL / Qwen2-VL against transformers on tiny random checkpoints (float32), plus the image processor,
the static-shape padding, and the sampler.

Batch: 2 rows with images of different sizes (112x84 px: 4x3 merged tokens in 4 windows of 2x2; 56x140 px:
2x5 tokens in 3 windows), row 1 left-padded, text before and after each image; vision block 0 windowed and
block 1 full attention (Qwen2.5-VL); GQA decoder.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from hf_reference import (hf_qwen_greedy, hf_qwen_logits, make_hf_qwen_vl, qwen_batch, qwen_cached_decode,
                          torch)
from rftjax import sampling
from rftjax.data.qwen_image import QwenImageProcessor, choose_bucket, pad_images, smart_resize
from rftjax.models import QwenImages, get_preset, model_for, param_count
from rftjax.models import hf as rhf
from rftjax.models import forward_flops
from rftjax.models.config import QwenVLConfig, qwen_vision_flops
from rftjax.models.qwen_vl import check_image_tokens, mrope_positions

CASES = {"qwen2_5_vl_untied": ("qwen2_5_vl", False), "qwen2_5_vl_tied": ("qwen2_5_vl", True),
         "qwen2_vl_untied": ("qwen2_vl", False)}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """HF model, its directory, and rftjax's (config, params) loaded from it, built once per case."""
    cache = {}

    def get(case):
        if case not in cache:
            family, tie = CASES[case]
            model, path = make_hf_qwen_vl(tmp_path_factory.mktemp(case), family=family, tie=tie)
            cache[case] = (model, path, *rhf.load_qwen_vl(path, max_image_tokens=16))
        return cache[case]

    return get


@pytest.fixture(scope="module")
def batch():
    return qwen_batch(np.random.default_rng(0))


def _images(batch):
    return QwenImages(jnp.asarray(batch["patches"]), jnp.asarray(batch["grid_thw"]))


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, params, images, ids, mask):
    return model_for(config).apply({"params": params}, images, ids, mask).logits


def _ours(config, params, batch):
    return np.asarray(_apply(config, params, _images(batch), jnp.asarray(batch["input_ids"], jnp.int32),
                             jnp.asarray(batch["attention_mask"], bool)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(hf_models, batch, case):
    model, _, config, params = hf_models(case)
    assert config.model_type == CASES[case][0] and config.text.tie_word_embeddings == CASES[case][1]
    assert config.text.num_kv_heads == 2 and config.text.num_heads == 4
    if config.model_type == "qwen2_5_vl":  # both attention kinds run, and row 0 spans several windows
        assert config.vision.is_windowed(0) and not config.vision.is_windowed(1)
        assert (np.asarray(batch["grid_thw"])[:, 1:] // 2 > config.vision.window_units).any()
    ref = hf_qwen_logits(model, batch)
    ours = _ours(config, params, batch)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(ref[valid]).max() > 0.5
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_mrope_positions_equal_hf_get_rope_index(hf_models, batch):
    model, _, config, _ = hf_models("qwen2_5_vl_untied")
    with torch.no_grad():
        ref, deltas = model.model.get_rope_index(
            torch.tensor(batch["input_ids"]), torch.tensor(batch["mm_token_type_ids"]),
            image_grid_thw=torch.tensor(batch["image_grid_thw"]), attention_mask=torch.tensor(batch["attention_mask"]))
    ours = np.asarray(mrope_positions(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                                      jnp.asarray(batch["grid_thw"]), config))
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(ours[:, valid], ref.numpy()[:, valid])
    # rope_deltas: the next text position is max + 1 = (real tokens) + delta.
    np.testing.assert_array_equal(ours.max((0, 2)) + 1, valid.sum(1) + deltas.numpy()[:, 0])


def test_padding_budget_does_not_change_logits(hf_models, batch):
    _, _, config, params = hf_models("qwen2_5_vl_untied")
    bigger = {**batch, "patches": np.concatenate([batch["patches"], np.ones_like(batch["patches"])], axis=1)}
    np.testing.assert_allclose(_ours(config, params, bigger), _ours(config, params, batch), atol=1e-5, rtol=0)


def test_kv_cache_decode_equals_full_forward(hf_models, batch):
    _, _, config, params = hf_models("qwen2_5_vl_untied")
    cached, full, valid = qwen_cached_decode(config, params, batch, np.random.default_rng(1).integers(4, 150, (2, 4)))
    np.testing.assert_allclose(cached[valid], full[valid], atol=1e-5, rtol=0)


def test_scanned_towers_equal_unscanned(hf_models, batch):
    """`scan_layers` scans the vision blocks too (windowed and full-attention blocks in one scan, a per-block
    flag choosing) and the decoder layers: the same logits and gradients as the unrolled model; loading with
    `scan_layers=True` gives the stacked params, and they unstack back."""
    _, path, config, params = hf_models("qwen2_5_vl_untied")
    scanned, stacked = config.replace(scan_layers=True), rhf.stack_layers(params, config)
    assert stacked["visual"]["blocks"]["qkv"]["kernel"].shape[0] == config.vision.depth == 2
    np.testing.assert_allclose(_ours(scanned, stacked, batch), _ours(config, params, batch), atol=1e-5, rtol=0)
    images, ids = _images(batch), jnp.asarray(batch["input_ids"], jnp.int32)
    mask = jnp.asarray(batch["attention_mask"], bool)

    def grads(c, p):
        return jax.grad(lambda p: model_for(c).apply({"params": p}, images, ids, mask).logits[mask].std())(p)

    got = rhf.unstack_layers(grads(scanned.replace(remat=True), stacked), config)
    ref = grads(config, params)
    assert float(jnp.abs(ref["visual"]["blocks_0"]["qkv"]["kernel"]).max()) > 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), got, ref)
    _, loaded = rhf.load_qwen_vl(path, max_image_tokens=16, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, loaded, stacked)
    jax.tree.map(np.testing.assert_array_equal, rhf.unstack_layers(loaded, config), params)


def test_greedy_generate_equals_transformers(hf_models, batch):
    model, _, config, params = hf_models("qwen2_5_vl_untied")
    out = sampling.generate(params, config, _images(batch), jnp.asarray(batch["input_ids"], jnp.int32),
                            jnp.asarray(batch["attention_mask"], bool), jax.random.key(0),
                            sampling.SamplingParams(max_new_tokens=16, greedy=True))
    ref_new = hf_qwen_greedy(model, batch)
    assert len(set(ref_new.ravel().tolist())) > 3  # not a degenerate repeat of one token
    np.testing.assert_array_equal(np.asarray(out.completion_ids), ref_new)


def test_save_loads_in_transformers_with_same_logits(hf_models, batch, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, _, config, params = hf_models("qwen2_5_vl_tied")
    rhf.save_qwen_vl(str(tmp_path / "out"), config, params, max_shard_size=40_000)
    assert os.path.exists(tmp_path / "out" / rhf.INDEX_NAME)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(hf_qwen_logits(reloaded, batch)[valid], _ours(config, params, batch)[valid],
                               atol=1e-4, rtol=0)
    config2, params2 = rhf.load_pretrained(str(tmp_path / "out"), max_image_tokens=16)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_both_tensor_name_layouts_load(hf_models, tmp_path):
    """The Hub layout (`model.layers`, `visual`, `lm_head`, as saved) and transformers 5's in-memory one
    (`model.language_model`, `model.visual`, bf16 on disk) give the same params."""
    _, path, config, params = hf_models("qwen2_5_vl_untied")
    tensors = safetensors.numpy.load_file(os.path.join(path, rhf.WEIGHTS_NAME))
    assert any(k.startswith("visual.") for k in tensors) and any(k.startswith("model.layers.") for k in tensors)
    renamed = {("model." + k if k.startswith("visual.") else
                k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in tensors.items()}
    out = tmp_path / "new_layout"
    out.mkdir()
    safetensors.numpy.save_file(renamed, str(out / rhf.WEIGHTS_NAME))
    with open(os.path.join(path, rhf.CONFIG_NAME)) as f:
        (out / rhf.CONFIG_NAME).write_text(f.read())
    _, params2 = rhf.load_qwen_vl(str(out), max_image_tokens=16)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("change, field", [
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"), "rope_type"),
    (lambda c: c["text_config"].update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c["vision_config"].update(hidden_act="relu"), "vision_config.hidden_act"),
    (lambda c: c.update(model_type="qwen3_vl_moe"), "model_type"),
])
def test_unsupported_config_fields_are_named(change, field):
    hf = rhf.qwen_config_to_hf(get_preset("qwen_vl_tiny"))
    change(hf)
    with pytest.raises(ValueError, match=field):
        rhf.layout_of(hf["model_type"]).config_from_hf(hf)


def test_old_config_layout_with_top_level_text_fields():
    """Older Qwen2.5-VL config.json files keep the text fields at the top level, with `rope_scaling`
    `{"type": "mrope", "mrope_section": ...}`."""
    config = get_preset("qwen_vl_tiny")
    hf = rhf.qwen_config_to_hf(config)
    text = hf.pop("text_config")
    text.pop("rope_parameters")
    hf.update(text, model_type="qwen2_5_vl", rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    assert rhf.qwen_config_from_hf(hf, max_image_tokens=64) == config


@pytest.mark.parametrize("size", [(60, 90), (28, 280), (300, 20), (113, 57), (500, 333), (20, 3000)])
def test_image_processor_equals_transformers(size):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8))
    ref = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)(images=[img], return_tensors="np")
    patches, grid = QwenImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)(img)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
    np.testing.assert_allclose(patches, ref["pixel_values"], atol=1e-6, rtol=0)
    tokens = int(grid.prod()) // 4
    if min(size) * 64 >= max(size):
        assert tokens <= 64
    else:  # a side clamped to 28 px (as HF does) can exceed the budget: the batcher says so
        with pytest.raises(ValueError, match="does not fit max_image_tokens=64"):
            choose_bucket(tokens, [64])


def test_smart_resize_and_buckets():
    assert smart_resize(100, 100) == (112, 112)
    h, w = smart_resize(1000, 2000, max_pixels=28 * 28 * 64)
    assert h % 28 == w % 28 == 0 and h * w <= 28 * 28 * 64 and abs(w / h - 2) < 0.25
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)
    assert choose_bucket(10, [16, 64]) == 16 and choose_bucket(17, [16, 64]) == 64
    with pytest.raises(ValueError, match="max_image_tokens=64"):
        choose_bucket(65, [16, 64])
    padded = pad_images([(np.ones((16, 5), np.float32), np.array([1, 4, 4])), None], [4, 8])
    assert padded["patches"].shape == (2, 16, 5) and padded["grid_thw"].tolist() == [[1, 4, 4], [0, 0, 0]]


def test_image_token_mismatch_names_both_counts(batch):
    config = get_preset("qwen_vl_tiny")
    ids = batch["input_ids"].copy()
    ids[0, np.nonzero(ids[0] == config.image_token_id)[0][0]] = 5  # one image token cut
    with pytest.raises(ValueError, match=r"row 0 of input_ids has runs of \[11\] .* give \[12\] features"):
        check_image_tokens(ids, config, batch["grid_thw"])
    split = batch["input_ids"].copy()
    first = np.nonzero(split[0] == config.image_token_id)[0][0]
    split[0, first + 1], split[0, first - 2] = 7, config.image_token_id  # same count, two runs
    with pytest.raises(ValueError, match=r"runs of \[1, 1, 10\] .* give \[12\]"):
        check_image_tokens(split, config, batch["grid_thw"])


def test_other_image_sizes_in_the_same_bucket_do_not_recompile(hf_models):
    _, _, config, params = hf_models("qwen2_5_vl_untied")
    traces = []

    @jax.jit
    def forward(params, images, ids, mask):
        traces.append(1)
        return model_for(config).apply({"params": params}, images, ids, mask).logits

    shapes = set()
    for sizes in [((112, 84), (56, 140)), ((84, 112), (112, 56)), ((56, 56), (140, 56))]:
        b = qwen_batch(np.random.default_rng(2), sizes=sizes, pad=(0, 0), text_before=(2, 2), text_after=(3, 3))
        extra = 40 - b["input_ids"].shape[1]  # the same prompt length T for every batch: more left padding
        ids, mask = (np.pad(b[k], ((0, 0), (extra, 0))) for k in ("input_ids", "attention_mask"))
        shapes.add(b["grid_thw"].tobytes())
        forward(params, _images(b), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))
    assert len(shapes) == 3 and len(traces) == 1


def test_presets_param_count_match_transformers():
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    for name, cls in (("qwen2_5_vl_3b", Qwen2_5_VLForConditionalGeneration),
                      ("qwen2_5_vl_7b", Qwen2_5_VLForConditionalGeneration),
                      ("qwen2_vl_2b", Qwen2VLForConditionalGeneration)):
        config = get_preset(name)
        hf_config = rhf.layout_of(config.model_type).config_to_hf(config)
        hf_config.pop("architectures")
        with torch.device("meta"):
            model = cls(cls.config_class(**{k: v for k, v in hf_config.items() if k != "model_type"}))
        theirs = sum(p.numel() for p in model.parameters())
        assert param_count(config) == theirs, name  # exact, within 0.5% required


def test_param_count_equals_initialised_params():
    config = get_preset("qwen_vl_tiny")
    shapes = jax.eval_shape(lambda: model_for(config).init(jax.random.key(0), *_dummy(config))["params"])
    assert param_count(config) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _dummy(config):
    from rftjax.models import dummy_inputs
    return dummy_inputs(config)


def test_vision_flops_count_windows():
    """Hand count for the tiny preset: 16 tokens = 64 patches, windows of (56/14)^2 = 16 patches."""
    config = get_preset("qwen_vl_tiny")
    v = config.vision
    p, d, m = 64, 32, 48
    want = (2 * p * v.patch_dim * d + 2 * 2 * p * (4 * d * d + 3 * d * m)
            + 4 * p * 16 * d + 4 * p * p * d + 2 * 16 * (128 * 128 + 128 * 32))
    assert qwen_vision_flops(v, 16) == want
    assert forward_flops(config, 10, 1, 16) > forward_flops(config, 10, 0)


def test_config_validation():
    with pytest.raises(ValueError, match="mrope_section"):
        QwenVLConfig(text=get_preset("qwen_vl_tiny").text.__class__(mrope_section=None))
    with pytest.raises(ValueError, match="mrope_section"):
        get_preset("qwen_vl_tiny").replace(text={"mrope_section": (1, 1, 1)})
    with pytest.raises(ValueError, match="image_token_buckets"):
        get_preset("qwen_vl_tiny").replace(image_token_buckets=(128,))
    assert get_preset("qwen_vl_tiny", image_token_buckets=(16, 32)).buckets == (16, 32, 64)


def test_config_dict_round_trip():
    from rftjax.models import config_from_dict

    config = get_preset("qwen_vl_tiny")
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    llava = get_preset("tiny")
    assert config_from_dict(llava.to_dict()) == llava


def test_trainer_refuses_a_qwen_preset_without_its_tokenizer(tmp_path):
    """A Qwen-VL preset has no tokenizer or chat template of its own (the packaged one is LLaVA-layout): the
    trainer says to use a checkpoint directory (tests/test_checkpoint_training.py trains one)."""
    import importlib.util

    from rftjax.build import build_run

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.py")
    spec = importlib.util.spec_from_file_location("smoke_config", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    config = smoke.get_config()
    config.model.preset = "qwen_vl_tiny"
    config.model.overrides = {}
    config.mesh.num_devices = 1
    with pytest.raises(ValueError, match="needs its own tokenizer and chat template: set model.checkpoint=DIR"):
        build_run(config, str(tmp_path))

"""Parameter-efficient and partial training, offline on tiny random checkpoints written by transformers: GRPO with
LoRA adapters (qwix) on the decoder, and on the decoder + vision tower; full-parameter training with the vision
tower frozen by regex; exports checked against transformers (merged weights) and peft (`PeftModel.from_pretrained`
on the adapter directory); remat policies; config errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hf_reference import QWEN_TOKEN_IDS, hf_logits, hf_qwen_logits, qwen_batch
from rftjax import trainable
from rftjax.export import ADAPTER_DIR, export, restore_policy
from rftjax.metrics import read_jsonl
from rftjax.state import RunState
from rftjax.models import QwenImages, get_preset, init_params, model_for
from rftjax.models import hf as rhf
from rftjax.models import lora as lora_lib
from test_checkpoint_training import _config


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _train(ckpt_dir, files, workdir, **settings):
    """Two GRPO steps (k3 KL to the reference, as configs/qwen2_5_vl_easyr1.py) in process; the Trainer. An entropy
    bonus gives every step a gradient: a random model's completions all score 0 (zero advantages)."""
    from helpers import set_by_path
    from rftjax.train import Trainer

    config = _config(ckpt_dir, files)
    for key, value in {"rl.steps": 2, "checkpoint.every": 2, "rl.algo.entropy_coef": 0.01, **settings}.items():
        set_by_path(config, key, value)
    trainer = Trainer(config, workdir)
    trainer.run()
    return trainer


def _qwen_logits(config, params, batch):
    return np.asarray(model_for(config).apply(
        {"params": params}, QwenImages(jnp.asarray(batch["patches"]), jnp.asarray(batch["grid_thw"])),
        jnp.asarray(batch["input_ids"], jnp.int32), jnp.asarray(batch["attention_mask"], bool)).logits)


def test_grpo_with_lora_on_decoder_and_vision_exports_to_transformers_and_peft(qwen_dir, files, tmp_path):
    """LoRA (decoder + vision tower) GRPO steps on a Qwen2.5-VL checkpoint change only the adapters (the base weights
    stay bitwise equal to the checkpoint's and are not in the run's checkpoints); the reference log-probs equal the
    base model's; the merged export loads in transformers, the adapter export in peft, both within 1e-4 of ours."""
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, ckpt_dir = qwen_dir
    workdir = str(tmp_path / "run")
    trainer = _train(ckpt_dir, files, workdir, **{"model.lora.rank": 4, "model.lora.alpha": 8.0, "rl.lr": 2e-2,
                                                  "model.lora.targets": "decoder+vision"})
    assert [m["step"] for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if m.get("stage") == "rl"] == [1, 2]
    config = trainer.setup.model_config
    trained = _flat(trainer.state.stage.policy.params)
    assert trained and all(k.endswith(("kernel_lora_a", "kernel_lora_b")) for k in trained)
    assert any(k.startswith("visual/") for k in trained) and any(k.startswith("language_model/") for k in trained)
    # Optimizer state only for the adapters: Adam's two moments have exactly the adapters' size.
    moments = sum(x.size for x in jax.tree.leaves(trainer.state.stage.policy.opt_state) if x.ndim >= 1)
    assert moments == 2 * sum(x.size for x in trained.values())

    _, config_, params, _ = restore_policy(workdir)
    _, base = rhf.load_pretrained(ckpt_dir)
    full = _flat(params)
    for k, v in _flat(base).items():
        np.testing.assert_array_equal(full[k], v, err_msg=k)  # base weights bitwise unchanged
    assert any(np.abs(full[k]).max() > 0 for k in full if k.endswith("kernel_lora_b"))  # the adapters trained

    # The reference (adapters at their start, B = 0) computes the base model's log-probs exactly.
    batch = qwen_batch(np.random.default_rng(1), ids=QWEN_TOKEN_IDS, vocab=320, low=7)
    fresh = RunState(trainer.setup, restore=False)  # the RL stage as it starts: its reference
    assert all(k.endswith(("kernel_lora_a", "kernel_lora_b")) for k in _flat(fresh.stage.ref))  # no base copy
    ref = fresh.full(fresh.stage.ref)
    base_logits = _qwen_logits(config.replace(lora=None), base, batch)
    np.testing.assert_array_equal(_qwen_logits(config, ref, batch), base_logits)

    export_dir = str(tmp_path / "export")
    export(workdir, export_dir)
    ours = _qwen_logits(config, params, batch)
    valid = batch["attention_mask"].astype(bool)
    print("adapters move the logits by", np.abs(ours - base_logits)[valid].max())
    assert np.abs(ours - base_logits)[valid].max() > 1e-2  # the adapters change the model far beyond the tolerance
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(export_dir).eval()
    np.testing.assert_allclose(hf_qwen_logits(merged, batch)[valid], ours[valid], atol=1e-4, rtol=0)
    peft = PeftModel.from_pretrained(Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt_dir),
                                     os.path.join(export_dir, ADAPTER_DIR)).eval()
    np.testing.assert_allclose(hf_qwen_logits(peft, batch)[valid], ours[valid], atol=1e-4, rtol=0)


def _llava_inputs(config):
    rng = np.random.default_rng(2)
    ids = np.concatenate([[[1, 20, 30]] * 2, np.full((2, config.num_image_tokens), 5), rng.integers(7, 320, (2, 6))], 1)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    return rng.standard_normal((2, 16, 16, 3)).astype(np.float32), ids, mask


def _llava_logits(config, params, inputs):
    pixels, ids, mask = inputs
    return np.asarray(model_for(config).apply({"params": params}, jnp.asarray(pixels), jnp.asarray(ids, jnp.int32),
                                              jnp.asarray(mask, bool)).logits)


def test_grpo_with_lora_on_the_decoder_exports_to_peft(llava_dir, files, tmp_path):
    """Decoder-only LoRA on a LLaVA checkpoint: GRPO steps train the decoder's adapters only (none on the vision
    tower, no gradient or optimizer state for anything else); peft loads the adapter export onto the transformers
    base model and its logits equal ours within 1e-4."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    _, ckpt_dir = llava_dir
    workdir = str(tmp_path / "run")
    trainer = _train(ckpt_dir, files, workdir, **{"model.lora.rank": 2, "model.lora.alpha": 4.0, "rl.lr": 2e-2})
    trained = _flat(trainer.state.stage.policy.params)
    assert trained and all(k.startswith("language_model/layers_") and "kernel_lora_" in k for k in trained)
    assert len(trained) == 2 * 7 * trainer.setup.model_config.text.num_layers  # A and B on q k v o gate up down
    _, config, params, _ = restore_policy(workdir)
    _, base = rhf.load_pretrained(ckpt_dir)
    full = _flat(params)
    for k, v in _flat(base).items():
        np.testing.assert_array_equal(full[k], v, err_msg=k)

    export(workdir, str(tmp_path / "export"))
    inputs = _llava_inputs(config)
    ours = _llava_logits(config, params, inputs)
    valid = inputs[2].astype(bool)
    assert np.abs(ours - _llava_logits(config.replace(lora=None), base, inputs))[valid].max() > 1e-2
    merged = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    np.testing.assert_allclose(hf_logits(merged, *inputs)[valid], ours[valid], atol=1e-4, rtol=0)
    peft = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(ckpt_dir),
                                     str(tmp_path / "export" / ADAPTER_DIR)).eval()
    np.testing.assert_allclose(hf_logits(peft, *inputs)[valid], ours[valid], atol=1e-4, rtol=0)


def test_full_training_with_the_vision_tower_frozen_by_regex(llava_dir, files, tmp_path):
    """`optim.freeze='vision_tower/.*'`: full-parameter GRPO steps leave every vision-tower param bitwise unchanged,
    allocate no optimizer state and no reference copy for it, keep it out of the checkpoints (the export rebuilds it
    from the checkpoint directory), and train everything else."""
    _, ckpt_dir = llava_dir
    workdir = str(tmp_path / "run")
    trainer = _train(ckpt_dir, files, workdir, **{"optim.freeze": "vision_tower/.*", "rl.lr": 1e-3})
    trained = _flat(trainer.state.stage.policy.params)
    assert not any(k.startswith("vision_tower/") for k in trained) and "multi_modal_projector/linear_1/kernel" in trained
    opt_paths = ["/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(trainer.state.stage.policy.opt_state)[0]]
    assert opt_paths and not any("vision_tower" in p for p in opt_paths)
    fresh = RunState(trainer.setup, restore=False)
    assert not any(k.startswith("vision_tower/") for k in _flat(fresh.stage.ref))

    _, _, params, _ = restore_policy(workdir)
    _, base = rhf.load_pretrained(ckpt_dir)
    full, initial = _flat(params), _flat(base)
    assert set(full) == set(initial)
    for k in initial:
        if k.startswith("vision_tower/"):
            np.testing.assert_array_equal(full[k], initial[k], err_msg=k)
    assert not np.array_equal(full["multi_modal_projector/linear_1/kernel"], initial["multi_modal_projector/linear_1/kernel"])
    assert not np.array_equal(full["language_model/lm_head/kernel"], initial["language_model/lm_head/kernel"])


@pytest.mark.parametrize("policy", ["full", "dots", "dots_all"])
def test_remat_policies_give_the_gradients_of_no_remat(policy):
    """`remat=True` with each `remat_policy` (decoder layers and Qwen-VL vision blocks) computes the gradients of
    the plain model (rematerialisation changes memory, never the math)."""
    from rftjax.models import dummy_inputs

    config = get_preset("qwen_vl_tiny", scan_layers=True)
    params = init_params(config, jax.random.key(0))
    images, ids = dummy_inputs(config, 2)
    images = images.replace(patches=jax.random.normal(jax.random.key(1), images.patches.shape))

    def grads(c):
        return jax.jit(jax.grad(lambda p: jnp.sum(model_for(c).apply({"params": p}, images, ids).logits ** 2)))(params)

    for a, b in zip(jax.tree.leaves(grads(config)), jax.tree.leaves(grads(config.replace(remat=True,
                                                                                          remat_policy=policy)))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_lora_merge_equals_the_adapted_model_and_bad_settings_raise():
    """`lora.merge` folds random adapters into the kernels: the plain model on merged params computes the adapted
    model's logits (scanned layers, decoder + vision); bad targets, freeze regexes and ranks raise ValueError."""
    from rftjax.models import dummy_inputs

    config = get_preset("tiny", scan_layers=True, lora=dict(rank=3, alpha=6.0, targets="decoder+vision"))
    params = init_params(config, jax.random.key(0))
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(1), len(flat))
    params = traverse_util.unflatten_dict({k: 0.1 * jax.random.normal(kk, v.shape) if lora_lib.is_adapter(k) else v
                                           for (k, v), kk in zip(flat.items(), keys)})
    pixels, ids = dummy_inputs(config, 2)
    pixels = jax.random.normal(jax.random.key(2), pixels.shape)

    def logits(c, p):
        return jax.jit(lambda p: model_for(c).apply({"params": p}, pixels, ids).logits)(p)

    plain = config.replace(lora=None)
    adapted, merged = logits(config, params), logits(plain, lora_lib.merge(params, config.lora))
    base = logits(plain, trainable.split(params, {k for k in flat if not lora_lib.is_adapter(k)})[0])
    assert float(jnp.abs(adapted - base).max()) > 1e-2
    np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="rank"):
        lora_lib.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="not a regex"):
        lora_lib.LoraConfig(targets="(q_proj")
    with pytest.raises(ValueError, match="matches no param"):
        trainable.trainable_paths(params, config, "vison_tower/.*")
    with pytest.raises(ValueError, match="nothing left to train"):
        trainable.trainable_paths(params, config, ".*")

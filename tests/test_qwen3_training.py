"""Qwen3-VL and Qwen3.5 end to end through the CLI, offline: tiny random checkpoints written by transformers (with
their preprocessor configs), a tiny tokenizer with Qwen3.5's thinking chat template, EasyR1 jsonl files. Each
family's `configs/*_easyr1.py` with LoRA on the decoder (attention, Gated DeltaNet and MLP projections) and the
vision tower: GRPO steps, resume, evaluation, export; transformers loads the merged export and peft the adapter,
both with our logits. (Full-parameter training through the CLI is the Qwen2.5-VL test's: the trainer does not
depend on the family.)"""

import os
import shutil

import numpy as np
import pytest

from hf_reference import HALF, QWEN_TOKEN_IDS, hf_qwen_logits, qwen_batch
from rftjax.export import ADAPTER_DIR, restore_policy
from rftjax.metrics import read_jsonl
from rftjax.models import hf as rhf
from test_checkpoint_training import _args, _cli
from test_lora import _flat, _qwen_logits

FAMILIES = {"qwen3_vl": ("qwen3_dir", "configs/qwen3_vl_easyr1.py", "Qwen3VLForConditionalGeneration"),
            "qwen3_5": ("qwen3_5_dir", "configs/qwen3_5_easyr1.py", "Qwen3_5ForConditionalGeneration")}
LORA = ("--config.model.lora.rank=4", "--config.model.lora.alpha=8.0", "--config.model.lora.targets=decoder+vision",
        "--config.rl.lr=0.02", "--config.rl.algo.entropy_coef=0.01")  # an entropy bonus: every step has a gradient


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_trains_resumes_evaluates_and_exports(family, request, files, tmp_path):
    """`python -m rftjax.train --config configs/{family}_easyr1.py --config.model.checkpoint=DIR` with LoRA: 3 GRPO
    steps (float32: the sampler's log-probs equal the trainer's) that train only the adapters, a resumed rerun that
    recomputes step 3 exactly, the evaluation, `python -m rftjax.export`; transformers' logits of the merged export
    and peft's of the adapter on the checkpoint equal ours within 1e-4."""
    import transformers
    from peft import PeftModel

    fixture, config_file, hf_class = FAMILIES[family]
    hf_class = getattr(transformers, hf_class)
    _, ckpt_dir = request.getfixturevalue(fixture)
    workdir = str(tmp_path / "run")
    base = ["--config", config_file, "--workdir", workdir, *_args(ckpt_dir, files), *LORA]
    _cli("rftjax.train", *base)
    first = [m for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if m.get("stage") == "rl"]
    assert [m["step"] for m in first] == [1, 2, 3]
    assert all(m["sampler_logprob_gap_max"] < 1e-5 for m in first)
    evals = [e for e in read_jsonl(os.path.join(workdir, "eval.jsonl")) if e["stage"] == "rl_end"]
    assert len(evals) == 1 and evals[0]["n"] > 0

    shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
    assert "resumed from step 2" in _cli("rftjax.train", *base)
    again = [m for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if m.get("stage") == "rl"]
    assert [m["step"] for m in again] == [1, 2, 3]
    for key in ("loss", "reward_mean", "completion_len_mean"):
        assert again[2][key] == pytest.approx(first[2][key], abs=1e-6), key

    export_dir = str(tmp_path / "export")
    _cli("rftjax.export", "--workdir", workdir, "--out", export_dir)
    _, config, params, _ = restore_policy(workdir)
    assert config.model_type == family and config.image_mean == (0.5,) * 3
    adapters = [k for k in _flat(params) if k.endswith("kernel_lora_b")]
    assert any(k.startswith("visual/blocks_") for k in adapters) and any(k.startswith("language_model/")
                                                                         for k in adapters)
    if family == "qwen3_5":
        assert any("/in_proj_qkv/" in k for k in adapters) and any("/out_proj/" in k for k in adapters)
    _, base_params = rhf.load_pretrained(ckpt_dir)
    batch = qwen_batch(np.random.default_rng(1), sizes=((64, 96), (96, 64)), ids=QWEN_TOKEN_IDS, vocab=320, low=7,
                       patch=16, mean_std=HALF)
    valid = batch["attention_mask"].astype(bool)
    ours = _qwen_logits(config, params, batch)
    assert np.abs(ours - _qwen_logits(config.replace(lora=None), base_params, batch))[valid].max() > 1e-2  # trained
    merged = hf_class.from_pretrained(export_dir).eval()
    np.testing.assert_allclose(hf_qwen_logits(merged, batch)[valid], ours[valid], atol=1e-4, rtol=0)
    peft = PeftModel.from_pretrained(hf_class.from_pretrained(ckpt_dir), os.path.join(export_dir, ADAPTER_DIR)).eval()
    np.testing.assert_allclose(hf_qwen_logits(peft, batch)[valid], ours[valid], atol=1e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(export_dir).chat_template == \
        transformers.AutoTokenizer.from_pretrained(ckpt_dir).chat_template
    assert os.path.exists(os.path.join(export_dir, rhf.PROCESSOR_CONFIG_NAME))

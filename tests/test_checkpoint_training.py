"""Training a pretrained checkpoint on dataset files, end to end and offline: tiny random Qwen2.5-VL and LLaVA
checkpoints written by transformers, tiny tokenizers with each family's special tokens and published chat template
(built with `tokenizers`), EasyR1 jsonl files with images written here. GRPO steps, checkpoints, resume,
evaluation, export, and transformers loading the export; the chat-template path against
`AutoTokenizer.apply_chat_template`; over-long rows dropped and counted; the sampler/trainer log-prob gap."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import QUESTION, set_by_path
from hf_reference import QWEN_TOKEN_IDS, hf_logits, hf_qwen_logits, make_tokenizer_dir, qwen_batch
from rftjax.data.chat import CheckpointTokenizer, user_message
from rftjax.export import export, restore_policy
from rftjax.metrics import read_jsonl
from rftjax.models import QwenImages, model_for
from rftjax.models import hf as rhf
from rftjax.rewards import INSTRUCTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import qwen2_5_vl_easyr1  # noqa: E402

MAX_PROMPT_LEN = 96


def _settings(checkpoint: str, files: dict) -> dict:
    """Overrides of configs/qwen2_5_vl_easyr1.py for a run of seconds."""
    return {"model.checkpoint": checkpoint, "data.train": f"easyr1:{files['train']}",
            "data.test": f"easyr1:{files['test']}", "model.dtype": "float32",
            "data.max_prompt_len": MAX_PROMPT_LEN, "rl.steps": 3, "rl.prompts_per_step": 2, "rl.algo.group_size": 2,
            "rl.max_new_tokens": 8, "rl.lr": 1e-3, "rl.warmup_steps": 0, "eval.batch_size": 4, "eval.every": 100,
            "checkpoint.every": 1, "log.progress": False, "log.tensorboard": False, "mesh.num_devices": 1}


def _args(checkpoint: str, files: dict) -> list[str]:
    """`_settings` as command-line flags."""
    return [f"--config.{k}={v}" for k, v in _settings(checkpoint, files).items()]


def _config(checkpoint: str, files: dict):
    """configs/qwen2_5_vl_easyr1.py with `_settings` (in process)."""
    config = qwen2_5_vl_easyr1.get_config()
    for key, value in _settings(checkpoint, files).items():
        set_by_path(config, key, value)
    return config


def _cli(module: str, *args: str) -> str:
    """Output of `python -m module args` (the session's compilation cache is inherited: tests/conftest.py)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    print(f"{module}: {time.perf_counter() - t0:.1f} s")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def hf_prompt_len(tokenizer, image_processor, question: str, image: Image.Image) -> int:
    """The prompt length transformers' Qwen2.5-VL processor gives: the chat template by
    `AutoTokenizer.apply_chat_template`, `<|image_pad|>` repeated `grid_thw.prod() / 4` times (HF's processor
    rule), tokenised."""
    text = tokenizer.apply_chat_template([user_message(question, INSTRUCTIONS["boxed"])],
                                         add_generation_prompt=True, tokenize=False)
    n = int(np.prod(image_processor(images=[image], return_tensors="np")["image_grid_thw"][0])) // 4
    return len(tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n), add_special_tokens=False)["input_ids"])


def test_qwen_checkpoint_trains_resumes_evaluates_and_exports(qwen_dir, files, tmp_path):
    """`python -m rftjax.train --config configs/qwen2_5_vl_easyr1.py --config.model.checkpoint=DIR
    --config.data.train=easyr1:FILE`: GRPO steps, checkpoints, a resumed rerun, evaluation, `python -m
    rftjax.export`, and transformers' logits of the export equal ours within 1e-4."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    model, ckpt_dir = qwen_dir
    workdir = str(tmp_path / "run")
    base = ["--config", "configs/qwen2_5_vl_easyr1.py", "--workdir", workdir, *_args(ckpt_dir, files)]
    out = _cli("rftjax.train", *base)

    # Over-long rows: dropped before training, counted, logged and printed; the count equals transformers'.
    hf_tok = AutoTokenizer.from_pretrained(ckpt_dir)
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=1024 * 28 * 28)

    def hf_lengths(path):
        return [hf_prompt_len(hf_tok, proc, r["problem"], Image.open(os.path.join(os.path.dirname(path), r["images"][0])))
                for r in map(json.loads, open(path))]

    lengths = hf_lengths(files["train"])
    too_long = sum(n > MAX_PROMPT_LEN for n in lengths)
    excess = sorted(n - MAX_PROMPT_LEN for n in lengths if n > MAX_PROMPT_LEN)
    assert 0 < too_long < 32 and len(set(excess)) >= 3 and excess[-1] > 200  # over by a few to hundreds of tokens
    assert f"kept {32 - too_long} of 32 rows; dropped 0 bad rows, {too_long} whose prompt exceeds" in out
    assert out.count(f"{too_long} whose prompt exceeds") >= 2  # printed and logged

    first = [m for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if m.get("stage") == "rl"]
    assert [m["step"] for m in first] == [1, 2, 3]
    assert all(m["sampler_logprob_gap_max"] < 1e-5 for m in first)  # float32: the sampler agrees with the trainer
    evals = [e for e in read_jsonl(os.path.join(workdir, "eval.jsonl")) if e["stage"] == "rl_end"]
    assert len(evals) == 1 and evals[0]["split"] == "test"
    assert evals[0]["n"] == sum(n <= MAX_PROMPT_LEN for n in hf_lengths(files["test"])) > 0

    # A crash during step 3 (its checkpoint gone): the rerun resumes at step 2 and recomputes step 3 exactly.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
    out = _cli("rftjax.train", *base)
    assert "resumed from step 2" in out
    again = [m for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if m.get("stage") == "rl"]
    assert [m["step"] for m in again] == [1, 2, 3]
    for key in ("loss", "reward_mean", "sampler_logprob_gap_mean", "completion_len_mean"):
        assert again[2][key] == pytest.approx(first[2][key], abs=1e-6), key

    export_dir = str(tmp_path / "export")
    _cli("rftjax.export", "--workdir", workdir, "--out", export_dir)
    _, config, params, _ = restore_policy(workdir)
    _, initial = rhf.load_pretrained(ckpt_dir)
    assert not np.allclose(params["language_model"]["lm_head"]["kernel"],
                           initial["language_model"]["lm_head"]["kernel"])  # it trained
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(export_dir).eval()
    batch = qwen_batch(np.random.default_rng(1), ids=QWEN_TOKEN_IDS, vocab=320, low=7)
    ours = model_for(config).apply({"params": params}, QwenImages(jnp.asarray(batch["patches"]),
                                                                  jnp.asarray(batch["grid_thw"])),
                                   jnp.asarray(batch["input_ids"], jnp.int32), jnp.asarray(batch["attention_mask"], bool)).logits
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(hf_qwen_logits(reloaded, batch)[valid], np.asarray(ours)[valid], atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(export_dir).chat_template == hf_tok.chat_template


def test_llava_checkpoint_trains_resumes_and_exports(llava_dir, files, tmp_path):
    """The same config on a LLaVA checkpoint (in process): GRPO steps, resume, evaluation, export, transformers'
    logits of the export equal ours within 1e-4."""
    from transformers import LlavaForConditionalGeneration

    from rftjax.train import Trainer

    model, ckpt_dir = llava_dir
    workdir = str(tmp_path / "run")
    config = _config(ckpt_dir, files)
    Trainer(config, workdir).run()
    first = [m for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if m.get("stage") == "rl"]
    assert [m["step"] for m in first] == [1, 2, 3] and all(m["sampler_logprob_gap_max"] < 1e-5 for m in first)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
    trainer = Trainer(config, workdir)
    assert trainer.state.counters.rl.step == 2
    trainer.run()
    again = [m for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if m.get("stage") == "rl"]
    assert [m["step"] for m in again] == [1, 2, 3] and again[2]["loss"] == pytest.approx(first[2]["loss"], abs=1e-6)

    export(workdir, str(tmp_path / "export"))
    _, config, params, _ = restore_policy(workdir)
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    rng = np.random.default_rng(2)
    ids = np.concatenate([[[1, 20, 30]] * 2, np.full((2, config.num_image_tokens), 5), rng.integers(7, 320, (2, 6))], 1)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    pixels = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    ours = model_for(config).apply({"params": params}, jnp.asarray(pixels), jnp.asarray(ids, jnp.int32),
                                   jnp.asarray(mask, bool)).logits
    valid = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(reloaded, pixels, ids, mask)[valid], np.asarray(ours)[valid], atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("family", ["qwen", "qwen3", "llava"])
def test_chat_template_prompts_equal_transformers(family, tmp_path):
    """Our jinja rendering of a checkpoint's chat template gives `AutoTokenizer.apply_chat_template`'s token ids
    on the same messages (image placeholder first, in the middle, at the end; a system turn; string content), and
    the expanded prompt equals HF's processor rule (the placeholder repeated per image token). `qwen3`: Qwen3.5's
    thinking template from `chat_template.jinja` (macros, `|trim`, reversed loops; the generation prompt opens
    `<think>`), and with `template_kwargs={"enable_thinking": False}` (`data.chat_template_kwargs`) the closed
    empty think block that `apply_chat_template(..., enable_thinking=False)` renders."""
    from transformers import AutoTokenizer

    path = make_tokenizer_dir(str(tmp_path / family), family)
    ours = CheckpointTokenizer(path, 5)
    hf = AutoTokenizer.from_pretrained(path)
    conversations = [[user_message(q, ours.instruction)] for q in
                     ("<image>How many cubes?", "Look at <image> and count.", "Count the cubes <image>", "No tag")]
    conversations.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])
    for messages in conversations:
        for generation in (True, False):
            want = hf.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True)
            want = want["input_ids"] if hasattr(want, "keys") else want
            assert ours.encode(ours.render_messages(messages, generation)) == list(want)
    image_token = "<|image_pad|>" if family.startswith("qwen") else "<image>"
    text = hf.apply_chat_template([user_message("Look at <image> and count.", ours.instruction)],
                                  add_generation_prompt=True, tokenize=False)
    want = hf(text.replace(image_token, image_token * 7), add_special_tokens=False)["input_ids"]
    assert ours.prompt_ids("Look at <image> and count.", 7) == want
    assert ours.decode(want).startswith({"qwen": "system", "qwen3": "user", "llava": "USER:"}[family])
    if family == "qwen3":
        assert text.endswith("<|im_start|>assistant\n<think>\n")
        plain = CheckpointTokenizer(path, 5, template_kwargs={"enable_thinking": False})
        for messages in conversations:
            want = hf.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, tokenize=False)
            assert plain.render_messages(messages) == want
        assert want.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_no_prompt_reaching_the_model_is_cut_through_its_image(qwen_dir, files, tmp_path):
    """Every RL prompt of the over-long dataset that reaches the model holds its whole image span (as many image
    tokens as its grid, between vision start/end) and its whole question; the dropped rows are exactly the
    over-long ones."""
    from rftjax.build import build_run, train_iterators
    from rftjax.models import check_image_tokens

    config = _config(qwen_dir[1], files)
    run = build_run(config, str(tmp_path / "run"))
    report = run.reports["rl"]
    assert report.too_long > 0 and report.kept == len(run.sources["rl"]) == 32 - report.too_long
    _, it = train_iterators(run)
    tok = run.tokenizer
    seen = 0
    for _ in range(len(run.sources["rl"]) // 2):
        batch = next(it)
        images = batch["pixel_values"]
        check_image_tokens(batch["prompt_ids"], run.model_config, images)  # raises on a cut image span
        for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"]):
            ids = ids[mask]
            image = np.flatnonzero(ids == QWEN_TOKEN_IDS["image_token_id"])
            assert ids[image[0] - 1] == QWEN_TOKEN_IDS["vision_start_token_id"]
            assert ids[image[-1] + 1] == QWEN_TOKEN_IDS["vision_end_token_id"]
            assert (np.diff(image) == 1).all() and QUESTION in tok.decode(ids)
            seen += 1
    assert seen == len(run.sources["rl"]) // 2 * 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampler_and_trainer_logprobs_agree(qwen_dir, dtype):
    """The sampler's log-probs (cached decode) equal the trainer's forward pass over the same tokens: max gap below
    1e-5 in float32; in bfloat16 the gap is printed (reported, not bounded)."""
    from rftjax import sampling, steps, batches
    from rftjax.data.pipeline import image_input_for

    config, params = rhf.load_pretrained(qwen_dir[1], dtype=dtype, max_image_tokens=16)
    images = image_input_for(config)
    rng = np.random.default_rng(3)
    imgs = [images(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((60, 100), (90, 50))]
    pv = jax.tree.map(lambda *x: jnp.stack(x), *imgs)
    n_img = [int(np.prod(i.grid_thw)) // 4 for i in imgs]
    length = max(n_img) + 6
    ids = np.zeros((2, length), np.int32)
    for b, n in enumerate(n_img):
        ids[b, length - n - 6:] = [3, *[5] * n, 4, 40, 50, 60, 70]
    mask = ids != 0
    out = sampling.generate(params, config, pv, ids, mask, jax.random.key(0),
        sampling.SamplingParams(group_size=3, max_new_tokens=10,
                            temperature=1.0, eos_ids=(2,)))
    seq = batches.SequenceBatch(pixel_values=jax.tree.map(lambda x: jnp.repeat(x, 3, 0), pv),
                              prompt_ids=jnp.repeat(ids, 3, 0), prompt_mask=jnp.repeat(mask, 3, 0),
                              completion_ids=out.completion_ids, completion_mask=out.completion_mask)
    trainer_lp, _ = steps.completion_logprobs(params, config, seq, 1.0)
    gap = steps.logprob_gap(trainer_lp, out.model_logprobs, out.completion_mask)
    print(f"\nsampler/trainer log-prob gap ({dtype}): mean {float(gap['sampler_logprob_gap_mean']):.2e}, "
          f"max {float(gap['sampler_logprob_gap_max']):.2e}")
    assert int(out.completion_mask.sum()) > 10
    if dtype == "float32":
        assert float(gap["sampler_logprob_gap_max"]) < 1e-5


def test_qwen_batches_take_the_smallest_bucket_that_fits():
    """The pipeline pads each Qwen-VL batch to the smallest `image_token_buckets` budget holding its largest image
    (one compilation per bucket, not per image size), and rollout rounds of different buckets concatenate with zero
    padding; every row keeps its own patches and grid."""
    from rftjax.data.pipeline import Preprocess, image_input_for, make_dataset
    from rftjax.data.tasks import make_example
    from rftjax.data.tokenizer import TextTokenizer
    from rftjax.models import get_preset
    from rftjax.rollout import concat_rows

    config = get_preset("qwen_vl_tiny", image_token_buckets=(4, 16))  # max_image_tokens 64
    images = image_input_for(config)
    rng = np.random.default_rng(0)
    sizes = [(56, 56), (56, 56), (56, 56), (112, 112), (196, 196), (56, 84)]  # 4, 4 | 4, 16 | 49, 6 tokens
    examples = [make_example("t", "test", i, rng.integers(0, 256, (*hw, 3), dtype=np.uint8), "How many?", "1", "int")
                for i, hw in enumerate(sizes)]
    batches = list(make_dataset(examples, Preprocess(TextTokenizer(), images, 128), batch_size=2, shuffle=False,
                                num_epochs=1, num_threads=1))
    assert [b["pixel_values"].patches.shape[1] for b in batches] == [16, 64, 256]
    for b, pair in zip(batches, np.array_split(examples, 3)):
        for row, ex in zip(range(2), pair):
            patches, grid = images.processor(ex["image"])
            np.testing.assert_array_equal(b["pixel_values"].grid_thw[row], [grid])
            np.testing.assert_array_equal(b["pixel_values"].patches[row, :len(patches)], patches)
            assert not b["pixel_values"].patches[row, len(patches):].any()
    joined = concat_rows(batches[0]["pixel_values"], batches[2]["pixel_values"])
    assert joined.patches.shape == (4, 256, 1176) and joined.grid_thw.shape == (4, 1, 3)
    np.testing.assert_array_equal(joined.patches[:2, :16], batches[0]["pixel_values"].patches)
    assert not joined.patches[:2, 16:].any()

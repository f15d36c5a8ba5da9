"""Reward models against transformers (float32, images, left padding) and judges' parse rules."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from hf_reference import HALF, make_hf_qwen3_5, make_hf_qwen_vl, qwen_batch, qwen_images  # noqa: E402

from rftjax.rewards import models as rm  # noqa: E402


def _scores(model: rm.RewardModel, batch: dict) -> np.ndarray:
    features = rm.encode_images(model.params, model.config, qwen_images(batch))
    n = len(batch["input_ids"])
    return np.asarray(rm.last_token_scores(model.params, model.head, model.config, features,
                                           jnp.arange(n, dtype=jnp.int32), jnp.asarray(batch["input_ids"], jnp.int32),
                                           jnp.asarray(batch["attention_mask"], bool)))


def _hf_inputs(batch: dict) -> dict:
    return dict(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                pixel_values=torch.tensor(batch["pixel_values"]), image_grid_thw=torch.tensor(batch["image_grid_thw"]),
                mm_token_type_ids=torch.tensor(batch["mm_token_type_ids"]))


def test_sequence_classification_scores_equal_transformers(tmp_path):
    model, path = make_hf_qwen3_5(tmp_path, classifier=True)
    batch = qwen_batch(np.random.default_rng(1), sizes=((64, 96), (96, 64), (64, 64)), pad=(0, 5, 9),
                       text_before=(3, 2, 4), text_after=(6, 2, 3), budget_tokens=24, patch=16, mean_std=HALF)
    with torch.no_grad():
        want = model(**_hf_inputs(batch)).logits[:, 0].numpy()
    loaded = rm.load_reward_model(path, max_image_tokens=24)
    assert loaded.layout == "sequence_classification" and "lm_head" not in str(loaded.params.keys())
    np.testing.assert_allclose(_scores(loaded, batch), want, atol=1e-4, rtol=0)


def test_value_head_scores_equal_the_hidden_state_times_the_head(tmp_path):
    from safetensors.numpy import save_file

    model, path = make_hf_qwen_vl(tmp_path, seed=2)
    rng = np.random.default_rng(3)
    weight, bias = rng.normal(size=(1, 32)).astype(np.float32), rng.normal(size=(1,)).astype(np.float32)
    save_file({"v_head.summary.weight": weight, "v_head.summary.bias": bias}, f"{path}/value_head.safetensors")
    batch = qwen_batch(np.random.default_rng(4), pad=(0, 6))
    with torch.no_grad():
        hidden = model.model(**_hf_inputs(batch)).last_hidden_state[:, -1].numpy()  # left padded: the last token
    loaded = rm.load_reward_model(path, max_image_tokens=16)
    assert loaded.layout == "value_head"
    np.testing.assert_allclose(_scores(loaded, batch), hidden @ weight[0] + bias[0], atol=1e-4, rtol=0)


def test_a_checkpoint_without_a_head_is_refused_with_the_layouts(tmp_path):
    _, path = make_hf_qwen_vl(tmp_path)
    with pytest.raises(ValueError, match="value_head.safetensors"):
        rm.load_reward_model(path)


RULE = rm.ParseRule.parse("score:0:10")


@pytest.mark.parametrize("text, want", [
    ("The answer is right. Final Score: 7", 0.7),
    ("Final Score: 3\n...on reflection, Final Score: 10", 1.0),   # the last verdict counts
    ("final score = **8**", 0.8),
    ("Final Score: 11", None),                                    # out of range
    ("Final Score: -1", None),
    ("Final Score: 1e999", 0.1),                                  # reads the 1; no overflow
    ("no verdict here", None),
    ("", None),
    (None, None),
    ("Final Score: " + "9" * 10_000, None),                       # too many digits to be a verdict
    ("Final Score:" * 50_000 + " 5", 0.5),                        # long hostile output, linear time
])
def test_score_rule_on_hand_written_outputs(text, want):
    got = rm.parse_judgement(text, RULE)
    assert got == pytest.approx(want) if want is not None else got is None


@pytest.mark.parametrize("text, want", [
    (r"so \boxed{0.25}", 0.25), (r"\boxed{Yes}", 1.0), (r"\boxed{incorrect}", 0.0), (r"\boxed{2}", None),
    (r"\boxed{nan}", None), (r"\boxed{inf}", None), (r"\boxed{" + "{" * 5000, None), (r"\boxed{}", None),
])
def test_boxed_rule_on_hand_written_outputs(text, want):
    got = rm.parse_judgement(text, rm.ParseRule.parse("boxed:0:1"))
    assert got == pytest.approx(want) if want is not None else got is None


@pytest.mark.parametrize("spec", ["score:5:5", "score:a:b", "boxed:1", "yes:Yes", "yes:A:A", "vote", "score:0:inf"])
def test_bad_parse_rules_say_what_is_accepted(spec):
    with pytest.raises(ValueError):
        rm.ParseRule.parse(spec)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL body with a value head and a tokenizer + chat template (Skywork-VL-Reward's layout)."""
    from hf_reference import QWEN_TOKEN_IDS, make_tokenizer_dir
    from safetensors.numpy import save_file

    _, path = make_hf_qwen_vl(tmp_path_factory.mktemp("rm"), vocab=320, ids=QWEN_TOKEN_IDS, seed=5)
    rng = np.random.default_rng(6)
    save_file({"v_head.summary.weight": rng.normal(size=(1, 32)).astype(np.float32),
               "v_head.summary.bias": np.asarray([0.5], np.float32)}, f"{path}/value_head.safetensors")
    return make_tokenizer_dir(path, "qwen")


def _train(workdir, *extra, fault: str = ""):
    """The smoke config's run (1 SFT step, 3 RL steps) with `extra` flags; its RL metric rows. `fault`:
    `RFTJAX_FAULT` (the run is killed there)."""
    import os
    import subprocess
    import sys

    from helpers import ROOT
    from rftjax.metrics import read_jsonl

    cmd = [sys.executable, "-m", "rftjax.train", "--config", os.path.join(ROOT, "configs", "smoke.py"), "--workdir",
           str(workdir), "--config.mesh.num_devices=1", "--config.sft.max_steps=1", "--config.eval.pass_n=0",
           "--config.checkpoint.every=1", "--config.log.tensorboard=False", "--config.rl.steps=3", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "RFTJAX_FAULT": fault}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == (-9 if fault else 0), proc.stderr[-3000:]
    return [r for r in read_jsonl(os.path.join(str(workdir), "metrics.jsonl")) if r["stage"] == "rl"]


def test_rules_plus_a_reward_model_train_and_resume_through_the_cli(tmp_path, reward_model_dir):
    """A LLaVA-layout policy on the digits task with a Qwen2.5-VL value-head reward model (its own image input and
    chat template) at weight 0.5: GRPO steps with per-source metrics; killed before its third update, the rerun
    resumes and finishes the 3 steps."""
    flags = (f"--config.reward.model={reward_model_dir}", "--config.reward.model_weight=0.5")
    first = _train(tmp_path, *flags, fault="rollout:3")
    assert len(first) == 2
    rows = _train(tmp_path, *flags)
    assert [r["step"] for r in rows] == [2, 3, 4]
    for r in rows:
        assert np.isfinite(r["reward_model_mean"]) and r["reward_model_std"] > 0  # the head reads each completion
        assert r["reward_mean"] == pytest.approx(r["reward_score_mean"] + 0.5 * r["reward_model_mean"], abs=1e-4)
        assert r["reward_time_model_s"] > 0 and "reward_time_rules_s" in r


def test_a_reward_model_alone_scores_rows_without_gold_answers(tmp_path, reward_model_dir):
    """The open-ended `describe` task: no rule applies (its components stay 0), the reward is the model's."""
    rows = _train(tmp_path, "--config.data.task=describe", f"--config.reward.model={reward_model_dir}",
                  "--config.model.overrides.vision.image_size=64", "--config.model.overrides.vision.patch_size=16",
                  "--config.reward.model_gate=unanswered")
    assert len(rows) == 3
    for r in rows:
        assert r["reward_score_mean"] == 0 and r["accuracy"] == 0
        assert r["reward_mean"] == pytest.approx(r["reward_model_mean"], abs=1e-5) and r["reward_model_std"] > 0


def test_open_ended_data_without_a_learned_reward_is_refused():
    import importlib.util

    from helpers import ROOT
    from rftjax import build, configs

    spec = importlib.util.spec_from_file_location("smoke", f"{ROOT}/configs/smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    c = smoke.get_config()
    c.data.task = "describe"
    with pytest.raises(ValueError, match="reward.model"):
        build.validate_config(c, 1, configs.algorithm(c))


def test_a_tiny_judge_goes_through_the_whole_path(reward_model_dir):
    """A random tiny Qwen2.5-VL judge on two describe prompts of two completions: greedy verdicts that do not
    parse score 0 and are counted; the `yes` rule equals a plain forward pass over each unpadded judge prompt."""
    import jax

    from rftjax import rewards, sharding
    from rftjax.data.chat import CheckpointTokenizer
    from rftjax.data.pipeline import Preprocess, image_input_for
    from rftjax.data.tasks import get_task
    from rftjax.models import hf, model_for

    config, params = hf.load_pretrained(reward_model_dir, max_image_tokens=16)
    tok = CheckpointTokenizer(reward_model_dir, config.image_token_id, instruction="")
    pre = Preprocess(tok, image_input_for(config), 256)
    task = get_task("describe")
    examples = [pre(task.example("train", i)) for i in range(2)]
    batch = pre.finish_batch(jax.tree.map(lambda *xs: np.stack(xs), *examples))
    texts = ["two red circles", "How many cubes?", "a blue triangle", "<think>"]
    view = rewards.RewardView(texts=texts, completion_ids=np.zeros((4, 2), np.int32),
                              completion_mask=np.ones((4, 2), bool), lengths=np.full(4, 2), answers=[""] * 4,
                              answer_types=["open"] * 4, prompt_index=np.asarray([0, 0, 1, 1], np.int32),
                              prompts=batch)
    judge = rm.JudgeSource(config, params, tok, rm.JudgeConfig(reward_model_dir, max_new_tokens=6), sharding.HOST)
    out = judge.score(view)
    np.testing.assert_array_equal(out["judge_unparsed"], 1.0)  # a random model gives no "Final Score: N"
    np.testing.assert_array_equal(out["judge"], 0.0)

    yes = rm.JudgeSource(config, params, tok, rm.JudgeConfig(reward_model_dir, parse="yes:a:b"), sharding.HOST)
    got = yes.score(view)["judge"]
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    for n, (t, p) in enumerate(zip(texts, view.prompt_index)):
        ids = tok.prompt_ids(yes.template.render(question=batch["question"][p], response=t, answer=""),
                             int(batch["image_tokens"][p]))
        images = jax.tree.map(lambda x: x[p:p + 1], batch["pixel_values"])
        logits = model_for(config).apply({"params": params}, images, jnp.asarray([ids], jnp.int32)).logits[0, -1]
        assert got[n] == pytest.approx(float(jax.nn.sigmoid(logits[a] - logits[b])), abs=1e-5)


def test_learned_rewards_read_every_image_and_video_of_a_row(reward_model_dir):
    """A row of two images of different sizes and a 4-frame video beside a one-image row, completions that write
    media placeholders: the reward model's scores equal the value head on a plain forward pass over each unpadded
    prompt with its own pixel values, and the judge's `yes` rule p(yes) / (p(yes) + p(no)) likewise; each rendered
    prompt holds every item's tokens (the model's own check would raise otherwise)."""
    import dataclasses

    import jax

    from rftjax import rewards, sharding
    from rftjax.data.chat import CheckpointTokenizer
    from rftjax.data.pipeline import Preprocess, SquareImages, image_input_for
    from rftjax.data.tokenizer import parse_spans
    from rftjax.data.video import Clip, VideoSampling
    from rftjax.models import hf, model_for

    model = rm.load_reward_model(reward_model_dir, max_image_tokens=48, max_media_items=3)
    config, params = hf.load_pretrained(reward_model_dir, max_image_tokens=48, max_media_items=3)
    tok = CheckpointTokenizer.for_model(reward_model_dir, config)
    sampling = VideoSampling(fps=2.0, min_frames=4, max_frames=4, frame_max_tokens=6)
    pre = Preprocess(tok, image_input_for(config, sampling), 512)
    rng = np.random.default_rng(7)
    image = lambda h, w: rng.integers(0, 256, (h, w, 3), np.uint8)  # noqa: E731
    rows = [{"question": "Compare <image> with <image>, then watch <video>: what moved?", "id": "many",
             "images": [image(56, 84), image(84, 56)], "video": Clip(image(4 * 56, 56).reshape(4, 56, 56, 3), 2.0),
             "answer": "", "answer_type": "open"},
            {"question": "What is it?", "id": "one", "image": image(56, 56), "answer": "", "answer_type": "open"}]
    batch = pre.finish_batch(jax.tree.map(lambda *xs: np.stack(xs), *[pre(r) for r in rows]))
    spans = [parse_spans(t) for t in batch["media_spans"]]
    square = dataclasses.replace(pre, extra_media=(("judge", SquareImages(size=28, num_tokens=4)),))
    assert square(rows[1])["judge_media_spans"] == '[["image", 4, []]]'
    with pytest.raises(ValueError, match="many: the judge reads its media differently .* exactly one image"):
        square(rows[0])
    assert [s.kind for s in spans[0]] == ["image", "image", "video"] and spans[0][2].tokens == 2 * 4
    texts = ["the <video> shows <image> and <|image_pad|>", "a cube<|video_pad|>"]
    view = rewards.RewardView(texts=texts, completion_ids=np.zeros((2, 2), np.int32),
                              completion_mask=np.ones((2, 2), bool), lengths=np.full(2, 2), answers=[""] * 2,
                              answer_types=["open"] * 2, prompt_index=np.asarray([0, 1], np.int32), prompts=batch)
    source = rm.RewardModelSource(model, tok, rm.ModelRewardConfig(reward_model_dir), sharding.HOST)
    judge = rm.JudgeSource(config, params, tok, rm.JudgeConfig(reward_model_dir, parse="yes:a:b"), sharding.HOST)
    scores, verdicts = source.score(view)["model"], judge.score(view)["judge"]
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    module = model_for(config)
    for n, (t, p) in enumerate(zip(texts, view.prompt_index)):
        images = jax.tree.map(lambda x: x[p:p + 1], batch["pixel_values"])
        clean = judge.clean(t)
        assert "<" not in clean.replace("<|", "")  # the placeholders are gone
        ids = tok.encode(tok.render_prompt(batch["question"][p], spans[p], response=clean))
        want_video = sum(s.total_tokens for s in spans[p] if s.kind == "video")
        assert ids.count(config.video_token_id) == want_video and ids.count(config.image_token_id) == sum(
            s.total_tokens for s in spans[p] if s.kind == "image")
        hidden = module.apply({"params": params}, images, jnp.asarray([ids], jnp.int32), return_hidden=True).hidden
        want = float(np.asarray(hidden)[0, -1] @ np.asarray(model.head["kernel"]) + float(model.head["bias"]))
        assert scores[n] == pytest.approx(want, abs=1e-4)
        ids = tok.prompt_ids(judge.template.render(question=batch["question"][p], response=clean, answer=""),
                             spans[p])
        logits = module.apply({"params": params}, images, jnp.asarray([ids], jnp.int32)).logits[0, -1]
        assert verdicts[n] == pytest.approx(float(jax.nn.sigmoid(logits[a] - logits[b])), abs=1e-5)


def test_the_planner_counts_the_reward_models_params(reward_model_dir):
    import importlib.util

    import jax

    from helpers import ROOT
    from rftjax import plan

    spec = importlib.util.spec_from_file_location("smoke", f"{ROOT}/configs/smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    c = smoke.get_config()
    c.plan.num_devices, c.reward.model = 1, reward_model_dir
    p = plan.plan(c)
    loaded = rm.load_reward_model(reward_model_dir)
    assert p.terms["reward model"] == sum(x.nbytes for x in jax.tree.leaves(loaded.params)) > 0
    assert p.terms["judge"] == 0 and "reward model" in plan.table(p)


def test_easyr1_rows_without_an_answer_are_kept_only_for_a_learned_reward(tmp_path):
    import json

    from PIL import Image

    from rftjax.data import importers

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    rows = [{"problem": "<image>What is 1+1?", "answer": "2", "images": ["a.png"]},
            {"problem": "<image>Describe it.", "images": ["a.png"]},
            {"problem": "<image>Describe it again.", "answer": " ", "images": ["a.png"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    kept, report = importers.import_easyr1(str(tmp_path / "d.jsonl"), on_error="skip")
    assert len(kept) == 1 and "reward.model" in report.skipped[0][1]
    kept, _ = importers.import_easyr1(str(tmp_path / "d.jsonl"), open_ended=True)
    assert [(e["answer"], e["answer_type"]) for e in kept] == [("2", "int"), ("", "open"), ("", "open")]

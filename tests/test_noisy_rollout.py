"""NoisyRollout: the DDPM noise against its formula (moments over many draws, the schedule by hand), the annealing
schedule at chosen steps, the media layouts' round trip (images and a video's frames), the group layout (clean half, noisy half, advantages over
the whole group, every row conditioned on the clean image), and an interrupted run resumed exactly."""

import math
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from rftjax import rewards, rl, sampling
from rftjax.batches import RolloutBatch
from rftjax.data import augment
from rftjax.data.pipeline import QwenPatchImages, SquareImages
from rftjax.data.qwen_image import QwenImageProcessor
from rftjax.data.video import Clip
from rftjax.metrics import read_jsonl
from rftjax.models.qwen_vl import QwenImages
from rftjax.rollout import RolloutConfig, collect_rollouts
from helpers import ROOT, set_by_path, strip_timings

SQUARE = SquareImages(size=8, num_tokens=4)


def test_ddpm_schedule_by_hand():
    """beta_0 = sigmoid(-6) (5e-3 - 1e-5) + 1e-5 = 2.2338e-5; beta_999 = sigmoid(6) (...) + 1e-5 = 4.98766e-3."""
    abar = augment.ddpm_alphas_cumprod()
    beta0 = 1 / (1 + math.exp(6)) * (5e-3 - 1e-5) + 1e-5
    assert abar.shape == (1000,) and abar[0] == pytest.approx(1 - beta0, abs=1e-12)
    assert beta0 == pytest.approx(2.2338e-5, rel=1e-4)
    beta_last = 1 / (1 + math.exp(-6)) * (5e-3 - 1e-5) + 1e-5
    assert abar[-1] / abar[-2] == pytest.approx(1 - beta_last, abs=1e-12)
    product = 1.0
    for i, x in enumerate(np.linspace(-6, 6, 1000)[:501]):  # an independent running product
        product *= 1 - (1 / (1 + math.exp(-x)) * (5e-3 - 1e-5) + 1e-5)
    assert abar[500] == pytest.approx(product, rel=1e-12)
    assert 0.6 < abar[500] < 0.9  # the paper's a0 = 500: x_t = ~0.87 x0 + ~0.5 eps


@pytest.mark.parametrize("t", [0, 120, 500, 999])
def test_ddpm_noise_has_the_formulas_mean_and_variance(t):
    """x_t | x0 ~ N(sqrt(abar_t) x0, (1 - abar_t) I): over 200k draws the sample mean and variance are within 5
    standard errors of the formula."""
    x0 = np.full((200_000,), 0.3, np.float32)
    xt = augment.ddpm_forward(x0, t, np.random.default_rng(t))
    abar = augment.ddpm_alphas_cumprod()[t]
    var = 1 - abar
    n = x0.size
    assert abs(xt.mean() - math.sqrt(abar) * 0.3) < 5 * math.sqrt(var / n)
    assert abs(xt.var() - var) < 5 * var * math.sqrt(2 / n)
    with pytest.raises(ValueError, match="DDPM step"):
        augment.ddpm_forward(x0, 1000, np.random.default_rng(0))


def test_annealing_schedule_at_chosen_steps():
    """a0 (1 - sigmoid(lam (t - gam) / t_max)), a0 = 500, lam = 30, gam = 40, t_max = 100: t = 0 -> x = -12,
    500 (1 - 6.1e-6) -> 499; t = 40 -> x = 0 -> 250; t = 50 -> x = 3 -> 500 (1 - 0.952574) = 23.7 -> 23;
    t = 100 -> x = 18 -> 0. Rotation: 30 degrees x the same factor."""
    noisy = augment.NoisyRollout(SQUARE, total_steps=100)
    assert [noisy.strength(t) for t in (0, 40, 50, 100)] == [499, 250, 23, 0]
    assert noisy.decay(50) == pytest.approx(1 - 1 / (1 + math.exp(-3)), abs=1e-12)
    rotate = augment.NoisyRollout(SQUARE, total_steps=100, kind="rotate")
    assert rotate.strength(40) == pytest.approx(15.0) and rotate.strength(0) == pytest.approx(30 * (1 - 1 / (1 + math.exp(12))))
    for bad in (dict(kind="blur"), dict(noise_step=1000), dict(max_angle=-1.0), dict(total_steps=0)):
        with pytest.raises(ValueError, match="noisy_rollout"):
            augment.NoisyRollout(SQUARE, **{"total_steps": 10, **bad})


def test_media_layouts_round_trip_and_noise_every_real_pixel_once():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(SQUARE.from_unit(SQUARE.to_unit(pixels), pixels), pixels, atol=1e-6)
    assert SQUARE.to_unit(pixels).min() >= 0 and SQUARE.to_unit(pixels).max() <= 1

    proc = QwenImageProcessor(patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16, max_pixels=64)
    media = QwenPatchImages(proc, max_image_tokens=4)
    images = [rng.integers(0, 256, (8, 8, 3), np.uint8), rng.integers(0, 256, (4, 8, 3), np.uint8)]
    batch = jax.tree.map(lambda *x: np.stack(x), *[media(im) for im in images])
    unit = media.to_unit(batch)
    assert unit.shape == (2, 16, 3, 2, 4)
    real = np.arange(16)[None] < np.prod(batch.grid_thw, -1).sum(1)[:, None]  # the second image has padding patches
    assert not real.all() and unit[real].min() >= -1e-6 and unit[real].max() <= 1 + 1e-6
    np.testing.assert_allclose(media.from_unit(unit, batch).patches, batch.patches, atol=1e-5)
    noisy = augment.NoisyRollout(media, total_steps=10).distort(batch, 0, np.random.default_rng(1))
    p = noisy.patches.reshape(2, 16, 3, 2, 4)
    np.testing.assert_array_equal(p[:, :, :, 0], p[:, :, :, 1])  # an image's two temporal copies: one noise
    np.testing.assert_array_equal(noisy.patches[~real], batch.patches[~real])  # padding untouched
    assert np.abs(noisy.patches[real] - batch.patches[real]).mean() > 0.5
    np.testing.assert_array_equal(noisy.grid_thw, batch.grid_thw)


def test_noise_on_a_video_row_keeps_each_frame_and_an_images_copies_together():
    """A row of an image (4 patches) and a 4-frame video (2 temporal patches x 4 patches): the round trip is exact;
    the noise keeps the video's frames apart (each its own draw, as NoisyRollout noising the frames before the
    processor) and the image's two copies of itself equal."""
    rng = np.random.default_rng(2)
    proc = QwenImageProcessor(patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16, max_pixels=64)
    media = QwenPatchImages(proc, max_image_tokens=4, max_items=2)
    frames = rng.integers(0, 256, (4, 4, 4, 3), np.uint8)
    row = media.pack([("image", rng.integers(0, 256, (4, 4, 3), np.uint8)), ("video", Clip(frames, fps=2.0))])
    batch = jax.tree.map(lambda x: np.asarray(x)[None], row)
    np.testing.assert_array_equal(batch.grid_thw[0], [[1, 2, 2], [2, 2, 2]])
    np.testing.assert_allclose(media.from_unit(media.to_unit(batch), batch).patches, batch.patches, atol=1e-5)
    before = batch.patches.reshape(1, 16, 3, 2, 4)
    assert np.abs(before[0, 4:12, :, 0] - before[0, 4:12, :, 1]).mean() > 0.1  # the video's frames differ
    noisy = augment.NoisyRollout(media, total_steps=10).distort(batch, 0, np.random.default_rng(1))
    p = noisy.patches.reshape(1, 16, 3, 2, 4)
    np.testing.assert_array_equal(p[0, :4, :, 0], p[0, :4, :, 1])
    change = p - before
    assert np.abs(change[0, 4:12, :, 0] - change[0, 4:12, :, 1]).mean() > 0.5  # independent draws per frame
    np.testing.assert_array_equal(p[0, 12:], before[0, 12:])


def test_rotation_with_expansion():
    """0 degrees is the image; 90 degrees (the canvas keeps its size) is np.rot90 up to bilinear resampling; 45
    degrees shrinks the image into a canvas sqrt(2) wider, leaving black corners."""
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(augment.rotate_expand(image, np.array([0.0])), image, atol=1e-6)
    np.testing.assert_allclose(augment.rotate_expand(image, np.array([90.0]))[0], np.rot90(image[0]), atol=1e-5)
    turned = augment.rotate_expand(np.ones((1, 16, 16, 3), np.float32), np.array([45.0]))[0]
    assert turned[0, 0].max() == 0 and turned[8, 8].min() == pytest.approx(1.0)
    noisy = augment.NoisyRollout(QwenPatchImages(QwenImageProcessor(), 4), total_steps=1, kind="rotate")
    with pytest.raises(ValueError, match="square"):
        noisy.distort(QwenImages(np.zeros((1, 4, 1176), np.float32), np.asarray([[1, 2, 2]])), 0, rng)


class _StubPolicy:
    """Samples completion j of prompt row r as the tokens (r, j): the rollouts' rows say where they came from.
    Rows of the second half of its batch (the noisy copies) answer correctly, so groups have reward signal."""

    def __init__(self):
        self.batches = []

    def generate(self, batch, rng, params, place):
        self.batches.append(batch)
        b, g, t = len(batch["prompt_ids"]), params.group_size, 4
        rows = np.repeat(np.arange(b), g)
        ids = np.stack([rows, np.tile(np.arange(g), b), rows, rows], 1).astype(np.int32)
        out = sampling.SamplingOutput(
            completion_ids=ids, completion_mask=np.ones((b * g, t), bool),
            model_logprobs=-np.ones((b * g, t), np.float32), lengths=np.full(b * g, t, np.int32),
            truncated=np.zeros(b * g, bool))
        texts = ["<answer>7</answer>" if r >= b // 2 else "<answer>1</answer>" for r in rows]
        return out, texts


def _prompts(b, rng):
    ids = rng.integers(5, 50, (b, 6)).astype(np.int32)
    return {"pixel_values": rng.uniform(-1, 1, (b, 8, 8, 3)).astype(np.float32), "prompt_ids": ids,
            "prompt_mask": np.ones_like(ids, bool), "answer": ["7"] * b, "answer_type": ["int"] * b}


def test_groups_hold_a_clean_and_a_noisy_half_and_the_update_sees_the_clean_image():
    b, g = 3, 4
    prompts = _prompts(b, np.random.default_rng(0))
    policy = _StubPolicy()
    noisy = augment.NoisyRollout(SQUARE, total_steps=10)
    config = RolloutConfig(sampling.SamplingParams(group_size=g, max_new_tokens=4), prompts_per_step=b,
                           noisy_rollout=noisy)
    reward = rewards.build_rewards(rewards.RewardConfig(num_workers=0), 0, None)
    key = jax.random.key(3)
    out = collect_rollouts(policy, iter([prompts]), key, config, reward, step=2)
    sent = policy.batches[0]
    # The sampler got the B clean images, then B distorted copies of them (the prompts twice), G/2 samples each.
    np.testing.assert_array_equal(sent["pixel_values"][:b], prompts["pixel_values"])
    assert np.abs(sent["pixel_values"][b:] - prompts["pixel_values"]).mean() > 0.1
    np.testing.assert_array_equal(sent["prompt_ids"], np.concatenate([prompts["prompt_ids"]] * 2))
    data = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, 0), 1 << 29))).ravel()
    want = noisy.distort(prompts["pixel_values"], 2, np.random.default_rng(data.tolist() + [0]))
    np.testing.assert_array_equal(sent["pixel_values"][b:], want)
    # Group i: rows of clean prompt i, then of its noisy copy (sampler row b + i); flagged; all conditioned on the
    # clean image i (the media stored once per prompt).
    batch: RolloutBatch = out.batch
    source = np.asarray(batch.seq.completion_ids)[:, 0]
    np.testing.assert_array_equal(source, np.concatenate([[i, i, b + i, b + i] for i in range(b)]))
    np.testing.assert_array_equal(batch.noisy, np.tile([False, False, True, True], b))
    np.testing.assert_array_equal(batch.seq.pixel_values, prompts["pixel_values"])
    np.testing.assert_array_equal(batch.seq.prompt_index, np.repeat(np.arange(b), g))
    # Rewards: the noisy half answers right; GRPO's advantages normalise over all G = 4 rows of each group.
    r = np.asarray(batch.rewards)
    assert r.reshape(b, g)[:, 2:].min() > r.reshape(b, g)[:, :2].max()
    adv, _ = rl.compute_advantages(rl.AlgorithmConfig(group_size=g), batch.rewards, batch.seq.completion_mask)
    groups = r.reshape(b, g)
    want = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(adv).reshape(b, g), want, rtol=1e-5)
    assert out.stats["rollout_accuracy_noisy"] == 1.0 and out.stats["rollout_accuracy_clean"] == 0.0
    assert out.stats["noisy_rollout_strength"] == noisy.strength(2)
    with pytest.raises(ValueError, match="even group_size"):
        RolloutConfig(sampling.SamplingParams(group_size=3, max_new_tokens=4), prompts_per_step=b,
                      noisy_rollout=noisy)


def test_interrupted_noisy_corrected_run_resumes_exactly(tmp_path):
    """The smoke run with NoisyRollout and token-level rollout correction: rerun from the checkpoint two RL steps
    before the end, its metrics equal the uninterrupted run's."""
    from rftjax.train import Trainer

    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import smoke

    config = smoke.get_config("grpo")
    for key, value in {"checkpoint.every": 1, "rl.steps": 4, "rl.noisy_rollout.kind": "gaussian",
                       "rl.noisy_rollout.decay_mid_step": 2.0, "rl.algo.rollout_correction": "token",
                       "mesh.num_devices": 1, "eval.every": 100}.items():
        set_by_path(config, key, value)
    workdir = str(tmp_path / "run")
    Trainer(config, workdir).run()
    first = strip_timings(read_jsonl(os.path.join(workdir, "metrics.jsonl")))
    rl_rows = [m for m in first if m.get("stage") == "rl"]
    assert len(rl_rows) == 4 and all("rollout_corr_ess" in m for m in rl_rows)
    assert rl_rows[0]["noisy_rollout_strength"] > rl_rows[-1]["noisy_rollout_strength"]  # annealed
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    for s in steps[-2:]:
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(s)))
    Trainer(config, workdir).run()
    again = strip_timings(read_jsonl(os.path.join(workdir, "metrics.jsonl")))
    assert again == first

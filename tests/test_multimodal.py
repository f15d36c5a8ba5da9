"""Several images and videos per row (Qwen2.5-VL, Qwen2-VL, Qwen3-VL) against transformers, the video
processor's arithmetic against a hand-built torch reference of transformers' video-processor patchify, and
PyAV frame sampling on an mp4 the test writes.

Batches: (a) a 2-image row (images of different sizes, text between) and a left-padded 1-image row; (b) a row
with a 4-frame video (2 temporal patches) and a left-padded image row. Patches come from rftjax's processor
(`QwenPatchImages.pack`), the prompt's tokens from its `spans`; transformers gets the same pixels as
`pixel_values` / `pixel_values_videos` with `image_grid_thw` / `video_grid_thw` / `second_per_grid_ts`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import HALF, QWEN_IDS, make_hf_qwen3_vl, make_hf_qwen_vl, torch
from rftjax.data.pipeline import image_input_for
from rftjax.data.qwen_image import QwenImageProcessor
from rftjax.data.video import (Clip, VideoSampling, frame_indices, read_video, second_per_grid_t,
                               temporal_patch_times, write_video)
from rftjax.models import QwenImages, model_for
from rftjax.models import hf as rhf
from rftjax.models.qwen_vl import mrope_positions

SAMPLING = VideoSampling(fps=2.0, min_frames=4, max_frames=4, frame_max_tokens=6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (HF model, rftjax config, params), each built once."""
    cache = {}

    def get(family):
        if family not in cache:
            tmp = tmp_path_factory.mktemp(family)
            model, path = (make_hf_qwen3_vl(tmp) if family == "qwen3_vl" else make_hf_qwen_vl(tmp, family=family))
            cache[family] = (model, *rhf.load_pretrained(path, max_image_tokens=32, max_media_items=3))
        return cache[family]

    return get


def _clip(rng, frames: int, height: int, width: int, fps: float, total: int) -> Clip:
    """`frames` random frames sampled from a `total`-frame source at `fps` (the indices of `frame_indices`)."""
    idx = np.linspace(0, total - 1, frames).round().astype(int)
    return Clip(rng.integers(0, 256, (frames, height, width, 3), np.uint8), fps, idx, total)


def _batch(config, rows, rng):
    """rows: `[(pad, [("text", n) | ("image", uint8 [H, W, 3]) | ("video", Clip)])]` -> rftjax's and transformers'
    inputs of the left-padded batch (see the module docstring)."""
    media = image_input_for(config, SAMPLING)
    ids_rows, packed = [], []
    hf = {"pixel_values": [], "image_grid_thw": [], "pixel_values_videos": [], "video_grid_thw": [],
          "second_per_grid_ts": []}
    for _, segments in rows:
        items = [(kind, v) for kind, v in segments if kind != "text"]
        spans = iter(media.spans([v.meta if kind == "video" else v.shape[:2] for kind, v in items]))
        row = []
        for kind, value in segments:
            if kind == "text":
                row += rng.integers(4, 150, value).tolist()
                continue
            span = next(spans)
            token = QWEN_IDS["image_token_id" if kind == "image" else "video_token_id"]
            for _ in range(max(len(span.timestamps), 1)):  # Qwen3-VL: a timestamp (text) before each frame
                row += rng.integers(4, 150, 3).tolist() if span.timestamps else []
                row += [QWEN_IDS["vision_start_token_id"]] + [token] * span.tokens + [QWEN_IDS["vision_end_token_id"]]
            if kind == "image":
                patches, grid = media.processor(value)
                hf["pixel_values"].append(patches)
                hf["image_grid_thw"].append(grid)
            else:
                patches, grid = media.processor.video(value.frames, media.frame_max_pixels)
                hf["pixel_values_videos"].append(patches)
                hf["video_grid_thw"].append(grid)
                hf["second_per_grid_ts"].append(second_per_grid_t(value.meta, len(value.frames), 2))
        ids_rows.append(row)
        packed.append(media.pack(items))
    length = max(p + len(r) for (p, _), r in zip(rows, ids_rows))
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(ids_rows):
        ids[b, length - len(r):], mask[b, length - len(r):] = r, 1
    images = jax.tree.map(lambda *x: np.stack(x), *packed)
    types = (ids == QWEN_IDS["image_token_id"]) * 1 + (ids == QWEN_IDS["video_token_id"]) * 2
    kwargs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
    for key in ("pixel_values", "pixel_values_videos"):
        if hf[key]:
            kwargs[key] = np.concatenate(hf[key])
    for key in ("image_grid_thw", "video_grid_thw"):
        if hf[key]:
            kwargs[key] = np.stack(hf[key])
    if hf["second_per_grid_ts"] and config.model_type == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = np.asarray(hf["second_per_grid_ts"], np.float32)
    return images, ids, mask, kwargs


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, params, images, ids, mask):
    return model_for(config).apply({"params": params}, images, ids, mask).logits


def _compare(model, config, params, images, ids, mask, kwargs):
    with torch.no_grad():
        ref = model(**{k: torch.tensor(v) for k, v in kwargs.items()}).logits.float().numpy()
    ours = np.asarray(_apply(config, params, jax.tree.map(jnp.asarray, images), jnp.asarray(ids, jnp.int32),
                             jnp.asarray(mask, bool)))
    valid = mask.astype(bool)
    assert np.abs(ref[valid]).max() > 0.5
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
    return ref


FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]


def _unit(config) -> int:
    return config.vision.patch_size * config.vision.spatial_merge_size


@pytest.mark.parametrize("family", FAMILIES)
def test_two_image_row_and_one_image_row_match_transformers(models, family):
    model, config, params = models(family)
    u, rng = _unit(config), np.random.default_rng(1)
    img = lambda h, w: rng.integers(0, 256, (h * u, w * u, 3), np.uint8)  # noqa: E731  h x w merged tokens
    rows = [(0, [("text", 3), ("image", img(2, 4)), ("text", 2), ("image", img(3, 2)), ("text", 2)]),
            (4, [("text", 2), ("image", img(4, 3)), ("text", 3)])]
    images, ids, mask, kwargs = _batch(config, rows, rng)
    assert np.asarray(images.grid_thw)[0, :2, 1:].tolist() == [[4, 8], [6, 4]]
    _compare(model, config, params, images, ids, mask, kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_video_row_matches_transformers(models, family):
    """4 frames of a 5-frame source at 3 fps: 2 temporal patches, `second_per_grid_t` = 2 * (5/3 s) / 4, so
    Qwen2.5-VL's temporal step 4 * 0.833 = 3.33 is floored (positions 0, 3); Qwen3-VL gets 2 timestamped frames."""
    model, config, params = models(family)
    u, rng = _unit(config), np.random.default_rng(2)
    clip = _clip(rng, 4, 2 * u, 3 * u, fps=3.0, total=5)
    rows = [(0, [("text", 2), ("video", clip), ("text", 3)]),
            (3, [("text", 2), ("image", rng.integers(0, 256, (2 * u, 2 * u, 3), np.uint8)), ("text", 2)])]
    images, ids, mask, kwargs = _batch(config, rows, rng)
    grids = np.asarray(images.grid_thw)
    if family == "qwen3_vl":  # one t = 1 item per temporal patch
        assert grids[0, :2].tolist() == [[1, 4, 6], [1, 4, 6]]
    else:
        assert grids[0, 0].tolist() == [2, 4, 6] and kwargs["video_grid_thw"].tolist() == [[2, 4, 6]]
    _compare(model, config, params, images, ids, mask, kwargs)
    pos = np.asarray(mrope_positions(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images.grid_thw), config,
                                     jnp.asarray(images.time_interval)))
    video = ids[0] == QWEN_IDS["video_token_id"]
    # Qwen3-VL: frame 2 is its own item, after frame 1's extent max(2, 3) and 5 text tokens (</v>, timestamp, <v>)
    want = {"qwen2_5_vl": [0, 3], "qwen2_vl": [0, 1], "qwen3_vl": [0, 8]}[family]
    assert sorted(set((pos[0, 0, video] - pos[0, 0, video].min()).tolist())) == want


def test_video_patches_equal_transformers_video_processor_arithmetic():
    """`QwenImageProcessor.video` against transformers' `Qwen2VLVideoProcessor` / `Qwen3VLVideoProcessor` steps
    written out in torch (their `_preprocess` needs torchvision): rescale, normalise, pad to a multiple of the
    temporal patch by repeating the last frame, `patchify`'s view and permute. 3 frames at the target size
    (no resize), then 4 frames that need resizing (PIL bicubic per frame, then the same)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for patch, mean in ((14, None), (16, HALF)):
        norm = {} if mean is None else dict(mean=mean[0], std=mean[1])
        proc = QwenImageProcessor(patch_size=patch, min_pixels=(2 * patch) ** 2, **norm)
        for frames, (h, w), budget in ((3, (2 * 2 * patch, 3 * 2 * patch), 6), (4, (70, 130), 4)):
            video = rng.integers(0, 256, (frames, h, w, 3), np.uint8)
            ours, grid = proc.video(video, budget * proc.factor ** 2)
            rh, rw = proc.frame_size(h, w, budget * proc.factor ** 2)
            if (rh, rw) != (h, w):
                video = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.BICUBIC)) for f in video])
            x = torch.tensor(video).permute(0, 3, 1, 2)[None].double() * (1 / 255)
            x = x.float()
            x = (x - torch.tensor(proc.mean).view(1, 1, 3, 1, 1)) / torch.tensor(proc.std).view(1, 1, 3, 1, 1)
            if pad := -x.shape[1] % 2:
                x = torch.cat((x, x[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
            b, t, c, hh, ww = x.shape
            gt, gh, gw = t // 2, hh // patch, ww // patch
            ref = x.view(b, gt, 2, c, gh // 2, 2, patch, gw // 2, 2, patch).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
            ref = ref.reshape(gt * gh * gw, c * 2 * patch * patch).numpy()
            assert grid.tolist() == [gt, gh, gw] and gt == 2
            np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_frame_sampling_on_an_mp4_follows_the_documented_rule(tmp_path):
    """A 20-frame mp4 at 10 fps whose frame i is grey level 12 i: fps 2 takes floor(20 / 10 * 2) = 4 frames at
    round(linspace(0, 19, 4)) = [0, 6, 13, 19]; their temporal patches are at (0 + 0.6) / 2 and (1.3 + 1.9) / 2
    s, each spanning 2 * 2 s / 4 = 1 s."""
    frames = np.stack([np.full((32, 48, 3), 12 * i, np.uint8) for i in range(20)])
    path = write_video(str(tmp_path / "ramp.mp4"), frames, fps=10)
    clip = read_video(path, VideoSampling(fps=2.0, min_frames=4, max_frames=16))
    assert clip.indices.tolist() == [0, 6, 13, 19] and clip.total_frames == 20 and clip.fps == 10
    # mpeg4's limited-range YUV shifts grey levels by up to 2 %; a neighbouring frame would be 12 levels off
    np.testing.assert_allclose(clip.frames.reshape(4, -1).mean(1), [0, 72, 156, 228], atol=2, rtol=0.03)
    np.testing.assert_allclose(temporal_patch_times(clip.indices, clip.fps, 2), [0.3, 1.6])
    assert second_per_grid_t(clip.meta, len(clip.frames), 2) == pytest.approx(1.0)
    # the bounds: a long clip is capped at max_frames, a short one gives all its frames
    assert frame_indices(1000, 10, VideoSampling(fps=2.0, max_frames=16)).tolist() == \
        np.linspace(0, 999, 16).round().astype(int).tolist()
    assert frame_indices(3, 10, VideoSampling(fps=2.0, min_frames=4)).tolist() == [0, 1, 2]
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable video"):
        read_video(str(tmp_path / "bad.mp4"), VideoSampling())

"""Several images and videos per row (Qwen2.5-VL, Qwen2-VL, Qwen3-VL, Qwen3.5) against transformers, the video
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

from hf_reference import HALF, QWEN_IDS, make_hf_qwen3_5, make_hf_qwen3_vl, make_hf_qwen_vl, torch
from rftjax.data.pipeline import image_input_for
from rftjax.data.qwen_image import QwenImageProcessor
from rftjax.data.video import (Clip, VideoMeta, VideoSampling, frame_indices, read_video, second_per_grid_t,
                               temporal_patch_times, write_video)
from rftjax.models import model_for
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
            makers = {"qwen3_vl": make_hf_qwen3_vl, "qwen3_5": make_hf_qwen3_5}
            model, path = makers[family](tmp) if family in makers else make_hf_qwen_vl(tmp, family=family)
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


FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5"]


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
    Qwen2.5-VL's temporal step 4 * 0.833 = 3.33 is floored (positions 0, 3); Qwen3-VL gets 2 timestamped frames.
    Beside it a one-image row and a row of two videos of different sizes and lengths."""
    model, config, params = models(family)
    u, rng = _unit(config), np.random.default_rng(2)
    clip = _clip(rng, 4, 2 * u, 3 * u, fps=3.0, total=5)
    rows = [(0, [("text", 2), ("video", clip), ("text", 3)]),
            (3, [("text", 2), ("image", rng.integers(0, 256, (2 * u, 2 * u, 3), np.uint8)), ("text", 2)]),
            (1, [("text", 2), ("video", _clip(rng, 2, 2 * u, 2 * u, fps=2.0, total=2)), ("text", 1),
                 ("video", _clip(rng, 4, 3 * u, 2 * u, fps=4.0, total=4)), ("text", 2)])]
    images, ids, mask, kwargs = _batch(config, rows, rng)
    grids = np.asarray(images.grid_thw)
    if family in ("qwen3_vl", "qwen3_5"):  # one t = 1 item per temporal patch
        assert grids[0, :2].tolist() == [[1, 4, 6], [1, 4, 6]]
        assert grids[2].tolist() == [[1, 4, 4], [1, 6, 4], [1, 6, 4]]
    else:
        assert grids[0, 0].tolist() == [2, 4, 6] and grids[2, :2].tolist() == [[1, 4, 4], [2, 6, 4]]
        assert kwargs["video_grid_thw"].tolist() == [[2, 4, 6], [1, 4, 4], [2, 6, 4]]
    _compare(model, config, params, images, ids, mask, kwargs)
    pos = np.asarray(mrope_positions(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images.grid_thw), config,
                                     jnp.asarray(images.time_interval)))
    video = ids[0] == QWEN_IDS["video_token_id"]
    # Qwen3-VL: frame 2 is its own item, after frame 1's extent max(2, 3) and 5 text tokens (</v>, timestamp, <v>)
    want = {"qwen2_5_vl": [0, 3], "qwen2_vl": [0, 1], "qwen3_vl": [0, 8], "qwen3_5": [0, 8]}[family]
    assert sorted(set((pos[0, 0, video] - pos[0, 0, video].min()).tolist())) == want
    if family == "qwen2_5_vl":  # text after the video: transformers 5 continues 3 = max(2, 3) past the video's start;
        # Qwen's reference rule one past its largest position, the temporal 3: 4 past it
        after = np.nonzero(video)[0][-1] + 1
        classic = np.asarray(mrope_positions(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images.grid_thw),
                                             config.replace(text_after_video="max"), jnp.asarray(images.time_interval)))
        start = pos[0, 0, video].min()
        assert pos[:, 0, after].tolist() == [start + 3] * 3 and classic[:, 0, after].tolist() == [start + 4] * 3
        np.testing.assert_array_equal(classic[:, 0, :after], pos[:, 0, :after])
        assert (classic[:, 1] == pos[:, 1]).all()  # the image row is the same under both rules


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


def test_example_media_probes_a_video_path_once_and_loads_every_image_kind(tmp_path, monkeypatch):
    """A row with a PIL image (greyscale), an array and an mp4 path: `example_media` orders them by the placeholders
    and turns the path into a `VideoRef` (its header read once); `load_media` gives uint8 `[H, W, 3]` images and
    the sampled clip; `media_meta` reads sizes without decoding."""
    from PIL import Image

    from rftjax.data import media
    from rftjax.data.media import example_media, load_media, media_meta
    from rftjax.data.video import VideoRef, probe_video

    probes = []

    def counted(value):
        probes.append(value)
        return probe_video(value)

    monkeypatch.setattr(media, "probe_video", counted)
    path = write_video(str(tmp_path / "c.mp4"), np.zeros((6, 16, 32, 3), np.uint8), fps=3)
    ex = {"question": "<video> then <image> and <image>", "video": path,
          "images": [Image.new("L", (5, 3)), np.ones((4, 2, 3), np.uint8)]}
    items = example_media(ex)
    assert [k for k, _ in items] == ["video", "image", "image"] and isinstance(items[0][1], VideoRef)
    assert [media_meta(k, v) for k, v in items][1:] == [(3, 5), (4, 2)]
    assert media_meta(*items[0]) == VideoMeta(6, 3.0, 16, 32)
    loaded = [load_media(k, v, VideoSampling(fps=2.0, min_frames=4)) for k, v in items]
    assert loaded[1].shape == (3, 5, 3) and loaded[1].dtype == np.uint8 and loaded[2].shape == (4, 2, 3)
    assert loaded[0].indices.tolist() == [0, 2, 3, 5] and loaded[0].frames.shape == (4, 16, 32, 3)
    assert probes == [path]
    with pytest.raises(ValueError, match="do not match"):
        example_media({"question": "<image>", "video": path})


# ----------------------------------------------------------------------------------------------------------
# Rewards of Video-R1's question types, the motion task, Video-R1 rows, prompts with videos, row budgets


def test_video_r1_rewards_equal_the_references():
    """ROUGE against `rouge_score`, WER against `jiwer`, the numeric types by hand; hostile output scores 0."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    jiwer = pytest.importorskip("jiwer")
    from rftjax.rewards import accuracy

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for pred, gold in (("a red ball", "a red cube"), ("The cat sat on the mat.", "the cat is on a mat"),
                       ("nothing alike", "completely different words here"), ("Same text", "same text")):
        want = np.mean([s.fmeasure for s in scorer.score(gold, pred).values()])
        assert accuracy(pred, gold, "free-form") == pytest.approx(want, abs=1e-12)
    for pred, gold in (("the cat sat down", "the cat sat"), ("one two", "one two three four"), ("x y z w v", "a")):
        assert accuracy(pred, gold, "ocr") == pytest.approx(1 - min(1.0, jiwer.wer(gold, pred)), abs=1e-12)
    assert accuracy("12", "10", "regression") == pytest.approx(0.8)
    assert accuracy("25", "10", "regression") == 0.0 and accuracy("-5", "-5", "regression") == pytest.approx(1.0)
    assert accuracy("3.50", "3.5", "numerical") == 1.0 and accuracy("3.504", "3.5", "numerical") == 1.0
    assert accuracy("4", "4.0", "numerical") == 0.0 and accuracy("3.6", "3.5", "numerical") == 0.0
    for kind in ("numerical", "ocr", "free-form", "regression"):
        for hostile in (None, "", "x" * 100_000, "1e999", "\x00" * 50):
            assert 0.0 <= accuracy(hostile, "42", kind) <= 1.0


def test_motion_task_answers_follow_from_its_frames():
    """Direction: the one object that changes place moves the way the answer says; count: the last frame holds
    as many objects as the answer, the first frame fewer unless all start at 0; traces end in the answer."""
    from scipy import ndimage

    from rftjax.data.tasks import get_task
    from rftjax.data.tasks.motion import DIRECTIONS

    task = get_task("motion")
    kinds = set()
    for i in range(24):
        ex = task.example("train", i)
        frames, meta = ex["video"].frames, __import__("json").loads(ex["meta"])
        assert frames.shape == (8, 64, 64, 3) and "image" not in ex
        assert ex["reasoning"].endswith(f"<answer>{ex['answer']}</answer>")
        kinds.add(meta["kind"])
        lit = lambda f: (f.max(-1) > 60)  # noqa: E731  object pixels (the background is 24)
        if meta["kind"] == "count":
            assert ndimage.label(lit(frames[-1]))[1] == int(ex["answer"])
            assert ndimage.label(lit(frames[0]))[1] == sum(t == 0 for t in meta["starts"])
        else:
            moved = lit(frames[0]) ^ lit(frames[-1])
            ys, xs = np.nonzero(lit(frames[-1]) & moved)
            y0, x0 = np.nonzero(lit(frames[0]) & moved)
            dx, dy = DIRECTIONS[meta["direction"]]
            assert np.sign(round(xs.mean() - x0.mean())) == dx and np.sign(round(ys.mean() - y0.mean())) == dy
            assert ex["answer"] == "ABCD"[list(DIRECTIONS).index(meta["direction"])]
    assert kinds == {"count", "direction"}
    assert task.example("test_ood", 0)["video"].frames.shape[0] == 16


def test_video_r1_rows_import_and_become_prompts_with_timestamped_frames(qwen3_dir, tmp_path):
    """A Video-R1 json (a multiple-choice video row, a numerical image row, a bad row) through `load_dataset` and
    `Preprocess` with a Qwen3-VL checkpoint's tokenizer: options in the question, answers without tags, each
    temporal patch a `<t seconds>` block of its tokens, patches equal to the processor's."""
    import json

    from rftjax.data import importers
    from rftjax.data.chat import CheckpointTokenizer
    from rftjax.data.pipeline import Preprocess

    _, ckpt = qwen3_dir
    config, _ = rhf.load_pretrained(ckpt, max_image_tokens=64, max_media_items=4)
    rng = np.random.default_rng(4)
    write_video(str(tmp_path / "clip.mp4"), rng.integers(0, 256, (12, 64, 96, 3), np.uint8), fps=4)
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / "still.png")
    rows = [{"problem_id": 7, "problem": "Where does the ball go?", "data_type": "video", "path": "clip.mp4",
             "problem_type": "multiple choice", "options": ["A. left", "B. right"], "solution": "<answer>B</answer>",
             "process": "<think>It rolls right.</think>"},
            {"problem_id": 8, "problem": "How long is it?", "data_type": "image", "path": "still.png",
             "problem_type": "numerical", "options": [], "solution": "<answer>3.5</answer>"},
            {"problem_id": 9, "problem": "?", "data_type": "video", "path": "gone.mp4", "problem_type": "OCR",
             "solution": "<answer>x</answer>"}]
    (tmp_path / "v.json").write_text(json.dumps(rows))
    sampling = VideoSampling(fps=2.0, min_frames=4, max_frames=8, frame_max_tokens=6)
    source, report = importers.load_dataset(f"videor1:{tmp_path / 'v.json'}", video=sampling)
    assert report.kept == 2 and "does not exist" in report.skipped[0][1]
    video_row, image_row = source[0], source[1]
    assert video_row["question"] == "Where does the ball go?\nOptions:\nA. left\nB. right"
    assert (video_row["answer"], video_row["answer_type"]) == ("B", "choice")
    assert video_row["reasoning"] == "<think>It rolls right.</think><answer>B</answer>"
    assert (image_row["answer"], image_row["answer_type"]) == ("3.5", "numerical")
    clip = video_row["video"]  # 12 frames at 4 fps = 3 s: floor(3 * 2) = 6 frames
    assert clip.indices.tolist() == [0, 2, 4, 7, 9, 11]
    tok = CheckpointTokenizer(ckpt, config.image_token_id, video_token_id=config.video_token_id,
                              vision_start_id=config.vision_start_token_id, vision_end_id=config.vision_end_token_id)
    pre = Preprocess(tok, image_input_for(config, sampling), max_prompt_len=160)
    out = pre(video_row)
    text = tok.tok.decode(out["prompt_ids"][out["prompt_mask"]].tolist(), skip_special_tokens=False)
    times = temporal_patch_times(clip.indices, 4.0, 2)  # (0 + .5) / 2, (1 + 1.75) / 2, (2.25 + 2.75) / 2
    assert times == pytest.approx([0.25, 1.375, 2.5])
    for t in times:
        assert f"<{t:.1f} seconds><|vision_start|>" in text
    media = image_input_for(config, sampling)
    patches, grid = media.processor.video(clip.frames, media.frame_max_pixels)
    assert grid.tolist() == [3, 4, 6] and int((out["prompt_ids"] == config.video_token_id).sum()) == 3 * 6
    np.testing.assert_array_equal(out["pixel_values"].grid_thw[:3], [[1, 4, 6]] * 3)
    np.testing.assert_array_equal(out["pixel_values"].patches[:len(patches)], patches)
    assert out["image_tokens"] == 18


def test_an_easyr1_row_of_two_videos_becomes_one_prompt(qwen_dir, tmp_path):
    """An EasyR1 row with `videos: [a, b]` and an image: imported as `videos` refs, decoded when read, and a prompt
    whose media follow the question's placeholders (video, video, image) with each item's grid and tokens."""
    import json

    from PIL import Image

    from rftjax.data import importers
    from rftjax.data.chat import CheckpointTokenizer
    from rftjax.data.pipeline import Preprocess

    _, ckpt = qwen_dir
    config, _ = rhf.load_pretrained(ckpt, max_image_tokens=32, max_media_items=3)
    rng = np.random.default_rng(8)
    write_video(str(tmp_path / "a.mp4"), rng.integers(0, 256, (8, 56, 56, 3), np.uint8), fps=4)
    write_video(str(tmp_path / "b.mp4"), rng.integers(0, 256, (2, 56, 84, 3), np.uint8), fps=4)
    Image.new("RGB", (56, 56), (0, 90, 200)).save(tmp_path / "c.png")
    row = {"problem": "Is <video> longer than <video>? See <image>", "answer": "A", "videos": ["a.mp4", "b.mp4"],
           "images": ["c.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps({**row, "problem": "<video><image><video>"}) + "\n" + json.dumps(row))
    source, report = importers.load_dataset(f"easyr1:{tmp_path / 'd.jsonl'}", video=SAMPLING)
    assert report.kept == 2 and [v.meta.total_frames for v in source.examples[1]["videos"]] == [8, 2]
    ex = source[1]
    assert [len(v.frames) for v in ex["videos"]] == [4, 2]  # 2 s at 2 fps; a 2-frame clip whole
    pre = Preprocess(CheckpointTokenizer.for_model(ckpt, config), image_input_for(config, SAMPLING), 256)
    out = pre(ex)
    assert np.asarray(out["pixel_values"].grid_thw).tolist() == [[2, 4, 4], [1, 4, 6], [1, 4, 4]]
    ids = out["prompt_ids"][out["prompt_mask"]].tolist()
    kinds = {config.video_token_id: "video", config.image_token_id: "image"}
    starts = [kinds[t] for i, t in enumerate(ids) if t in kinds and (i == 0 or ids[i - 1] != t)]
    assert starts == ["video", "video", "image"]
    assert ids.count(config.video_token_id) == 2 * 4 + 6 and ids.count(config.image_token_id) == 4


def test_rows_over_the_media_budgets_are_dropped_and_counted(qwen_dir, tmp_path):
    """EasyR1 rows with 1, 2 and 3 images against max_media_items=2 and a token budget: the 3-image row and the row
    of two large images are dropped, counted in `over_budget`; the others keep their order."""
    import json

    from PIL import Image

    from rftjax.data import importers
    from rftjax.data.chat import CheckpointTokenizer
    from rftjax.data.pipeline import Preprocess

    _, ckpt = qwen_dir
    config, _ = rhf.load_pretrained(ckpt, max_image_tokens=24, max_media_items=2)
    for name, size in (("s.png", (56, 56)), ("l.png", (112, 112))):  # 4 and 16 tokens
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
    rows = [{"problem": "<image> one", "answer": "1", "images": ["s.png"]},
            {"problem": "<image> and <image> two", "answer": "2", "images": ["s.png", "l.png"]},
            {"problem": "<image><image><image> three", "answer": "3", "images": ["s.png"] * 3},
            {"problem": "big <image> <image>", "answer": "4", "images": ["l.png", "l.png"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source, report = importers.load_dataset(f"easyr1:{tmp_path / 'd.jsonl'}")
    pre = Preprocess(CheckpointTokenizer(ckpt, config.image_token_id), image_input_for(config), 256)
    kept = importers.drop_long_prompts(source, pre.prompt_len, 256, report)
    assert [ex["answer"] for ex in kept.examples] == ["1", "2"] and report.over_budget == 2
    assert "max_media_items=2" in report.skipped[0][1] and "max_image_tokens=24" in report.skipped[1][1]
    out = pre(kept[1])
    assert np.asarray(out["pixel_values"].grid_thw).tolist() == [[1, 4, 4], [1, 8, 8]]
    ids = out["prompt_ids"][out["prompt_mask"]]
    starts = np.nonzero(np.diff(np.r_[0, ids == config.image_token_id].astype(int)) == 1)[0]
    assert len(starts) == 2 and int((ids == config.image_token_id).sum()) == 4 + 16
    # batches take the smallest bucket that holds their largest row's total: 20 tokens, though no image is over 16
    import dataclasses

    media = dataclasses.replace(pre.images, buckets=(16, 24))
    batch = jax.tree.map(lambda *x: np.stack(x), pre(kept[0])["pixel_values"], out["pixel_values"])
    assert media.fit_batch(batch).patches.shape[1] == 24 * 4


def test_planner_counts_video_tokens():
    """configs/qwen_video.py on Qwen2.5-VL-3B: 8 frames -> 4 temporal patches x 64 tokens = 256, the row budget;
    with 16 frames the video needs 512 tokens and does not fit."""
    import sys

    from rftjax import plan

    sys.path.insert(0, "configs")
    import qwen_video

    c = qwen_video.get_config()
    c.model.preset = "qwen2_5_vl_3b"
    assert plan.video_budget(c) == {"frames": 8, "temporal_patches": 4, "tokens_per_patch": 64, "tokens": 256,
                                    "max_image_tokens": 256, "fits": True}
    c.data.video.max_frames = 16
    c.plan.device_memory_gb = 1000.0  # fits: the report skips the levers
    assert plan.video_budget(c)["tokens"] == 512 and not plan.video_budget(c)["fits"]
    assert "512 tokens per video, of max_image_tokens=256 per row: over it: such video rows are dropped" in plan.report(c)


# ----------------------------------------------------------------------------------------------------------
# Through the CLI (slow tier)

VIDEO_RUN = ("--config.model.dtype=float32", "--config.rl.steps=3", "--config.rl.prompts_per_step=2",
             "--config.rl.algo.group_size=2", "--config.rl.max_new_tokens=8", "--config.rl.lr=0.02",
             "--config.rl.algo.entropy_coef=0.01", "--config.rl.warmup_steps=0", "--config.eval.batch_size=4",
             "--config.eval.every=100", "--config.eval.during_rl_examples=4", "--config.log.progress=False",
             "--config.log.tensorboard=False", "--config.mesh.num_devices=1", "--config.checkpoint.every=1")


@pytest.mark.parametrize("fixture", ["qwen_dir", "qwen3_dir"])
def test_video_task_trains_through_the_cli(fixture, request, tmp_path):
    """configs/qwen_video.py: 3 GRPO steps on the motion task with a tiny Qwen2.5-VL / Qwen3-VL checkpoint (the
    sampler's log-probs equal the trainer's; the entropy bonus gives every step a gradient), then evaluation."""
    from rftjax.metrics import read_jsonl
    from test_checkpoint_training import _cli

    _, ckpt = request.getfixturevalue(fixture)
    workdir = str(tmp_path / "run")
    _cli("rftjax.train", "--config", "configs/qwen_video.py", "--workdir", workdir,
         f"--config.model.checkpoint={ckpt}", "--config.data.test_examples=4", "--config.data.ood_examples=4",
         "--config.data.max_prompt_len=200", "--config.model.overrides.max_image_tokens=64", *VIDEO_RUN)
    rl = [m for m in read_jsonl(f"{workdir}/metrics.jsonl") if m.get("stage") == "rl"]
    assert [m["step"] for m in rl] == [1, 2, 3]
    assert all(m["sampler_logprob_gap_max"] < 1e-5 and m["grad_norm"] > 0 for m in rl)
    evals = [e for e in read_jsonl(f"{workdir}/eval.jsonl") if e["stage"] == "rl_end"]
    assert len(evals) == 2 and all(e["n"] > 0 for e in evals)  # test and test_ood (16-frame clips)


def test_multi_image_easyr1_rows_train_through_the_cli(qwen_dir, tmp_path):
    """EasyR1 rows with two images each (placeholders in the problem text) train 3 GRPO steps on a tiny Qwen2.5-VL
    and are evaluated; a 3-image row is dropped and counted."""
    import json

    from PIL import Image

    from rftjax.metrics import read_jsonl
    from test_checkpoint_training import _cli

    _, ckpt = qwen_dir
    rng = np.random.default_rng(5)
    rows = []
    for i in range(10):
        names = []
        for j in range(3 if i == 0 else 2):
            names.append(f"{i}_{j}.png")
            h, w = (int(v) for v in rng.integers(40, 100, 2))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(tmp_path / names[-1])
        rows.append({"problem": "".join(f"Image {k}: <image> " for k in range(len(names))) + "Which is redder?",
                     "answer": str(i % 2 + 1), "images": names})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    workdir = str(tmp_path / "run")
    out = _cli("rftjax.train", "--config", "configs/qwen2_5_vl_easyr1.py", "--workdir", workdir,
               f"--config.model.checkpoint={ckpt}", f"--config.data.train=easyr1:{tmp_path / 'd.jsonl'}",
               f"--config.data.test=easyr1:{tmp_path / 'd.jsonl'}", "--config.data.max_prompt_len=200",
               "--config.model.overrides.max_image_tokens=32", "--config.model.overrides.max_media_items=2",
               *VIDEO_RUN)
    assert "dropped 0 bad rows, 0 whose prompt exceeds max_prompt_len and 1 whose media exceed" in out
    rl = [m for m in read_jsonl(f"{workdir}/metrics.jsonl") if m.get("stage") == "rl"]
    assert [m["step"] for m in rl] == [1, 2, 3] and all(m["grad_norm"] > 0 for m in rl)

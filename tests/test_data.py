"""Tokenizer, grain pipeline (determinism, sharding, iterator checkpoints), TFDS builders, importers."""

import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from rftjax.data import augment, importers, tfds_builders
from rftjax.data.pipeline import Preprocess, TaskSource, image_input_for, make_dataset
from rftjax.data.tasks import get_task
from rftjax.data.tokenizer import ASSET, SPECIAL_TOKENS, PromptTooLongError, TextTokenizer, build
from rftjax.models import get_preset
from rftjax.rewards import iou, parse_box

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOK = TextTokenizer()
CONFIG = get_preset("default")


def _pp(with_completion=False, max_prompt_len=128):
    return Preprocess(TOK, image_input_for(CONFIG), max_prompt_len, with_completion)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_specials_and_fit_to_model():
    assert TOK.vocab_size <= CONFIG.text.vocab_size
    assert TOK.image_id == CONFIG.image_token_id == SPECIAL_TOKENS.index("<image>")
    text = "<think>I see 3 digits: 8, 1, 9. 8 + 1 + 9 = 18.</think><answer>18</answer>"
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert ids[0] == SPECIAL_TOKENS.index("<think>") and TOK.encode("18") == TOK.encode("1") + TOK.encode("8")
    for weird in ("ünïcödé 漢字 🙂", "\\frac{1}{2} + x^2", "   spaces  "):
        assert TOK.decode(TOK.encode(weird)) == weird  # byte-level: any text round-trips
    prompt = TOK.prompt_ids("How many digits? <image>", CONFIG.num_image_tokens)
    assert prompt.count(TOK.image_id) == CONFIG.num_image_tokens  # the question's placeholder is not doubled
    assert TOK.completion_ids("<answer>1</answer>")[-1] == TOK.eos_id


def test_packaged_tokenizer_rebuilds_identically(tmp_path):
    path = str(tmp_path / "tok.json")
    build(path)
    assert hashlib.md5(open(path, "rb").read()).hexdigest() == hashlib.md5(open(ASSET, "rb").read()).hexdigest()


def test_transformers_loads_the_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    TOK.save_pretrained(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "How many red objects are there?\n<think>x</think><answer>2</answer>"
    assert hf(text, add_special_tokens=False)["input_ids"] == TOK.encode(text)
    chat = hf.apply_chat_template([{"role": "user", "content": "How many?"}], tokenize=False)
    assert chat == TOK.render_prompt("How many?", 1)


def test_prompt_too_long_names_lengths_and_field():
    with pytest.raises(PromptTooLongError, match=r"has \d+ tokens, 64 of them image/video tokens.*max_prompt_len=70.*"
                                                 r"data\.max_prompt_len"):
        TOK.prompt_ids("How many digits are there?", 64, max_prompt_len=70, example_id="x/1")
    ex = get_task("digits").example("train", 0)
    with pytest.raises(ValueError, match="digits/train/0"):
        _pp(max_prompt_len=70)(ex)


# ---------------------------------------------------------------------------------------------------------
# Pipeline


def _ids(it, n):
    return [list(next(it)["id"]) for _ in range(n)]


def test_batches_shapes_and_dtypes():
    src = TaskSource(get_task("digits"), "train", 64)
    batch = next(iter(make_dataset(src, _pp(with_completion=True), batch_size=4)))
    assert batch["pixel_values"].shape == (4, 64, 64, 3) and batch["pixel_values"].dtype == np.float32
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert batch["prompt_ids"].shape == (4, 128) and batch["prompt_ids"].dtype == np.int32
    assert (batch["prompt_mask"][:, -1]).all() and not batch["prompt_mask"][:, 0].any()  # left padding
    assert ((batch["prompt_ids"] == TOK.image_id).sum(1) == CONFIG.num_image_tokens).all()
    assert batch["completion_mask"][:, 0].all()
    for row in range(4):
        n = batch["completion_mask"][row].sum()
        assert batch["completion_ids"][row, n - 1] == TOK.eos_id
        assert TOK.decode(batch["completion_ids"][row, :n]).endswith(f"<answer>{batch['answer'][row]}</answer>")


def test_same_seed_same_batches_and_reshuffled_epochs():
    src = TaskSource(get_task("shapes"), "train", 24)
    a = _ids(iter(make_dataset(src, _pp(), batch_size=4, seed=3)), 12)
    b = _ids(iter(make_dataset(src, _pp(), batch_size=4, seed=3)), 12)
    c = _ids(iter(make_dataset(src, _pp(), batch_size=4, seed=4)), 12)
    assert a == b and a != c
    epoch1, epoch2 = sum(a[:6], []), sum(a[6:], [])
    assert sorted(epoch1) == sorted(epoch2) == sorted(f"shapes/train/{i}" for i in range(24))
    assert epoch1 != epoch2  # each epoch is reshuffled


@pytest.mark.parametrize("use_augment", [False, True])
def test_process_shards_are_disjoint_blocks_of_the_one_process_batches(use_augment):
    """P processes reading batch_size b each see, concatenated in process order, exactly the batches of one process
    reading P * b (same rows, same order, same augmentation), over epochs; their iterator positions agree."""
    src = TaskSource(get_task("shapes"), "train", 24)
    kw = dict(seed=0, augment=augment.gaussian_noise(0.2) if use_augment else None)
    one = iter(make_dataset(src, _pp(), batch_size=6, **kw))
    shards = [iter(make_dataset(src, _pp(), batch_size=2, shard=(p, 3), **kw)) for p in range(3)]
    epoch = []
    for _ in range(8):  # two epochs
        want, parts = next(one), [next(it) for it in shards]
        ids = [set(part["id"]) for part in parts]
        assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
        assert sum((list(part["id"]) for part in parts), []) == list(want["id"])
        np.testing.assert_array_equal(np.concatenate([part["pixel_values"] for part in parts]), want["pixel_values"])
        epoch += list(want["id"])
    assert sorted(epoch[:24]) == sorted(f"shapes/train/{i}" for i in range(24))
    assert len({json.dumps(it.get_state(), sort_keys=True) for it in shards}) == 1
    last = [list(iter(make_dataset(src, _pp(), batch_size=2, seed=0, num_epochs=1, shard=(p, 3)))) for p in range(3)]
    assert [len(batches) for batches in last] == [4, 4, 4]  # 24 rows = 4 full global batches of 6


@pytest.mark.parametrize("use_augment", [False, True])
def test_iterator_checkpoint_resumes_exactly(use_augment):
    src = TaskSource(get_task("grounding"), "train", 40)
    kw = dict(batch_size=3, seed=5, augment=augment.gaussian_noise(0.2) if use_augment else None)
    reference = iter(make_dataset(src, _pp(), **kw))
    ref_batches = [next(reference) for _ in range(9)]
    it = iter(make_dataset(src, _pp(), **kw))
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives serialisation
    resumed = iter(make_dataset(src, _pp(), **kw))
    resumed.set_state(state)
    for want in ref_batches[4:]:
        got = next(resumed)
        assert list(got["id"]) == list(want["id"])
        np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
        np.testing.assert_array_equal(got["prompt_ids"], want["prompt_ids"])


def test_worker_processes_give_the_same_batches():
    src = TaskSource(get_task("digits"), "train", 32)
    a = _ids(iter(make_dataset(src, _pp(), batch_size=4, seed=1)), 4)
    b = _ids(iter(make_dataset(src, _pp(), batch_size=4, seed=1, num_workers=2)), 4)
    assert a == b


def test_augmentations():
    ex = _pp()(get_task("grounding").example("train", 7))
    rng = np.random.default_rng(0)
    noisy = augment.gaussian_noise(0.3)(ex, rng)
    assert noisy["pixel_values"].shape == ex["pixel_values"].shape and not np.allclose(noisy["pixel_values"],
                                                                                      ex["pixel_values"])
    # Crop: the box answer moves with the pixels (the object's pixels stay inside the new box).
    cropped = augment.random_crop(0.7)(ex, np.random.default_rng(3))
    box = parse_box(cropped["answer"])
    colour_px = np.argwhere(np.abs(cropped["pixel_values"] - ex["pixel_values"][
        int(parse_box(ex["answer"])[1]) + 3, int(parse_box(ex["answer"])[0]) + 3]).sum(-1) < 0.05)
    ys, xs = colour_px[:, 0], colour_px[:, 1]
    inside = (xs >= box[0] - 2) & (xs <= box[2] + 2) & (ys >= box[1] - 2) & (ys <= box[3] + 2)
    assert inside.mean() > 0.5
    with pytest.raises(ValueError):
        augment.gaussian_noise(-1.0)


# ---------------------------------------------------------------------------------------------------------
# TFDS


def test_tfds_build_and_data_source_match_the_task(tmp_path):
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    tfds_builders.build("digits", str(tmp_path), config="small")
    raw = tfds.data_source("rftjax_digits/small", split="test", data_dir=str(tmp_path))
    assert len(raw) == 32
    src = tfds_builders.data_source("digits", "test", str(tmp_path), config="small")
    task = get_task("digits")
    by_id = {src[i]["id"]: src[i] for i in range(len(src))}
    for i in range(32):
        want = task.example("test", i)
        got = by_id[want["id"]]
        np.testing.assert_array_equal(got["image"], want["image"])  # PNG is lossless
        assert all(got[k] == want[k] for k in ("question", "answer", "answer_type", "reasoning", "meta"))
    batch = next(iter(make_dataset(src, _pp(), batch_size=8, num_epochs=1, shuffle=False)))
    assert batch["prompt_ids"].shape == (8, 128)


# ---------------------------------------------------------------------------------------------------------
# Importers


def test_import_mathv_fixtures():
    examples, report = importers.import_mathv(os.path.join(FIXTURES, "mathv", "data", "testmini.jsonl"))
    assert report.kept == report.total == 7 and not report.skipped
    types = {e["id"]: e["answer_type"] for e in examples}
    assert types == {"mathv/4": "int", "mathv/16": "int", "mathv/38": "int", "mathv/52": "choice",
                     "mathv/91": "choice", "mathv/173": "choice", "mathv/250": "float"}
    q91 = next(e for e in examples if e["id"] == "mathv/91")["question"]
    assert "(A) $6 \\mathrm{~m}$" in q91 and "(E)" in q91
    batch = next(iter(make_dataset(examples, _pp(max_prompt_len=256), batch_size=7, num_epochs=1, shuffle=False)))
    assert batch["pixel_values"].shape == (7, 64, 64, 3)


def test_import_voc_bccd_fixtures_and_box_rescaling():
    examples, report = importers.import_voc(os.path.join(FIXTURES, "bccd", "Annotations"),
                                            os.path.join(FIXTURES, "bccd", "JPEGImages"), importers.BCCD_NAMES)
    assert report.kept == 3 and len(examples) == 3  # one white blood cell per image; RBCs are not unique
    ex = examples[0]
    assert ex["question"] == "Give the box of the white blood cell as [x1, y1, x2, y2]."
    assert ex["answer"] == "[260, 177, 492, 377]" and ex["image"].shape == (480, 640, 3)
    out = _pp()(ex)  # 640x480 -> 64x64: x scaled by 0.1, y by 0.1333
    assert iou(parse_box(out["answer"]), [26.0, 23.6, 49.2, 50.27]) > 0.95


def _png(color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (10, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_import_easyr1_jsonl_and_parquet(tmp_path):
    Image.new("RGB", (12, 12), (0, 255, 0)).save(tmp_path / "a.png")
    rows = [{"problem": "<image>How many?", "answer": "3", "images": ["a.png"]},
            {"problem": "<image>Which?", "answer": "B", "images": ["a.png"]},
            {"problem": "<image>Where?", "answer": "[1, 2, 5, 6]", "image": "a.png"},
            {"problem": "<image>Value?", "answer": 2.5, "images": ["a.png"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    examples, report = importers.import_easyr1(str(tmp_path / "d.jsonl"))
    assert report.kept == 4 and [e["answer_type"] for e in examples] == ["int", "choice", "box", "float"]
    assert examples[0]["image"].shape == (12, 12, 3)
    # Parquet as HF datasets writes it: images as {"bytes", "path"} structs.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"problem": r["problem"], "answer": str(r["answer"]),
                                          "images": [{"bytes": _png(), "path": "x.png"}]} for r in rows]),
                   tmp_path / "d.parquet")
    examples, report = importers.import_easyr1(str(tmp_path / "d.parquet"))
    assert report.kept == 4 and [e["answer_type"] for e in examples] == ["int", "choice", "box", "float"]
    assert examples[0]["image"].shape == (8, 10, 3)


@pytest.mark.parametrize("row,message", [
    ({"problem": "q", "answer": "1", "images": ["missing.png"]}, "does not exist"),
    ({"problem": "q", "answer": "1", "images": [{"bytes": b"not an image", "path": None}]}, "not a readable image"),
    ({"problem": "q", "answer": "  ", "images": ["a.png"]}, "'answer' is empty"),
    ({"problem": 5, "answer": "1", "images": ["a.png"]}, "'problem' must be a string"),
    ({"problem": "<image> q", "answer": "1", "images": ["a.png", "a.png"]}, "do not match"),
    ({"problem": "<video> q", "answer": "1", "images": ["a.png"]}, "do not match"),
    ({"problem": "q", "answer": "1", "videos": ["bad.mp4"]}, "not a readable video"),
    ({"problem": "q", "answer": "1"}, "no 'images'"),
])
def test_bad_rows_raise_naming_the_row_or_are_skipped_and_counted(tmp_path, row, message):
    Image.new("RGB", (12, 12)).save(tmp_path / "a.png")
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    good = {"problem": "q", "answer": "1", "images": ["a.png"]}
    path = tmp_path / "d.jsonl"

    def dump(r):
        return json.dumps({k: (v if not isinstance(v, list) or not v or not isinstance(v[0], dict) else
                               [{"bytes": v[0]["bytes"].decode("latin1"), "path": None}]) for k, v in r.items()})

    if isinstance(row.get("images", [None])[0], dict):
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist([{**good, "images": [{"bytes": _png(), "path": None}]}, row]), path)
    else:
        path.write_text(dump(good) + "\n" + dump(row) + "\n")
    with pytest.raises(ValueError, match=rf"bad row .*{path.name}.*{message}"):
        importers.import_easyr1(str(path))
    examples, report = importers.import_easyr1(str(path), on_error="skip")
    assert report.kept == 1 and report.total == 2 and len(report.skipped) == 1
    assert message.split("'")[0].strip() in report.skipped[0][1] and len(examples) == 1


def test_a_row_whose_image_breaks_after_import_is_skipped_and_counted(tmp_path, caplog):
    """An image file truncated after the import read its header: the run goes on, the next readable row takes the
    bad row's place (deterministically), and every batch says how many rows were skipped."""
    from helpers import write_easyr1

    path = write_easyr1(str(tmp_path / "train.jsonl"), 6, np.random.default_rng(0))
    source, report = importers.load_dataset(f"easyr1:{path}")
    assert report.kept == 6
    image = str(tmp_path / "train.jsonl.2.png")
    with open(image, "rb") as f:
        head = f.read(64)  # the PNG signature and header chunk survive, the pixels do not
    with open(image, "wb") as f:
        f.write(head)
    pp = Preprocess(TOK, image_input_for(CONFIG), 256)
    batches = list(iter(make_dataset(source, pp, batch_size=3, shuffle=False, num_epochs=1)))
    ids = [i for b in batches for i in b["id"]]
    skipped = np.concatenate([b["skipped_rows"] for b in batches])
    bad = source.examples[2]["id"]
    assert bad not in ids and ids[2] == ids[3] == source.examples[3]["id"]
    np.testing.assert_array_equal(skipped, [0, 0, 1, 0, 0, 0])
    assert any("skipped" in r.message and bad in r.getMessage() for r in caplog.records)
    assert source[2]["id"] == ids[2]  # the same substitute every time (a resumed run reads the same rows)

"""Importers for user datasets -> example dicts (see `rftjax.data.tasks.base` for the fields).

- EasyR1 / R1-V rows (`.jsonl` or `.parquet`): `problem` (with one `<image>` placeholder per image, or
  `<video>`), `answer`, and `images` (a list) or `image`, or `videos` (a list with one entry): each a path
  (relative to `image_dir`), raw bytes, or a dict `{"bytes": ..., "path": ...}` as HF `datasets` writes images
  into parquet.
- Video-R1 rows (`.json` list or `.jsonl`): `problem`, `data_type` (`video` / `image`), `path`, `problem_type`
  (`multiple choice`, `numerical`, `OCR`, `free-form`, `regression`), `options`, `solution`
  (`<answer>...</answer>`); answer types `choice`, `numerical`, `ocr`, `free-form`, `regression`
  (`rftjax.rewards.accuracy`, Video-R1's rewards).
- MATH-V jsonl: `question` (with `<image1>`), `options` (list, may be empty), `answer`, `image` (path
  relative to the dataset root, the parent of `data/`).
- Pascal VOC detection annotations (e.g. BCCD): each object whose class is unique in its image becomes a
  grounding example "Give the box of the <name> as [x1, y1, x2, y2]." (the box in pixels, x2/y2 exclusive).

Bad rows (missing image or video file, unreadable bytes, empty answer, wrong types, placeholders that do not
match the media) raise a
ValueError naming the file, line and field, or with `on_error="skip"` are left out and listed in the
returned `ImportReport`. Nothing is silently wrong.

For training, `load_dataset("easyr1:PATH")` imports lazily (`decode=False`: each image's and video's header is
read, its pixels only when the row is used: `LazyExamples`) and `drop_long_prompts` leaves out the rows whose
rendered prompt (with the media's token counts) exceeds `max_prompt_len` or whose media exceed the model's
per-row budgets (items, media tokens), counted in the report, so that no prompt is ever cut through its media
and no over-long row stops a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from rftjax.data.media import example_media, load_media, media_meta
from rftjax.data.tasks import make_example
from rftjax.data.video import VideoSampling, encoded_file, probe_video
from rftjax.data.tasks.grounding import format_box
from rftjax.rewards.accuracy import parse_choice, parse_number
from rftjax.rewards.boxes import parse_box

log = logging.getLogger("rftjax")


@dataclasses.dataclass
class ImportReport:
    """What an import kept and what it left out (`skipped`: `(row reference, reason)`)."""

    source: str
    total: int = 0
    kept: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    too_long: int = 0  # rows left out by `drop_long_prompts` (also in `skipped`)
    over_budget: int = 0  # rows whose media exceed the model's per-row budgets (also in `skipped`)

    def __str__(self):
        bad = len(self.skipped) - self.too_long - self.over_budget
        return (f"{self.source}: kept {self.kept} of {self.total} rows; dropped {bad} bad rows, {self.too_long} "
                f"whose prompt exceeds max_prompt_len and {self.over_budget} whose media exceed the row budgets")


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image not decoded yet: `value` (an absolute path or encoded bytes) and its size in px (from the
    file header). `load()` decodes it (`load_image`)."""

    value: Any
    height: int
    width: int

    def load(self) -> np.ndarray:
        return load_image(self.value)


def probe_image(value: Any, base_dir: str | None = None) -> ImageRef:
    """An `ImageRef` of a path, bytes or `{"bytes", "path"}` dict, reading only the header.

    Raises:
      ValueError: a missing file, or bytes/file that are not an image.
    """
    encoded = encoded_file(value, base_dir, "image")
    with _open_image(encoded) as im:
        width, height = im.size
    if not height or not width:
        raise ValueError(f"image of {height}x{width} px has no pixels")
    return ImageRef(encoded, height, width)


class LazyExamples:
    """Random-access examples (`len`, `[i]`) whose `ImageRef` images and `VideoRef` videos are decoded when the row
    is read (videos: the frames `video` samples).

    An image or video that cannot be decoded then (its file corrupted, truncated or removed since the import read its
    header) does not stop a run: the row is skipped with a warning and the next readable row (in index order,
    wrapping around) takes its place, with `skipped_rows` (int, 0 normally) saying how many were skipped for it;
    the trainer logs their sum per step as `data_rows_skipped`. Deterministic, so resumed runs see the same rows.
    """

    def __init__(self, examples: list[dict], video: VideoSampling | None = None):
        self.examples, self.video = examples, video or VideoSampling()

    def _load(self, ex: dict) -> dict:
        """`ex` with its media decoded (`rftjax.data.media.load_media`; a ValueError names an unreadable one)."""
        for kind in ("image", "video"):  # `image` / `images`, `video` / `videos`
            if ex.get(kind) is not None:
                ex[kind] = load_media(kind, ex[kind], self.video)
            if ex.get(kind + "s"):
                ex[kind + "s"] = [load_media(kind, v, self.video) for v in ex[kind + "s"]]
        return ex

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        """Example `index` (or the next readable one, see the class docstring).

        Raises:
          ValueError: no row of the dataset has a readable image.
        """
        n = len(self.examples)
        for skipped in range(n):
            ex = dict(self.examples[(int(index) + skipped) % n])
            try:
                ex = self._load(ex)
            except ValueError as e:
                log.warning("dataset row %s skipped: %s", ex.get("id"), e)
                continue
            ex["skipped_rows"] = skipped
            return ex
        raise ValueError(f"none of the {n} rows of the dataset has readable media")


@contextlib.contextmanager
def _open_image(encoded: str | bytes):
    """`PIL.Image.open` of a path or bytes; unreadable or corrupt data (also while reading in the `with` body)
    becomes a ValueError naming the file or the byte count."""
    what = f"image bytes ({len(encoded)} bytes)" if isinstance(encoded, bytes) else f"image file {encoded}"
    try:
        with Image.open(io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded) as im:
            yield im
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} is not a readable image: {e}") from None


def load_image(value: Any, base_dir: str | None = None) -> np.ndarray:
    """uint8 `[H, W, 3]` from a path, raw bytes, a `{"bytes", "path"}` dict, a PIL image or an array.

    Raises:
      ValueError: missing file, unreadable/corrupt bytes, unsupported type (the message says which).
    """
    if isinstance(value, np.ndarray):
        img = value
    elif isinstance(value, Image.Image):
        img = np.asarray(value.convert("RGB"))
    else:
        with _open_image(encoded_file(value, base_dir, "image")) as im:
            img = np.asarray(im.convert("RGB"))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise ValueError(f"image has shape {img.shape}, expected [H, W, 3]")
    return img.astype(np.uint8)


def infer_answer_type(answer: str) -> str:
    """`int`, `float`, `choice` (a single letter), `box` (`[x1, y1, x2, y2]`) or `math` (anything else)."""
    v = parse_number(answer)
    if v is not None:
        return "int" if float(v).is_integer() and "." not in answer else "float"
    if re.fullmatch(r"\(?[A-Z]\)?", answer.strip()) and parse_choice(answer):
        return "choice"
    if parse_box(answer) is not None and answer.strip().startswith("["):
        return "box"
    return "math"


def _read_rows(path: str) -> Iterable[tuple[str, Any]]:
    """`(row reference, row)` from a .jsonl, .json (a list of rows) or .parquet file; unparsable jsonl lines come as
    exceptions."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path} holds a {type(rows).__name__}; a .json dataset is a list of rows")
        for i, row in enumerate(rows):
            yield f"{path}:row {i}", row
        return
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{i}", ValueError(f"not valid JSON: {e}")


def _import(path: str, convert: Callable[[dict, str, int], dict], on_error: str) -> tuple[list[dict], ImportReport]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not os.path.exists(path):
        raise ValueError(f"dataset file {path} does not exist")
    report, out = ImportReport(path), []
    for ref, row in _read_rows(path):
        report.total += 1
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise ValueError(f"row is a {type(row).__name__}, not an object")
            out.append(convert(row, ref, report.total - 1))
            report.kept += 1
        except ValueError as e:
            if on_error == "raise":
                raise ValueError(f"bad row {ref}: {e} (pass on_error='skip' to leave such rows out)") from None
            report.skipped.append((ref, str(e)))
    return out, report


def _text(row: dict, field: str, allow_number: bool = False) -> str:
    v = row.get(field)
    if allow_number and isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise ValueError(f"field {field!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise ValueError(f"field {field!r} is empty")
    return v.strip()


def _image(value: Any, base: str, decode: bool):
    return load_image(value, base) if decode else probe_image(value, base)


def import_easyr1(path: str, image_dir: str | None = None, on_error: str = "raise", task: str = "easyr1",
                  decode: bool = True, open_ended: bool = False) -> tuple[list[dict], ImportReport]:
    """Rows of an EasyR1 / R1-V dataset file (see the module docstring). `image_dir` defaults to the file's
    directory. Returns `(examples, report)`; answer types are inferred (`infer_answer_type`). With
    `decode=False` images are `ImageRef`s (read them through `LazyExamples`); videos are always `VideoRef`s. A
    row's placeholders must match its media (one `<image>` per image, `<video>` for its video, or none at all).
    With `open_ended`, a row without an `answer` (or
    with an empty one) is kept as answer "" of type `open` (for runs with a reward model or judge); else it is a
    bad row."""
    base = image_dir or os.path.dirname(os.path.abspath(path))

    def convert(row: dict, ref: str, index: int) -> dict:
        question = _text(row, "problem")
        gold = row.get("answer")
        if open_ended and (gold is None or isinstance(gold, str) and not gold.strip()):
            answer, answer_type = "", "open"
        else:
            try:
                answer = _text(row, "answer", allow_number=True)
            except ValueError as e:
                raise ValueError(f"{e} (rows without a gold answer need reward.model or reward.judge)") from None
            answer_type = infer_answer_type(answer)
        media = _row_media(row, question, base, decode)
        return make_example(task, "import", index, media.pop("image", None), question, answer, answer_type,
                            meta={"source": ref}, **media)

    return _import(path, convert, on_error)


def _row_media(row: dict, question: str, base: str, decode: bool) -> dict:
    """`{"image": ...}` or `{"images": [...]}` (several), and `{"video": ...}` or `{"videos": [...]}`, of an EasyR1
    row (`images` / `image` / `videos`), checked against the question's placeholders
    (`rftjax.data.media.example_media`).

    Raises:
      ValueError: no media, or placeholders that do not match the media.
    """
    images = row.get("images", row.get("image"))
    images = [] if images is None else images if isinstance(images, list) else [images]
    videos = row.get("videos") or []
    videos = videos if isinstance(videos, list) else [videos]
    if not images and not videos:
        raise ValueError("no 'images', 'image' or 'videos' field")
    out = {"image": _image(images[0], base, decode)} if len(images) == 1 else \
        {"images": [_image(v, base, decode) for v in images]} if images else {}
    if len(videos) == 1:
        out["video"] = probe_video(videos[0], base)
    elif videos:
        out["videos"] = [probe_video(v, base) for v in videos]
    example_media({"question": question, **out})  # the placeholders match the media
    return out


def import_mathv(path: str, image_dir: str | None = None, on_error: str = "raise",
                 decode: bool = True) -> tuple[list[dict], ImportReport]:
    """MATH-V jsonl (`question`, `options`, `answer`, `image`). `image_dir` defaults to the dataset root (the
    parent of the jsonl's directory). Multiple-choice rows list their options after the question and get
    answer type `choice`. `decode=False`: images as `ImageRef`s, as `import_easyr1`."""
    base = image_dir or os.path.dirname(os.path.dirname(os.path.abspath(path)))

    def convert(row: dict, ref: str, index: int) -> dict:
        question, answer = _text(row, "question"), _text(row, "answer", allow_number=True)
        options = row.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ValueError("field 'options' must be a list of strings")
        if options:
            letters = "ABCDEFGHIJ"[:len(options)]
            if [o.strip() for o in options] == list(letters):  # the options are drawn in the image
                question += f"\nChoices: {', '.join(letters)}."
            else:
                question += "\nChoices: " + " ".join(f"({l}) {o}" for l, o in zip(letters, options))
            answer_type = "choice"
        else:
            answer_type = infer_answer_type(answer)
        ex = make_example("mathv", "test", 0, _image(_text(row, "image"), base, decode), question, answer, answer_type,
                          meta={"source": ref, "subject": row.get("subject"), "level": row.get("level")})
        ex["id"] = f"mathv/{row.get('id', ref)}"
        return ex

    return _import(path, convert, on_error)


def import_voc(annotation_dir: str, image_dir: str, names: dict[str, str] | None = None,
               on_error: str = "raise") -> tuple[list[dict], ImportReport]:
    """Grounding examples from Pascal VOC XML annotations.

    Args:
      annotation_dir: folder of `*.xml`.
      image_dir: folder of the images (`<filename>` of each annotation).
      names: class name -> words used in the question (e.g. `{"WBC": "white blood cell"}`); default the
        class name itself.
      on_error: "raise" or "skip" for unreadable annotations / images.

    Returns:
      `(examples, report)`: one example per object whose class occurs once in its image (a unique target);
      the others are not errors and are not listed.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    names = names or {}
    report, out = ImportReport(annotation_dir), []
    for fname in sorted(f for f in os.listdir(annotation_dir) if f.endswith(".xml")):
        ref = os.path.join(annotation_dir, fname)
        report.total += 1
        try:
            try:
                root = ET.parse(ref).getroot()
            except ET.ParseError as e:
                raise ValueError(f"not valid XML: {e}") from None
            objects = []
            for obj in root.iter("object"):
                bb = obj.find("bndbox")
                name = obj.findtext("name")
                if bb is None or not name:
                    raise ValueError("an <object> lacks <name> or <bndbox>")
                try:
                    x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                except (TypeError, ValueError):
                    raise ValueError("a <bndbox> coordinate is missing or not a number") from None
                objects.append((name.strip(), [x1, y1, x2 + 1, y2 + 1]))  # VOC max is inclusive
            image = load_image(root.findtext("filename") or "", image_dir)
            counts = {n: sum(1 for m, _ in objects if m == n) for n, _ in objects}
            kept_any = False
            for k, (name, box) in enumerate(objects):
                if counts[name] != 1:
                    continue
                words = names.get(name, name)
                ex = make_example("voc", "import", k, image, f"Give the box of the {words} as [x1, y1, x2, y2].",
                                  format_box(box), "box", meta={"source": ref, "class": name})
                ex["id"] = f"voc/{os.path.splitext(fname)[0]}/{k}"
                out.append(ex)
                kept_any = True
            report.kept += int(kept_any)
        except ValueError as e:
            if on_error == "raise":
                raise ValueError(f"bad annotation {ref}: {e} (pass on_error='skip' to leave it out)") from None
            report.skipped.append((ref, str(e)))
    return out, report


VIDEO_R1_TYPES = {"multiple choice": "choice", "numerical": "numerical", "OCR": "ocr", "free-form": "free-form",
                  "regression": "regression"}
"""Video-R1 `problem_type` -> answer type (`rftjax.rewards.accuracy`)."""


def import_video_r1(path: str, media_dir: str | None = None, on_error: str = "raise",
                    decode: bool = True) -> tuple[list[dict], ImportReport]:
    """Rows of a Video-R1 file (`Video-R1-260k.json`, `.jsonl`; see the module docstring). `media_dir` (default
    the file's directory) holds the `path`s. Multiple-choice rows list their `options` after the question as
    Video-R1's prompt does (`"\nOptions:\n" + one option per line`); the gold answer is `solution` without its
    `<answer>` tags; `process` (a reasoning trace, when present) becomes the cold-start trace. Videos are
    `VideoRef`s; images `ImageRef`s with `decode=False`."""
    base = media_dir or os.path.dirname(os.path.abspath(path))

    def convert(row: dict, ref: str, index: int) -> dict:
        question, solution = _text(row, "problem"), _text(row, "solution", allow_number=True)
        kind = row.get("problem_type")
        if kind not in VIDEO_R1_TYPES:
            raise ValueError(f"field 'problem_type' is {kind!r}, not one of {sorted(VIDEO_R1_TYPES)}")
        answer = re.sub(r"</?answer>", "", solution).strip()
        if not answer:
            raise ValueError("field 'solution' has an empty answer")
        options = row.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ValueError("field 'options' must be a list of strings")
        if kind == "multiple choice":
            if not options:
                raise ValueError("a multiple-choice row has no 'options'")
            question += "\nOptions:\n" + "\n".join(options)
        data_type, media = row.get("data_type"), _text(row, "path")
        if data_type not in ("video", "image"):
            raise ValueError(f"field 'data_type' is {data_type!r}, not 'video' or 'image'")
        thought = re.sub(r"</?think>", "", row.get("process") or "").strip() if isinstance(row.get("process"), str) \
            else ""
        extra = {"video": probe_video(media, base)} if data_type == "video" else {}
        image = _image(media, base, decode) if data_type == "image" else None
        ex = make_example("videor1", "import", index, image, question, answer, VIDEO_R1_TYPES[kind], thought,
                          meta={"source": ref, "problem_type": kind}, **extra)
        ex["id"] = f"videor1/{row.get('problem_id', index)}"
        return ex

    return _import(path, convert, on_error)


LOADERS = {"easyr1": import_easyr1, "mathv": import_mathv, "videor1": import_video_r1}
"""Dataset kinds of `load_dataset` specs."""


def load_dataset(spec: str, image_dir: str | None = None, open_ended: bool = False,
                 video: VideoSampling | None = None) -> tuple[LazyExamples, ImportReport]:
    """The examples of a dataset spec `KIND:PATH` (`easyr1:train.jsonl`, `easyr1:train.parquet`,
    `mathv:data/testmini.jsonl`, `videor1:train.json`), imported lazily with bad rows skipped and reported;
    `open_ended` keeps EasyR1 rows without an answer (`import_easyr1`); `video`: the frame sampling of the rows'
    videos (when read).

    Raises:
      ValueError: an unknown kind or a missing path (the message lists the kinds), or no usable row.
    """
    kind, _, path = spec.partition(":")
    if kind not in LOADERS or not path:
        raise ValueError(f"dataset {spec!r}: use KIND:PATH with KIND one of {sorted(LOADERS)}")
    extra = {"open_ended": True} if open_ended and kind == "easyr1" else {}
    examples, report = LOADERS[kind](path, image_dir, on_error="skip", decode=False, **extra)
    if not examples:
        raise ValueError(f"dataset {spec!r} has no usable rows: {report}; first problems: {report.skipped[:3]}")
    return LazyExamples(examples, video), report


def drop_long_prompts(source: LazyExamples, prompt_len: Callable[[str, list], int], max_prompt_len: int,
                      report: ImportReport) -> LazyExamples:
    """`source` (from `load_dataset`: media are refs) without the rows whose prompt is longer than
    `max_prompt_len` tokens (counted in `report.too_long`) or whose media exceed the model's per-row budgets
    (`prompt_len` raises a ValueError; counted in `report.over_budget`); each dropped row is listed in
    `report.skipped`.

    Args:
      prompt_len: `(question, media metas) -> tokens` of the rendered prompt with its media tokens
        (`rftjax.data.pipeline.Preprocess.prompt_len`; metas from `rftjax.data.media.media_meta`).
    """
    kept = []
    for ex in source.examples:
        where = json.loads(ex["meta"]).get("source", ex["id"])
        try:
            n = prompt_len(ex["question"], [media_meta(k, v) for k, v in example_media(ex)])
        except ValueError as e:
            report.over_budget += 1
            report.kept -= 1
            report.skipped.append((where, str(e)))
            continue
        if n <= max_prompt_len:
            kept.append(ex)
            continue
        report.too_long += 1
        report.kept -= 1
        report.skipped.append((where, f"prompt of {n} tokens > max_prompt_len={max_prompt_len}"))
    return LazyExamples(kept, source.video)


BCCD_NAMES = {"WBC": "white blood cell", "RBC": "red blood cell", "Platelets": "platelet"}

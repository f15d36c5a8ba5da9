"""TFDS builders for the procedural tasks, writing `array_record` (no TensorFlow needed to build or read).

One builder per task, registered as `rftjax_digits`, `rftjax_shapes`, `rftjax_grounding`, each with the
configs `default` (train 5,000 / validation 500 / test 1,000 / test_ood 500 examples, seed 0, 64 px) and
`small` (for tests). Build, then read with the standard `tfds.data_source`:

    from rftjax.data import tfds_builders
    tfds_builders.build("digits", data_dir)                 # once
    src = tfds.data_source("rftjax_digits/default", split="test", data_dir=data_dir)
    src = tfds_builders.data_source("digits", "test", data_dir)   # the same, wrapped for the pipeline

Images are stored as PNG (lossless), the other fields as text (`meta` is JSON).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from rftjax.data.pipeline import TfdsSource
from rftjax.data.tasks import SPLITS, TASKS, get_task

TEXT_FIELDS = ("id", "task", "question", "answer", "answer_type", "reasoning", "meta")


@dataclasses.dataclass
class TaskBuilderConfig(tfds.core.BuilderConfig):
    """Which examples to materialise: the task seed, image size and examples per split."""

    seed: int = 0
    image_size: int = 64
    sizes: dict = dataclasses.field(default_factory=lambda: {"train": 5000, "validation": 500, "test": 1000,
                                                             "test_ood": 500})


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class _TaskBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared implementation; subclasses set `TASK`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    TASK = ""
    BUILDER_CONFIGS = [
        TaskBuilderConfig(name="default", description="5000/500/1000/500 examples, seed 0, 64 px"),
        TaskBuilderConfig(name="small", description="tests: 64/16/32/16 examples, seed 0, 64 px",
                          sizes={"train": 64, "validation": 16, "test": 32, "test_ood": 16}),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"image": tfds.features.Image(shape=(None, None, 3))}
        features.update({k: tfds.features.Text() for k in TEXT_FIELDS})
        return tfds.core.DatasetInfo(builder=self, description=f"rftjax procedural task {self.TASK}",
                                     features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        cfg = self.builder_config
        task = get_task(self.TASK, seed=cfg.seed, image_size=cfg.image_size)
        for i in range(cfg.sizes[split]):
            ex = task.example(split, i)
            yield ex["id"], {"image": png_bytes(ex["image"]), **{k: ex[k] for k in TEXT_FIELDS}}


class RftjaxDigits(_TaskBuilder):
    TASK = "digits"


class RftjaxShapes(_TaskBuilder):
    TASK = "shapes"


class RftjaxGrounding(_TaskBuilder):
    TASK = "grounding"


class RftjaxDescribe(_TaskBuilder):
    TASK = "describe"


BUILDERS = {"digits": RftjaxDigits, "shapes": RftjaxShapes, "grounding": RftjaxGrounding,
            "describe": RftjaxDescribe}
assert set(BUILDERS) == set(TASKS) - {"motion"}  # videos are rendered on the fly (no image field to store)


def build(task: str, data_dir: str, config: str = "default") -> tfds.core.DatasetBuilder:
    """Materialise `task` under `data_dir` as array_record (a no-op when already built)."""
    if task not in BUILDERS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(BUILDERS)}")
    builder = BUILDERS[task](data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    return builder


def data_source(task: str, split: str, data_dir: str, config: str = "default") -> TfdsSource:
    """`tfds.data_source` of a built task split, yielding example dicts (text decoded)."""
    return TfdsSource(tfds.data_source(f"{BUILDERS[task].name}/{config}", split=split, data_dir=data_dir))

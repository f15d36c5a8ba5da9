"""`grounding`: "Give the box of the <colour> <shape> as [x1, y1, x2, y2]." in a CLEVR-like scene.

The target's colour and shape are unique in its scene; the answer is its pixel box (x2, y2 exclusive)
in the image as stored. 2-5 objects in train/validation/test, 6-8 in `test_ood`. Rewarded by IoU
(Visual-RFT, VLM-R1).
"""

from __future__ import annotations

from rftjax.data.tasks.base import Task, example_rng, make_example
from rftjax.data.tasks.scenes import describe, render, sample_scene, where


def format_box(box) -> str:
    return "[" + ", ".join(str(int(round(v))) for v in box) + "]"


class GroundingTask(Task):
    name = "grounding"

    def example(self, split: str, index: int) -> dict:
        rng = example_rng(self.seed, split, index)
        lo, hi = (6, 8) if split == "test_ood" else (2, 5)
        while True:  # resample until some object has a unique (colour, shape)
            objects = sample_scene(rng, int(rng.integers(lo, hi + 1)), self.image_size)
            names = [describe(o) for o in objects]
            unique = [i for i, n in enumerate(names) if names.count(n) == 1]
            if unique:
                break
        target = objects[int(rng.choice(unique))]
        question = f"Give the box of the {describe(target)} as [x1, y1, x2, y2]."
        answer = format_box(target["box"])
        thought = f"The {describe(target)} is in the {where(target['box'], self.image_size)} of the image."
        meta = {"objects": objects, "target": target}
        return make_example(self.name, split, index, render(objects, self.image_size), question, answer, "box",
                            thought, meta)

"""`shapes`: count objects with attribute filters in a CLEVR-like scene ("How many red objects?").

2-6 objects in train/validation/test, 7-9 in `test_ood`.
"""

from __future__ import annotations

from rftjax.data.tasks.base import Task, example_rng, make_example
from rftjax.data.tasks.scenes import COLOURS, SHAPES, describe, render, sample_scene


def _plural(shape: str) -> str:
    return shape + "s"


class ShapesTask(Task):
    name = "shapes"

    def example(self, split: str, index: int) -> dict:
        rng = example_rng(self.seed, split, index)
        lo, hi = (7, 9) if split == "test_ood" else (2, 6)
        objects = sample_scene(rng, int(rng.integers(lo, hi + 1)), self.image_size)
        kind = str(rng.choice(["all", "colour", "shape", "colour_shape"]))
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        if kind == "all":
            question, match, what = "How many objects are there?", lambda o: True, "objects"
        elif kind == "colour":
            question, match, what = f"How many {colour} objects are there?", lambda o: o["colour"] == colour, \
                f"{colour} objects"
        elif kind == "shape":
            question, match, what = f"How many {_plural(shape)} are there?", lambda o: o["shape"] == shape, \
                _plural(shape)
        else:
            question = f"How many {colour} {_plural(shape)} are there?"
            match, what = (lambda o: o["colour"] == colour and o["shape"] == shape), f"{colour} {_plural(shape)}"
        hits = [o for o in objects if match(o)]
        listed = ", ".join(describe(o) for o in objects)
        thought = f"The objects are: {listed}." if kind == "all" else \
            f"The objects are: {listed}. The {what}: {', '.join(describe(o) for o in hits) or 'none'}."
        thought += f" That is {len(hits)}."
        meta = {"objects": objects, "question": kind, "colour": colour, "shape": shape}
        return make_example(self.name, split, index, render(objects, self.image_size), question, str(len(hits)),
                            "int", thought, meta)


class DescribeTask(Task):
    """`describe`: an open-ended caption of a CLEVR-like scene ("Describe the objects in the image."), without a
    gold answer (answer "", type `open`): a reward model or judge scores it. The cold-start trace lists the
    objects; `meta` holds the scene. 2-6 objects, 7-9 in `test_ood`."""

    name = "describe"

    def example(self, split: str, index: int) -> dict:
        rng = example_rng(self.seed, split, index)
        lo, hi = (7, 9) if split == "test_ood" else (2, 6)
        objects = sample_scene(rng, int(rng.integers(lo, hi + 1)), self.image_size)
        caption = f"There are {len(objects)} objects: {', '.join(describe(o) for o in objects)}."
        ex = make_example(self.name, split, index, render(objects, self.image_size),
                          "Describe the objects in the image.", "", "open", meta={"objects": objects})
        return {**ex, "reasoning": f"<think>{caption}</think><answer>{caption}</answer>"}

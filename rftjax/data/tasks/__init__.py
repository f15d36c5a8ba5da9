"""Procedural multimodal reasoning tasks: `digits`, `shapes`, `grounding` (verifiable answers), `describe`
(open-ended, for reward models and judges) and `motion` (videos)."""

from rftjax.data.tasks.base import ANSWER_TYPES, SPLITS, Task, make_example
from rftjax.data.tasks.digits import DigitsTask
from rftjax.data.tasks.grounding import GroundingTask, format_box
from rftjax.data.tasks.motion import MotionTask
from rftjax.data.tasks.shapes import DescribeTask, ShapesTask

TASKS = {t.name: t for t in (DigitsTask, ShapesTask, GroundingTask, DescribeTask, MotionTask)}


def get_task(name: str, seed: int = 0, image_size: int = 64, **options) -> Task:
    """An instance of task `name`, with the task's own `options` (e.g. digits' `num_digits`).

    Raises:
      ValueError: unknown task, or options it does not take.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    try:
        return TASKS[name](seed=seed, image_size=image_size, **options)
    except TypeError as e:
        raise ValueError(f"task {name!r} does not take the options {sorted(options)}: {e}") from e


__all__ = ["ANSWER_TYPES", "SPLITS", "TASKS", "Task", "get_task", "make_example", "format_box", "DigitsTask",
           "ShapesTask", "GroundingTask", "DescribeTask", "MotionTask"]

"""Tasks for the lab: ``make_task(name, **options)`` -> a :class:`Task` ("mqar", "text", "idle", and the
vision tasks "digits", "digits_seg", whose inputs are images (B, 1, S, S) for the vision backbone)."""

from __future__ import annotations

from ._base import IGNORE, Task


def _tasks() -> dict[str, type[Task]]:
    from .digits import DigitsSegmentationTask, DigitsTask
    from .idle import IdleTask
    from .mqar import MQARTask
    from .text import TextTask

    return {
        "mqar": MQARTask,
        "text": TextTask,
        "idle": IdleTask,
        "digits": DigitsTask,
        "digits_seg": DigitsSegmentationTask,
    }


VISION_TASKS = ("digits", "digits_seg")  # image inputs: trained with lab.models.vision, not the LM
TASK_NAMES = ("mqar", "text", "idle", *VISION_TASKS)


def make_task(name: str, **options) -> Task:
    """Build a task by name; unknown names or options raise a clear error."""
    tasks = _tasks()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    try:
        return tasks[name](**options)
    except TypeError as error:
        import inspect

        valid = [p for p in inspect.signature(tasks[name].__init__).parameters if p != "self"]
        raise TypeError(f"task {name!r}: {error}; valid options: {', '.join(valid)}") from None


__all__ = ["make_task", "Task", "IGNORE", "TASK_NAMES", "VISION_TASKS"]

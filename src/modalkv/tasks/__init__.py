"""Evaluation tasks generated offline from a seed (text, and multimodal ones for the VLM).

``get_task(name)`` returns a task; ``TASKS`` lists them. See :mod:`modalkv.tasks.base` for the interface.
"""

from . import docqa, multimodal, ruler  # noqa: F401  (register the tasks)
from . import query_agnostic  # noqa: F401,E402  (the _after, multi-question and chat variants)
from .base import TASKS, Sample, Task, get_task, register_task
from .needle import NeedleSample, make_needle, score_contains

__all__ = ["TASKS", "Sample", "Task", "get_task", "register_task", "NeedleSample", "make_needle", "score_contains"]

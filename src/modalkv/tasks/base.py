"""The task interface: a task turns (tokenizer, length, seed) into a sample and scores an answer.

A new task is one small module: subclass :class:`Task`, implement ``make``, register it with ``@register_task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TASKS: dict[str, type["Task"]] = {}


def register_task(cls: type["Task"]) -> type["Task"]:
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> "Task":
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


@dataclass
class Sample:
    """One prompt: ``context`` (compressed with the prompt), ``question`` (asked last), reference answers.
    ``deferred``: the context is compressed alone, before the question, which is then read through the compressed
    cache (the ``*_after`` tasks of :mod:`modalkv.tasks.query_agnostic`, and ``vqa_deferred``)."""

    context: str
    question: str
    answers: list[str]
    max_new_tokens: int = 24
    meta: dict = field(default_factory=dict)
    deferred: bool = False

    @property
    def prompt(self) -> str:
        return f"{self.context}\n\n{self.question}"


class Task:
    """Base class of a generated task. ``score`` returns a value in [0, 1]."""

    name: str = ""
    mode: str = "all"  # "all": share of the answers found in the output; "any": 1 if one is found

    def make(self, tokenizer, length: int, seed: int) -> Sample:
        raise NotImplementedError

    def score(self, output: str, sample: Sample) -> float:
        """RULER's string match: case-insensitive containment of each reference answer."""
        out = output.lower()
        found = [a.lower() in out for a in sample.answers]
        if self.mode == "any":
            return float(any(found))
        return sum(found) / len(found)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)

"""Tasks for query-agnostic compression: the context is compressed before any question is known.

Three kinds, run by ``modalkv bench`` like every task (:class:`modalkv.bench.runner.ModelRunner`):

* ``<task>_after`` for every text task (``niah_single_after``, ``niah_multikey_after``, ``niah_multivalue_after``,
  ``vt_after``, ``cwe_after``, ``docqa_cast_after``): the same sample as ``<task>`` for the same seed, but
  ``deferred``: the chat-templated prompt is cut where the question starts, the part before it is compressed alone
  (for KVzip, its reconstruction pass runs then), and the question, with the end of the chat template, is then read
  through the compressed cache in one forward, as ``model.generate`` does on a ``cache.fork()``.
* multi-question (``niah_multiq``, ``docqa_cast_multiq``): one context, four questions; the context is compressed
  once and each question is answered from its own ``cache.fork()``; the score is the mean over the questions.
* multi-turn chat (``niah_chat``): turn 1 is a long document with a fact ("The special magic number for <key> is:
  <number>.") to summarise, turn 2 a short text with a fact of the same form for another key, to summarise; turn 3
  asks for the fact of turn 1, which no earlier question pointed at. Each user turn is added with :func:`modalkv.prefill` on the cache that answered the
  previous one (KVzip compresses the whole history again); the score is the last answer's.

The score of a ``_after`` task is its base task's; a multi-question sample is scored question by question with the
base scoring (case-insensitive containment of an answer).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from . import docqa, ruler
from .base import TASKS, Sample, Task, register_task

AFTER = "_after"  # suffix of a task whose question comes after compression


class AfterTask(Task):
    """``<base>_after``: the base task's sample with ``deferred=True`` (the question is read after compression)."""

    base: type[Task]

    def __init__(self):
        self.inner = self.base()
        self.mode = self.inner.mode

    def make(self, tokenizer, length: int, seed: int) -> Sample:
        return dataclasses.replace(self.inner.make(tokenizer, length, seed), deferred=True)

    def score(self, output: str, sample: Sample) -> float:
        return self.inner.score(output, sample)


def after_variant(base: type[Task]) -> type[Task]:
    """Register and return the ``_after`` variant of a text task."""
    if getattr(base, "multimodal", False):
        raise ValueError(f"{base.name}: multimodal tasks set deferred themselves (see vqa_deferred)")
    return register_task(type(f"{base.__name__}After", (AfterTask,),
                              {"name": base.name + AFTER, "base": base, "__doc__": f"{base.name}, question after "
                                                                                    "compression."}))


for _name in ["niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "docqa_cast"]:
    after_variant(TASKS[_name])


# -- one context, several questions ---------------------------------------------------------------------------------


@dataclass
class MultiSample(Sample):
    """One context and several questions, each with its own reference answers (``question``/``answers`` are the
    first ones). Always deferred: the context is compressed before any question."""

    questions: list[str] = field(default_factory=list)
    answer_sets: list[list[str]] = field(default_factory=list)
    deferred: bool = True

    def __post_init__(self):
        if len(self.questions) != len(self.answer_sets) or not self.questions:
            raise ValueError("a MultiSample needs one answer list per question, and at least one question")


class MultiQuestionTask(Task):
    """Scores each answer like a single question (``mode="any"``); the sample's score is their mean."""

    mode = "any"
    n_questions = 4

    def score_each(self, outputs: list[str], sample: MultiSample) -> list[float]:
        if len(outputs) != len(sample.questions):
            raise ValueError(f"{len(outputs)} outputs for {len(sample.questions)} questions")
        return [Task.score(self, o, dataclasses.replace(sample, answers=a))
                for o, a in zip(outputs, sample.answer_sets)]

    def score(self, outputs: list[str], sample: MultiSample) -> float:  # type: ignore[override]
        if not isinstance(outputs, (list, tuple)):
            raise TypeError(f"{self.name} scores a list of outputs, one per question; got {type(outputs).__name__}")
        scores = self.score_each(list(outputs), sample)
        return sum(scores) / len(scores)


@register_task
class NeedleMultiQuestion(MultiQuestionTask):
    """Four needles with different keys in one haystack; each key is asked for in turn (a seeded order)."""

    name = "niah_multiq"

    def make(self, tokenizer, length: int, seed: int) -> MultiSample:
        rng = random.Random(f"{self.name}-{seed}")
        keys = rng.sample(ruler.KEYS, self.n_questions)
        values = [ruler.random_number(rng) for _ in keys]
        inserts = [f"The special magic number for {k} is: {v}." for k, v in zip(keys, values)]
        context, depths = ruler.haystack(tokenizer, length - 60, rng, inserts)
        order = rng.sample(range(self.n_questions), self.n_questions)
        questions = [f"What is the special magic number for {keys[i]} mentioned in the provided text? "
                     "Answer with the number only." for i in order]
        answer_sets = [[values[i]] for i in order]
        return MultiSample(context, questions[0], answer_sets[0], questions=questions, answer_sets=answer_sets,
                           meta={"depths": [depths[i] for i in order]})


@register_task
class CastMultiQuestion(MultiQuestionTask):
    """Four "who is <description>?" questions on one play (``docqa_cast``'s document and scoring)."""

    name = "docqa_cast_multiq"
    reserve = docqa.ShakespeareCast.reserve

    def make(self, tokenizer, length: int, seed: int) -> MultiSample:
        if length <= self.reserve + 200:
            raise ValueError(f"{self.name} needs a length above {self.reserve + 200} tokens, got {length}")
        rng = random.Random(f"{self.name}-{seed}")
        plays = sorted(docqa.plays_with_cast())
        rng.shuffle(plays)
        for play in plays:  # the first play (in a seeded order) with enough askable characters
            document, roles, askable = docqa.play_document(tokenizer, play, length - self.reserve)
            if len(askable) >= self.n_questions:
                break
        else:
            raise ValueError(f"{self.name}: no play has {self.n_questions} askable characters at length {length}")
        chosen = rng.sample(askable, self.n_questions)
        names = [n for n, _ in roles]
        questions = [docqa.cast_question(d) for _, d in chosen]
        answer_sets = [docqa.answer_forms(n, names) for n, _ in chosen]
        return MultiSample(document, questions[0], answer_sets[0], questions=questions, answer_sets=answer_sets,
                           meta={"play": play, "names": [n for n, _ in chosen]})


# -- a multi-turn chat ---------------------------------------------------------------------------------------------


@dataclass
class ChatSample(Sample):
    """User turns of a chat (``turns``); the model answers each, and the last answer is scored against ``answers``.
    ``turn_tokens``: how many tokens the model may generate for each earlier turn."""

    turns: list[str] = field(default_factory=list)
    turn_tokens: int = 16
    deferred: bool = True

    def __post_init__(self):
        if len(self.turns) < 2:
            raise ValueError("a ChatSample needs at least two user turns")

    @property
    def prompt(self) -> str:
        return "\n\n".join(self.turns)


@register_task
class ChatRecall(Task):
    """Three turns: a long document to summarise, a short one to summarise, then a question about a fact of the first
    (no earlier question pointed at it; the second document holds a fact of the same form for another key)."""

    name = "niah_chat"
    mode = "any"
    first_share = 0.8  # of ``length``: turn 1's document; turn 2's text takes most of the rest

    def make(self, tokenizer, length: int, seed: int) -> ChatSample:
        if length < 400:
            raise ValueError(f"{self.name} needs a length of at least 400 tokens, got {length}")
        rng = random.Random(f"{self.name}-{seed}")
        key, other = rng.sample(ruler.KEYS, 2)
        value, decoy = ruler.random_number(rng), ruler.random_number(rng)
        doc1, depths = ruler.haystack(tokenizer, int(length * self.first_share) - 40, rng,
                                      [f"The special magic number for {key} is: {value}."])
        doc2, _ = ruler.haystack(tokenizer, int(length * (1 - self.first_share)) - 80, rng,
                                 [f"The special magic number for {other} is: {decoy}."])
        turns = [f"{doc1}\n\nSummarize the text above in one sentence.",
                 f"{doc2}\n\nSummarize this new text in one sentence.",
                 f"What is the special magic number for {key} mentioned in my first message? "
                 "Answer with the number only."]
        return ChatSample(context=turns[0], question=turns[-1], answers=[value], turns=turns,
                          meta={"keys": [key, other], "values": [value, decoy], "depths": depths})

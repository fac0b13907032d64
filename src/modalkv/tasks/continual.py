"""Continual-learning task streams for InduceKV (and the baselines it is compared with).

**Wikipedia facts by topic** (text, SmolLM2): four tasks drawn from the offline Wikipedia summaries (see
:mod:`modalkv.data`): the country of a city, and the nationality of scientists, of artists and writers, and of
political and military leaders. The fact is read off the summary's first sentence by a pattern ("Accra is the
capital and largest city of Ghana", "Niels Henrik Abel was a Norwegian mathematician"). A training example is the
chat turn asking ``q_train`` with the summary's first sentences as context, answered; the model is then asked the same
fact with a question template it never saw in training (``q_test``, or a second paraphrase ``q_para``), without the
context, and is right when the answer appears in its first generated line. A third template (``q_calib``) is what
the training query looks like (the retrieval calibration is fitted to it).

**easy-VQA by question type** (vision-language, modalkv's VLM): colour, shape and yes/no questions as separate tasks
(see :func:`vqa_tasks`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from ..continual import Example
from ..data import wiki_summaries
from ..vlm import SHAPES, chat_text, easy_vqa_split, load_images, prompt_ids

PERSON = re.compile(r"^(?P<t>[A-Z][^.()]{2,40}?) (?:was|is) an? (?P<a>[A-Z][a-z]+(?:-[A-Z][a-z]+)?) (?P<rest>[^.]{3,120})")
CITY = re.compile(r"^(?P<t>[A-Z][^.()]{1,40}?) is (?:a|an|the) (?:[a-z-]+ ){0,4}(?:city|town|capital|port|municipality)"
                  r"(?: and [a-z ]+?)? (?:in|of) (?:the )?(?:[a-z]+ )?(?P<a>[A-Z][a-z]+(?: [A-Z][a-z]+){0,2})[ ,.]")
OCCUPATIONS = {
    "scientists": ("physicist", "chemist", "mathematician", "astronomer", "biologist", "scientist", "engineer",
                   "inventor", "naturalist", "geologist", "physician", "economist", "botanist", "zoologist"),
    "artists": ("painter", "composer", "novelist", "poet", "writer", "playwright", "sculptor", "architect", "singer",
                "musician", "actor", "actress", "author", "director", "pianist"),
    "leaders": ("politician", "statesman", "king", "queen", "emperor", "general", "military", "president", "ruler",
                "monarch", "prime minister", "dictator", "revolutionary", "conqueror", "pharaoh"),
}
COUNTRY = re.compile(r"^(?:The )?(?P<t>[^.()]{2,40}?)(?: \([^)]*\))?,? (?:officially [^,]*, )?is an? (?:[a-z-]+ ){0,4}"
                     r"(?:country|nation|state|kingdom|republic)\b")
MAJOR_COUNTRIES = ("China", "India", "Japan", "France", "Germany", "Italy", "Spain", "Russia", "Brazil", "Mexico",
                   "Canada", "Australia", "Egypt", "Nigeria", "Turkey", "Iran", "Pakistan", "Indonesia", "Ghana",
                   "Ethiopia", "United States", "United Kingdom", "Argentina", "Peru", "Colombia", "Poland", "Greece")
DEMONYM = re.compile(r"(?:an|ese|ish|ch|i|ic)$")
TEMPLATES = {  # (train, calib, test, para): test and para are held out of training and calibration
    "cities": ("Which country is {t} in?", "In which country is {t} located?", "Where is {t}? Name the country.",
               "Tell me the country that {t} belongs to."),
    "person": ("What nationality was {t}?", "What was the nationality of {t}?", "Give the nationality of {t}.",
               "Which nationality did {t} have?"),
}
HELD_OUT = ("q_test", "q_para")


@dataclass
class Fact:
    title: str
    answer: str
    context: str
    q_train: str
    q_calib: str
    q_test: str
    q_para: str


@dataclass
class FactTask:
    name: str
    facts: list[Fact]


def _context(summary: str, min_chars: int = 250, max_chars: int = 400) -> str:
    """Whole sentences from the start of the summary: at least ``min_chars`` when possible, cut at ``max_chars``."""
    sentences = re.split(r"(?<=[.!?])\s+", summary.strip())
    out = sentences[0]
    for s in sentences[1:]:
        if len(out) >= min_chars:
            break
        out += " " + s
    return out[:max_chars]


def fact_tasks(per_task: int = 32, seed: int = 0, names=("cities", "scientists", "artists", "leaders")) -> list[FactTask]:
    """The Wikipedia fact tasks, ``per_task`` facts each (sampled with ``seed``; no title in two tasks)."""
    texts = wiki_summaries()
    countries = set(MAJOR_COUNTRIES) | {m.group("t") for m in map(COUNTRY.match, texts.values()) if m}
    pools: dict[str, list[Fact]] = {name: [] for name in names}
    for title, summary in sorted(texts.items()):
        if len(summary) < 250:  # the context must give the payload enough tokens
            continue
        city = CITY.match(summary)
        if city and city.group("t").lower() == title.lower() and city.group("a") in countries and "cities" in pools:
            tpl = TEMPLATES["cities"]
            pools["cities"].append(Fact(title, city.group("a"), _context(summary), *(q.format(t=title) for q in tpl)))
            continue
        person = PERSON.match(summary)
        if not person or person.group("t").lower() != title.lower() or not DEMONYM.search(person.group("a")):
            continue
        rest = person.group("rest").lower()
        for name in names:
            if name in OCCUPATIONS and any(re.search(rf"\b{o}\b", rest) for o in OCCUPATIONS[name]):
                tpl = TEMPLATES["person"]
                pools[name].append(Fact(title, person.group("a"), _context(summary), *(q.format(t=title) for q in tpl)))
                break
    rng = random.Random(seed)
    tasks = []
    for name in names:
        if len(pools[name]) < per_task:
            raise ValueError(f"topic {name!r} has {len(pools[name])} facts, fewer than per_task={per_task}")
        tasks.append(FactTask(name, rng.sample(pools[name], per_task)))
    return tasks


def fact_examples(tok, task: FactTask, task_id: int = 0):
    """InduceKV :class:`~modalkv.continual.Example` objects for a fact task (training prefixes + calibration query)."""
    out = []
    for f in task.facts:
        head = _ids(tok, CHAT_HEAD)
        question = _ids(tok, f.q_train)
        ctx = _ids(tok, f"\nContext: {f.context}{CHAT_TAIL}")
        ans = _ids(tok, f.answer)
        prefix = head + question + ctx + ans
        query, span = fact_query(tok, f, f.q_calib)
        out.append(Example(prefix=torch.tensor(prefix), key_span=(len(head), len(head) + len(question)),
                           answer_span=(len(prefix) - len(ans), len(prefix)), query=query, target=torch.tensor(ans),
                           query_span=span))
    return out


def _chat_parts() -> tuple[str, str]:
    """The text before and after the user's content in the VLM's chat turn (SmolLM2 ChatML, one-word system line)."""
    head, tail = chat_text("\x00").split("\x00")
    return head, tail


CHAT_HEAD, CHAT_TAIL = _chat_parts()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def fact_queries(tok, task: FactTask, template: str = "q_train") -> list:
    """The evaluation :class:`Query` objects of a fact task, asked with ``template`` (q_train, q_calib, q_test,
    q_para, or ``held_out``: q_test and q_para, two questions per fact that neither training nor calibration saw)."""
    templates = HELD_OUT if template == "held_out" else (template,)
    for name in templates:
        if name not in ("q_train", "q_calib", *HELD_OUT):
            raise ValueError(f"unknown question template {name!r}; use q_train, q_calib, q_test, q_para or held_out")
    out = []
    for f in task.facts:
        for name in templates:
            ids, span = fact_query(tok, f, getattr(f, name))
            out.append(Query(ids, span, f.answer, {}))
    return out


def fact_query(tok, fact: Fact, question: str | None = None):
    """(ids, retrieval span) of a chat prompt asking ``question`` (default: the test template) about ``fact``."""
    head, q, tail = _ids(tok, CHAT_HEAD), _ids(tok, question or fact.q_test), _ids(tok, CHAT_TAIL)
    return torch.tensor(head + q + tail), (len(head), len(head) + len(q))


def is_correct(generated: str, answer: str) -> bool:
    """The answer appears (case-insensitive) in the first line of the generated text."""
    first = generated.strip().split("\n")[0].lower()
    return answer.lower() in first


# ---------------------------------------------------------------------------------------------------------------
# easy-VQA by question type (the VLM)
# ---------------------------------------------------------------------------------------------------------------

VQA_TASKS = ("colour", "shape", "yes/no shape", "yes/no colour")


def _vqa_kind(question: str, answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no shape" if any(s in question for s in SHAPES) else "yes/no colour"
    return "shape" if answer in SHAPES else "colour"


@dataclass
class Query:
    """One evaluation question: token ids, the span pooled for retrieval, the gold answer, extra model inputs."""

    ids: object
    span: tuple[int, int]
    answer: str
    model_kwargs: dict


def vqa_tasks(processor, tokens_per_image: int, per_task: int = 32, test_per_task: int = 32, seed: int = 0):
    """easy-VQA as four continual tasks (colour, shape, yes/no about a shape, yes/no about a colour): per task,
    ``per_task`` training examples (InduceKV :class:`~modalkv.continual.Example` with the image) and
    ``test_per_task`` test-split :class:`Query` objects. Returns (names, examples per task, queries per task)."""
    tok = processor.tokenizer
    rng = random.Random(seed)
    out_examples, out_queries = [], []
    splits = {s: easy_vqa_split(s) for s in ("train", "test")}
    for name in VQA_TASKS:
        picked = {}
        for split, n in (("train", per_task), ("test", test_per_task)):
            q, a, paths = splits[split]
            idx = [i for i in range(len(q)) if _vqa_kind(q[i], a[i]) == name]
            picked[split] = [(q[i], a[i], paths[i]) for i in rng.sample(idx, n)]
        exs = []
        for question, answer, path in picked["train"]:
            prompt = prompt_ids(tok, question, tokens_per_image)
            ans = _ids(tok, answer)
            exs.append(Example(prefix=torch.tensor(prompt + ans), key_span=(0, len(prompt)),
                               answer_span=(len(prompt), len(prompt) + len(ans)), query=torch.tensor(prompt),
                               target=torch.tensor(ans), query_span=(0, len(prompt)),
                               model_kwargs={"pixel_values": load_images([path], processor)}))
        queries = []
        for question, answer, path in picked["test"]:
            prompt = prompt_ids(tok, question, tokens_per_image)
            queries.append(Query(torch.tensor(prompt), (0, len(prompt)), answer,
                                 {"pixel_values": load_images([path], processor)}))
        out_examples.append(exs)
        out_queries.append(queries)
    return list(VQA_TASKS), out_examples, out_queries


def first_word_correct(generated: str, answer: str) -> bool:
    """easy-VQA's exact match: the first generated word is the answer."""
    words = generated.strip().lower().split()
    return bool(words) and words[0].strip(".,!") == answer

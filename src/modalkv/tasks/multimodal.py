"""Multimodal tasks on the easy-VQA test images, for modalkv's VLM (:mod:`modalkv.vlm`).

Each task is built from the easy-VQA *test* split (its questions, and each image's shape and colour read off them)
and long real text (the Wikipedia summaries of :func:`modalkv.data.wiki_summaries`):

* ``vqa_distract`` (a): one image, then long text distractors, then an easy-VQA question about the image;
* ``mm_retrieval`` (b): N labelled images (2 to 16; as many as ``length`` holds), then a colour or shape question
  about image k;
* ``vqa_deferred`` (c): deferred importance -- one image, then long text, compressed *before* the question is
  known (as in a second chat turn); the question is then read through the compressed cache. Early queries see the
  image as unimportant: what RetentiveKV and HAE are built for;
* ``mm_describe`` (d): 8 to 16 labelled images, "Describe each image." -- a generation of one line per image
  (at least 64 tokens), where decoding-time eviction acts; score = share of images whose line names both the
  colour and the shape.

``length`` is the prompt's target size in tokens; ``tokens_per_image`` (the model's, 64 to 256) sets how many of
them each image takes. Scoring is exact match of the first word (as easy-VQA's evaluation), except ``mm_describe``.
The same prompt formats, drawn from the *training* split, are stage 3 of ``modalkv train-vlm``
(:func:`interleaved_examples`).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

from .. import vlm
from ..data import wiki_summaries
from ..vlm import IMAGE_TOKEN
from .base import Sample, Task, register_task

DESCRIBE = "Describe each image."


@dataclass
class MMSample(Sample):
    """A prompt with images: ``context`` holds one image placeholder per entry of ``images`` (paths, in order)."""

    images: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=2)
def _pool(split: str):
    """(questions, answers, image paths, {path: (shape, colour)}) of an easy-VQA split."""
    q, a, paths = vlm.easy_vqa_split(split)
    labels = {p: (vlm.SHAPES[s], vlm.COLORS[c]) for p, (s, c) in vlm.image_labels(split).items()}
    return q, a, paths, labels


def _by_image(split: str, open_only: bool) -> dict[str, list[tuple[str, str]]]:
    q, a, paths, labels = _pool(split)
    out: dict[str, list[tuple[str, str]]] = {}
    for question, answer, path in zip(q, a, paths):
        if path in labels and (not open_only or answer not in ("yes", "no")):
            out.setdefault(path, []).append((question, answer))
    return out


def distractor(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """About ``n_tokens`` tokens of real text (Wikipedia summaries in a seeded order), cut at a sentence end."""
    if n_tokens <= 0:
        return ""
    texts = wiki_summaries()
    titles = sorted(texts)
    rng.shuffle(titles)
    ids: list[int] = []
    for t in titles:
        ids += tokenizer(texts[t] + "\n", add_special_tokens=False).input_ids
        if len(ids) >= n_tokens:
            break
    text = tokenizer.decode(ids[:n_tokens])
    cut = text.rfind(". ")
    return text[: cut + 1] if cut > len(text) // 2 else text


def first_word(output: str) -> str:
    words = output.strip().lower().split()
    return words[0].strip(".,!:;") if words else ""


def listing(n: int) -> str:
    return "".join(f"Image {i + 1}: {IMAGE_TOKEN}\n" for i in range(n))


def image_prompt(n_images: int, text: str, labelled: bool | None = None) -> str:
    """The user turn of ``n_images`` images followed by ``text``, in the training formats: unlabelled, one bare
    placeholder line; labelled (the default for several images), "Image 1: ..." lines and a blank line."""
    if n_images == 0:
        return text
    if not (n_images > 1 if labelled is None else labelled):
        return f"{IMAGE_TOKEN * n_images}\n{text}"
    return f"{listing(n_images).rstrip()}\n\n{text}"


def describe_answer(labels: list[tuple[str, str]]) -> str:
    return "\n".join(f"Image {i + 1}: a {colour} {shape}." for i, (shape, colour) in enumerate(labels))


def images_for(length: int, tokens_per_image: int, lo: int, hi: int = 16, reserve: int = 60) -> int:
    """How many labelled images a prompt of ``length`` tokens holds (clamped to [lo, hi])."""
    return max(lo, min(hi, (length - reserve) // (tokens_per_image + 6)))


class _MMTask(Task):
    multimodal = True

    def score(self, output: str, sample: Sample) -> float:
        return float(first_word(output) == sample.answers[0])


class _OneImageWithText(_MMTask):
    deferred = False

    def make(self, tokenizer, length: int, seed: int, tokens_per_image: int = 64) -> MMSample:
        rng = random.Random(f"{self.name}-{seed}")
        q, a, paths, labels = _pool("test")
        i = rng.choice([j for j in range(len(q)) if paths[j] in labels])
        text = distractor(tokenizer, length - tokens_per_image - 60, rng)
        return MMSample(context=f"{IMAGE_TOKEN}\n{text}".rstrip(), question=q[i], answers=[a[i]], max_new_tokens=4,
                        images=[paths[i]], deferred=self.deferred, meta={"n_images": 1})


@register_task
class VQADistract(_OneImageWithText):
    """(a) An easy-VQA question about an image that is followed by long text distractors."""

    name = "vqa_distract"


@register_task
class VQADeferred(_OneImageWithText):
    """(c) Deferred importance: image, long text, compressed; only then the question about the image."""

    name = "vqa_deferred"
    deferred = True


@register_task
class MMRetrieval(_MMTask):
    """(b) N labelled images, then a colour or shape question about image k."""

    name = "mm_retrieval"

    def make(self, tokenizer, length: int, seed: int, tokens_per_image: int = 64) -> MMSample:
        rng = random.Random(f"{self.name}-{seed}")
        questions = _by_image("test", open_only=True)
        n = images_for(length, tokens_per_image, lo=2)
        images = rng.sample(sorted(questions), n)
        k = rng.randrange(n)
        question, answer = rng.choice(questions[images[k]])
        return MMSample(context=listing(n).rstrip(), question=f"Image {k + 1}: {question}", answers=[answer],
                        max_new_tokens=4, images=images, meta={"n_images": n, "target": k + 1})


@register_task
class MMDescribe(_MMTask):
    """(d) 8 to 16 labelled images; describe each (one line per image, >= 64 generated tokens)."""

    name = "mm_describe"

    def make(self, tokenizer, length: int, seed: int, tokens_per_image: int = 64) -> MMSample:
        rng = random.Random(f"{self.name}-{seed}")
        _, _, _, labels = _pool("test")
        n = images_for(length, tokens_per_image, lo=8)
        images = rng.sample(sorted(labels), n)
        return MMSample(context=listing(n).rstrip(), question=DESCRIBE,
                        answers=[describe_answer([labels[p] for p in images])], max_new_tokens=11 * n + 8,
                        images=images, meta={"n_images": n})

    def score(self, output: str, sample: Sample) -> float:
        truth = re.findall(r"Image (\d+): a (\w+) (\w+)\.", sample.answers[0])
        said = {m.group(1): m.group(2).lower() for m in re.finditer(r"Image (\d+):([^\n]*)", output)}
        hits = [colour in said.get(i, "").split() and shape in said.get(i, "").replace(".", " ").split()
                for i, colour, shape in truth]
        return sum(hits) / len(hits)


def interleaved_examples(tokenizer, seed: int = 0, max_images: int = 6, max_text: int = 320, split: str = "train"):
    """Stage 3 of ``modalkv train-vlm``: an endless stream of ``(content, answer, image paths)`` in the four formats
    above, from the *training* split (mix, a CHOICE: 35 % one-image questions, 25 % retrieval among 2 to
    ``max_images`` images, 15 % an image followed by up to ``max_text`` tokens of text, 25 % describing 1 to
    ``max_images`` images)."""
    rng = random.Random(f"interleaved-{seed}")
    q, a, paths, labels = _pool(split)
    per_image = _by_image(split, open_only=False)
    pool = sorted(per_image)
    while True:
        r = rng.random()
        if r < 0.35:
            i = rng.randrange(len(q))
            yield image_prompt(1, q[i]), a[i], [paths[i]]
        elif r < 0.60:
            n = rng.randint(2, max_images)
            images = rng.sample(pool, n)
            k = rng.randrange(n)
            question, answer = rng.choice(per_image[images[k]])
            yield image_prompt(n, f"Image {k + 1}: {question}"), answer, images
        elif r < 0.75:
            image = rng.choice(pool)
            question, answer = rng.choice(per_image[image])
            text = distractor(tokenizer, rng.randint(16, max_text), rng)
            yield f"{IMAGE_TOKEN}\n{text}\n\n{question}", answer, [image]
        else:
            n = rng.randint(1, max_images)
            images = rng.sample(pool, n)
            yield image_prompt(n, DESCRIBE, labelled=True), describe_answer([labels[p] for p in images]), images

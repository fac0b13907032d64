"""RULER-style synthetic long-context tasks, generated offline from a seed.

After Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?" (COLM 2024):
needle retrieval with one key, several keys (distractors) and several values, variable tracking and common-words
extraction. Haystacks are real prose (offline Wikipedia summaries) rather than RULER's essays. CHOICE: values are
4-digit numbers (RULER uses 7 digits; the 135M-parameter default model cannot copy long numbers reliably even with
the full cache). Scoring is RULER's string match.
"""

from __future__ import annotations

import random

from ..data import wiki_summaries
from .base import Sample, Task, n_tokens, register_task

KEYS = ["amber", "falcon", "harbor", "lantern", "meadow", "orchid", "pepper", "quartz", "river", "saddle",
        "timber", "violet", "walnut", "zephyr", "cobalt", "dune", "ember", "glacier", "hazel", "ivory"]


def haystack(tokenizer, budget: int, rng: random.Random, inserts: list[str]) -> tuple[str, list[float]]:
    """About ``budget`` tokens of shuffled Wikipedia summaries with ``inserts`` placed at random depths."""
    texts = wiki_summaries()
    titles = sorted(texts)
    rng.shuffle(titles)
    budget -= sum(n_tokens(tokenizer, s) + 2 for s in inserts)
    parts: list[str] = []
    used = 0
    for title in titles:
        t = n_tokens(tokenizer, texts[title]) + 2
        if used + t > budget:
            if used > budget - 40:
                break
            continue
        parts.append(texts[title])
        used += t
    lo, hi = max(1, len(parts) // 10), max(1, len(parts) * 9 // 10)
    spots = sorted(rng.randint(lo, hi) for _ in inserts)  # in order: a later insert never precedes an earlier one
    for i, (at, s) in enumerate(zip(spots, inserts)):
        parts.insert(at + i, s)
    total = max(1, len(parts) - 1)
    return "\n\n".join(parts), [(at + i) / total for i, at in enumerate(spots)]


def random_number(rng: random.Random) -> str:
    return str(rng.randrange(1000, 10000))


@register_task
class NeedleSingle(Task):
    """One needle: "The special magic number for <key> is: <number>." in the haystack; asked for it."""

    name = "niah_single"
    mode = "any"
    reserve = 60  # tokens left for the question and the chat template

    def make(self, tokenizer, length: int, seed: int) -> Sample:
        rng = random.Random(f"{self.name}-{seed}")
        key, value = rng.choice(KEYS), random_number(rng)
        context, depths = haystack(tokenizer, length - self.reserve, rng,
                                   [f"The special magic number for {key} is: {value}."])
        q = f"What is the special magic number for {key} mentioned in the provided text? Answer with the number only."
        return Sample(context, q, [value], meta={"depths": depths})


@register_task
class NeedleMultiKey(Task):
    """Four needles with different keys, asked for one (the others are distractors). The needles are placed in
    a random order of keys."""

    name = "niah_multikey"
    mode = "any"

    def make(self, tokenizer, length: int, seed: int) -> Sample:
        rng = random.Random(f"{self.name}-{seed}")
        keys = rng.sample(KEYS, 4)  # a random order, so the asked key's place in the text is random
        values = [random_number(rng) for _ in keys]
        inserts = [f"The special magic number for {k} is: {v}." for k, v in zip(keys, values)]
        context, depths = haystack(tokenizer, length - 60, rng, inserts)
        ask = rng.randrange(4)
        q = (f"What is the special magic number for {keys[ask]} mentioned in the provided text? "
             "Answer with the number only.")
        return Sample(context, q, [values[ask]], meta={"depths": depths, "asked": ask})


@register_task
class NeedleMultiValue(Task):
    """One key with four values scattered in the haystack; asked for all of them (score: share found)."""

    name = "niah_multivalue"
    mode = "all"

    def make(self, tokenizer, length: int, seed: int) -> Sample:
        rng = random.Random(f"{self.name}-{seed}")
        key = rng.choice(KEYS)
        values = list(dict.fromkeys(random_number(rng) for _ in range(4)))
        inserts = [f"One of the special magic numbers for {key} is: {v}." for v in values]
        context, depths = haystack(tokenizer, length - 70, rng, inserts)
        q = f"What are all the special magic numbers for {key} mentioned in the provided text? List the numbers."
        return Sample(context, q, values, max_new_tokens=32, meta={"depths": depths})


@register_task
class VariableTracking(Task):
    """A chain of assignments VAR A = 1234, VAR B = VAR A, ... spread in the haystack; asked for every variable
    holding the value (score: share of the chain found)."""

    name = "vt"
    mode = "all"
    hops = 4

    def make(self, tokenizer, length: int, seed: int) -> Sample:
        rng = random.Random(f"{self.name}-{seed}")
        names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(self.hops + 1)]
        value = random_number(rng)
        inserts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(self.hops)]
        context, depths = haystack(tokenizer, length - 90, rng, inserts)
        q = (f"Find all variables that are assigned the value {value} in the text above, directly or through "
             "other variables. List their names.")
        return Sample(context, q, names, max_new_tokens=40, meta={"depths": depths})


@register_task
class CommonWords(Task):
    """A list of words where ten occur many times and the rest rarely; asked for the ten most common."""

    name = "cwe"
    mode = "all"
    top = 10

    def make(self, tokenizer, length: int, seed: int) -> Sample:
        rng = random.Random(f"{self.name}-{seed}")
        vocab = sorted({w.strip(".,;:()\"'").lower() for t in list(wiki_summaries().values())[:400]
                        for w in t.split() if w.isalpha() and 4 <= len(w) <= 9})
        words = rng.sample(vocab, self.top + 400)
        common, rare = words[: self.top], words[self.top:]

        def listing(seq):
            return "Here is a list of words: " + ", ".join(f"{i + 1}. {w}" for i, w in enumerate(seq))

        per_item = n_tokens(tokenizer, listing(words[:100])) / 100
        items = int((length - 80) / per_item)
        while True:  # half the list is the common words, the rest rare ones (RULER's frequency gap)
            repeats = max(2, items // (2 * self.top))
            seq = [w for w in common for _ in range(repeats)]
            seq += [rng.choice(rare) for _ in range(max(0, items - len(seq)))]
            rng.shuffle(seq)
            context = listing(seq)
            if n_tokens(tokenizer, context) <= length - 80 or items < 4 * self.top:
                break
            items = int(items * 0.97)
        q = f"What are the {self.top} most common words in the list above? Answer with the words only."
        return Sample(context, q, common, max_new_tokens=48)


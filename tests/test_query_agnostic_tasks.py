"""The query-agnostic benchmark tasks: questions after compression, several questions on one compressed context
(forks), a chat compressed turn by turn, and the runner running KVzip's context pass."""

import dataclasses

import pandas as pd
import pytest
import torch

import modalkv
from modalkv import KVCache
from modalkv.bench import BenchConfig, run_bench
from modalkv.bench.runner import ModelRunner
from modalkv.methods.kvzip import KVzip
from modalkv.tasks import TASKS, get_task
from modalkv.tasks.query_agnostic import ChatSample, MultiSample, after_variant
from test_bench import tiny_folder  # noqa: F401  (fixture: a tiny random Llama with SmolLM2's tokenizer)

AFTER = sorted(n for n in TASKS if n.endswith("_after"))
LENGTH = 400


@pytest.fixture(scope="module")
def runner(tiny_folder):  # noqa: F811
    return ModelRunner(tiny_folder, threads=1)


def kept_positions(cache):
    return [s.pos[0, : s.n].sort().values.tolist() for layer in cache.managed_layers for s in layer.heads]


# -- the samples ----------------------------------------------------------------------------------------------------


def test_every_text_task_has_an_after_variant():
    bases = {n for n, t in TASKS.items() if not getattr(t, "multimodal", False) and not n.endswith("_after")}
    assert {n[: -len("_after")] for n in AFTER} == {"niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe",
                                                    "docqa_cast"} <= bases


@pytest.mark.parametrize("name", AFTER)
def test_after_samples_keep_the_question_out_of_the_compressed_part(runner, name):
    tok = runner.tok
    sample = get_task(name).make(tok, LENGTH, 3)
    base = get_task(name[: -len("_after")]).make(tok, LENGTH, 3)
    assert sample.deferred and not base.deferred
    assert dataclasses.replace(sample, deferred=False) == base  # the same prompt as the base task, same seed
    head, tail = runner.text_inputs(sample)
    compressed, asked = tok.decode(head[0]), tok.decode(tail[0])
    assert sample.question not in compressed and asked.startswith(sample.question)
    assert sample.context in compressed
    whole = runner.chat_ids(sample.prompt)
    assert head.shape[1] + tail.shape[1] == pytest.approx(whole.shape[1], abs=2)  # only the cut differs
    # the base (not deferred) sample is compressed whole
    assert runner.text_inputs(base)[1].shape[1] == 0


@pytest.mark.parametrize("name", ["niah_multiq", "docqa_cast_multiq"])
def test_multi_question_samples(runner, name):
    task = get_task(name)
    sample = task.make(runner.tok, 1024 if "docqa" in name else LENGTH, 2)
    assert isinstance(sample, MultiSample) and sample.deferred and len(sample.questions) >= 4
    assert len(set(sample.questions)) == len(sample.questions)
    for q, answers in zip(sample.questions, sample.answer_sets):
        head, tail = runner.text_inputs(sample, q)
        assert q not in runner.tok.decode(head[0]) and any(a in sample.context for a in answers)
    right = [a[0] for a in sample.answer_sets]
    assert task.score(right, sample) == 1.0
    assert task.score(right[:2] + ["nothing", "nothing"], sample) == 0.5
    with pytest.raises(TypeError, match="list of outputs"):
        task.score(" | ".join(right), sample)
    with pytest.raises(ValueError, match="outputs for"):
        task.score(right[:3], sample)


def test_chat_sample_asks_last_for_an_unasked_fact_of_turn_one(runner):
    sample = get_task("niah_chat").make(runner.tok, 800, 1)
    assert isinstance(sample, ChatSample) and len(sample.turns) == 3
    key, other = sample.meta["keys"]
    value, decoy = sample.meta["values"]
    assert sample.answers == [value] and value in sample.turns[0] and value not in sample.turns[1] + sample.turns[2]
    assert decoy in sample.turns[1] and key in sample.turns[2] and other not in sample.turns[2]
    assert all("magic" not in t.rsplit("\n\n", 1)[1] for t in sample.turns[:2])  # earlier turns ask no fact


def test_bad_samples_and_variants_are_refused():
    with pytest.raises(ValueError, match="one answer list per question"):
        MultiSample("c", "q", ["a"], questions=["q", "r"], answer_sets=[["a"]])
    with pytest.raises(ValueError, match="at least two user turns"):
        ChatSample("c", "q", ["a"], turns=["only one"])
    with pytest.raises(ValueError, match="multimodal tasks set deferred themselves"):
        after_variant(TASKS["vqa_deferred"])
    with pytest.raises(ValueError, match="at least 400"):
        get_task("niah_chat").make(None, 300, 0)


# -- the runner ----------------------------------------------------------------------------------------------------


def test_runner_runs_kvzips_context_pass_and_reads_the_question_after(runner, monkeypatch):
    calls = []
    original = KVzip.finish_prefill

    def spy(self, cache, model, input_ids, tokenizer=None, **kw):
        calls.append(input_ids.shape[1])
        assert tokenizer is runner.tok
        return original(self, cache, model, input_ids, tokenizer=tokenizer, **kw)

    monkeypatch.setattr(KVzip, "finish_prefill", spy)
    seen = []
    ask = ModelRunner._ask

    def ask_spy(self, cache, tail, start):
        seen.append((cache.get_seq_length(), tail.shape[1], start))
        return ask(self, cache, tail, start)

    monkeypatch.setattr(ModelRunner, "_ask", ask_spy)
    cells = [dict(library="modalkv", model="tiny", task="niah_single_after", length=LENGTH, seed=0, method=m,
                  budget=b) for m, b in [("full", 1.0), ("kvzip", 0.25), ("kvzip", 0.5)]]
    rows = runner.run_group(cells)
    head, tail = runner.text_inputs(get_task("niah_single_after").make(runner.tok, LENGTH, 0))
    assert calls == [head.shape[1]]  # one reconstruction for both budgets, over the context only
    assert seen == [(head.shape[1], tail.shape[1], head.shape[1])] * 3  # the question went through each cache
    by = {(r["method"], r["budget"]): r for r in rows}
    kept = [by[k]["kv_kept_bytes"] for k in [("kvzip", 0.25), ("kvzip", 0.5), ("full", 1.0)]]
    assert kept == sorted(kept) and kept[0] < 0.6 * kept[2]  # (metadata weighs a lot in this tiny model)
    assert by[("kvzip", 0.25)]["compress_s"] > by[("full", 1.0)]["compress_s"]
    assert all(r["prompt_tokens"] == head.shape[1] + tail.shape[1] for r in rows)


@pytest.mark.parametrize("allocation", ["global", "head"])
def test_shared_kvzip_scoring_equals_a_prefill_at_each_budget(runner, allocation):
    """Every budget selected from one scored cache is the cache modalkv.prefill builds at that budget."""
    model, tok = runner.model, runner.tok
    ids = runner.text_inputs(get_task("niah_single_after").make(tok, LENGTH, 1))[0]
    cap, _ = runner._capture(ids)
    runner._scored.clear()
    q = torch.tensor([[42, 43, 44]])
    for budget in (0.1, 0.25, 0.5):
        cell = dict(method=f"kvzip(allocation={allocation})", budget=budget)
        built, _, _ = runner._build(cap, cell, None, ids, {})
        ref = KVCache(model, "kvzip", budget, allocation=allocation)
        modalkv.prefill(model, ref, ids, tokenizer=tok)
        assert kept_positions(built) == kept_positions(ref)
        a, b = runner._ask(built, q, ids.shape[1]), runner._ask(ref, q, ids.shape[1])
        assert (a - b).abs().max() < 1e-4
    assert len(runner._scored) == 1
    runner._scored.clear()


def test_multi_question_answers_each_from_a_fork(runner, monkeypatch):
    answered = []
    forks = []
    original_fork = KVCache.fork

    def fork(self):
        forks.append(self.get_seq_length())
        return original_fork(self)

    def row(self, cell, cache, *args, **kw):  # the context's cache, after every question was answered
        answered.append((cell["method"], cache.get_seq_length(), cache.memory_report()["entries_kept"]))
        return original_row(self, cell, cache, *args, **kw)

    original_row = ModelRunner._row
    monkeypatch.setattr(KVCache, "fork", fork)
    monkeypatch.setattr(ModelRunner, "_row", row)
    cells = [dict(library="modalkv", model="tiny", task="niah_multiq", length=LENGTH, seed=0, method=m, budget=b)
             for m, b in [("full", 1.0), ("snapkv", 0.25), ("kvzip", 0.25)]]
    rows = runner.run_group(cells)
    sample = get_task("niah_multiq").make(runner.tok, LENGTH, 0)
    n = runner.text_inputs(sample)[0].shape[1]
    assert all(seen == n for _, seen, _ in answered)  # no question or answer token reached the context's cache
    assert forks.count(n) >= 3 * len(sample.questions)
    for r in rows:
        assert len(r["output"].split(" | ")) == len(sample.questions)
        assert 0 <= r["score"] <= 1 and r["decode_steps"] >= len(sample.questions)
    full, snap = rows[0], rows[1]
    assert snap["kv_kept_bytes"] < 0.5 * full["kv_kept_bytes"]


def test_chat_adds_each_turn_with_prefill(runner, monkeypatch):
    calls = []
    original = KVzip.finish_prefill

    def spy(self, cache, model, input_ids, tokenizer=None, **kw):
        calls.append(input_ids.shape[1])
        return original(self, cache, model, input_ids, tokenizer=tokenizer, **kw)

    monkeypatch.setattr(KVzip, "finish_prefill", spy)
    cells = [dict(library="modalkv", model="tiny", task="niah_chat", length=800, seed=0, method=m, budget=b)
             for m, b in [("full", 1.0), ("kvzip", 0.25)]]
    rows = runner.run_group(cells)
    assert len(calls) == 3 and calls == sorted(calls)  # turn 1, then the whole history after turns 2 and 3
    full, kvzip = rows
    assert kvzip["prompt_tokens"] >= calls[-1]  # the history with the last answer
    assert len(full["output"].split(" | ")) == 3
    assert kvzip["kv_kept_bytes"] < 0.6 * full["kv_kept_bytes"]  # the whole history, compressed again at turn 3


def test_bench_writes_query_agnostic_rows(tiny_folder, tmp_path):  # noqa: F811
    out = tmp_path / "qa.csv"
    cfg = BenchConfig(models=[tiny_folder], methods=["kvzip", "expected_attention"], budgets=[0.25],
                      tasks=["niah_single_after", "niah_multiq"], lengths=[LENGTH], samples=1, out=str(out))
    run_bench(cfg, progress=False)
    df = pd.read_csv(out)
    assert len(df) == 2 * 3 and set(df.task) == {"niah_single_after", "niah_multiq"}
    assert (df[df.method == "kvzip"].compress_s > 0).all()

"""The command line: listing, clear errors, and a real generation with the memory/speed table."""

import pytest
from typer.testing import CliRunner

from modalkv.cli import app
from modalkv.methods import REGISTRY
from test_bench import tiny_folder  # noqa: F401  (fixture: a tiny random Llama with SmolLM2's tokenizer, a folder)

runner = CliRunner()


def test_methods_lists_every_method():
    result = runner.invoke(app, ["methods"], terminal_width=200)
    assert result.exit_code == 0
    for name in REGISTRY:
        assert name in result.output
    assert "kivi-2" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nosuch"], "unknown method 'nosuch'"),
        (["--budget", "1.5"], r"ratio must be in \(0, 1\]"),
        (["--budget", "0"], "token count must be >= 1"),
        (["--budget", "abc"], "budget must be a ratio"),
        (["--model", "no-such-model"], "no-such-model"),
        (["--param", "window=x8"], "window must be int"),
        (["--param", "window"], "KEY=VALUE"),
        (["--image", "/no/such.png"], "image '/no/such.png' does not exist"),
        (["--modality-caps", "pixels=0.1"], "modality one of"),
    ],
)
def test_generate_bad_input_names_the_problem(args, message):
    result = runner.invoke(app, ["generate", "--prompt", "hi", *args], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "error" in result.output and "Traceback" not in result.output
    import re

    assert re.search(message, result.output.replace("\n", " ")), result.output


@pytest.mark.real
def test_generate_compares_methods_side_by_side(tmp_path):
    plot = tmp_path / "cmp.png"
    result = runner.invoke(
        app,
        ["generate", "--methods", "snapkv(window=8),kivi-4", "--budget", "0.5", "--prompt",
         "The capital of France is Paris. The capital of Italy is Rome. What is the capital of Italy?",
         "--max-new-tokens", "6", "--compare-full", "--threads", "1", "--expect", "Rome", "--plot", str(plot)],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    out = result.output
    for row in ("full (DynamicCache)", "snapkv(window=8) @ 0.5", "kivi-4 (every token)"):
        assert row in out
    for col in ("answer", "keeps", "KV kept", "prefill s", "ms/token"):
        assert col in out
    assert "x less" in out and "/6 tok" in out
    assert "Compression does not keep the answer ('Rome') with:" in out or "Every compressed cache keeps" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.real
def test_generate_with_images_on_the_vlm():
    from modalkv import vlm

    q, a, paths = vlm.easy_vqa_split("test")
    i = next(j for j, question in enumerate(q) if question == "what shape is in the image?")
    result = runner.invoke(app, ["generate", "--model", "modalkv-vlm", "--image", paths[i], "--method", "snapkv",
                                 "--budget", "0.5", "--modality-caps", "image=0.5", "--max-new-tokens", "3",
                                 "--compare-full", "--threads", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert a[i] in result.output and "snapkv @ 0.5" in result.output and "full (DynamicCache)" in result.output
    text = runner.invoke(app, ["generate", "--image", paths[i], "--prompt", "hi", "--max-new-tokens", "2"],
                         terminal_width=200)
    assert text.exit_code == 2 and "needs a vision-language model" in text.output


@pytest.mark.real
def test_continual_runs_and_writes_the_report(tmp_path):
    out = tmp_path / "cont"
    result = runner.invoke(app, ["continual", "--learners", "frozen,inducekv", "--per-task", "2",
                                 "--budget-entries", "2", "--ell", "32", "--top-k", "1", "--param",
                                 "calib_steps=2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    import json

    summary = json.loads(out.with_suffix(".json").read_text())
    s = summary["learners"]
    assert len(s["inducekv"]["acc"]) == 4 and len(set(s["inducekv"]["bytes_per_stage"])) == 1
    assert s["frozen"]["final_bytes"] == 0 and s["inducekv"]["latency_vs_frozen"] > 0
    assert out.with_suffix(".md").is_file() and (tmp_path / "cont_accuracy.png").is_file()


def test_continual_rejects_unknown_learner(tmp_path):
    result = runner.invoke(app, ["continual", "--learners", "frozen,ewc", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "unknown continual learner" in str(result.exception)


def _one_line_error(result, *fragments):
    """A CLI error: exit code 2, one line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output
    assert "Traceback" not in result.output


def test_generate_rejects_unreadable_images(tmp_path):
    """A file that is not an image, and a PNG cut short, are named before any model loads (issue 21)."""
    from PIL import Image

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good)
    Image.effect_noise((64, 64), 50).save(good)  # noise: a PNG whose data really spans the file
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (text, cut):
        result = runner.invoke(app, ["generate", "--model", "modalkv-vlm", "--image", str(path), "--prompt", "hi"])
        _one_line_error(result, f"image {str(path)!r} is not a readable image file")


def test_generate_rejects_an_empty_prompt(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _one_line_error(runner.invoke(app, ["generate", "--prompt", ""]), "--prompt is empty")
    _one_line_error(runner.invoke(app, ["generate", "--prompt", "   "]), "--prompt is empty")
    _one_line_error(runner.invoke(app, ["generate", "--prompt-file", str(empty)]),
                    f"prompt file {str(empty)!r} is empty")


def test_report_rejects_files_that_are_not_results(tmp_path):
    """``modalkv report`` names the file and what is wrong with it: missing columns, empty, not a CSV (issue 21)."""
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("library,model,task\nmodalkv,m,niah_single\n")
    _one_line_error(runner.invoke(app, ["report", str(wrong)]), str(wrong),
                    "lacks the column(s) method, budget, length, seed, score, kl, top1, kv_kept_bytes, decode_ms")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _one_line_error(runner.invoke(app, ["report", str(empty)]), f"{empty} is empty")
    binary = tmp_path / "plot.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    _one_line_error(runner.invoke(app, ["report", str(binary)]), f"{binary} is not a CSV file")
    from modalkv.bench.report import REPORT_COLUMNS

    header = tmp_path / "header.csv"
    header.write_text(",".join(REPORT_COLUMNS) + "\n")
    _one_line_error(runner.invoke(app, ["report", str(header)]), f"{header} has a header but no rows")
    good = tmp_path / "good.csv"
    good.write_text(",".join(REPORT_COLUMNS) + "\n" + "modalkv,m,full,1.0,niah_single,100,0,1.0,,,100,5.0\n")
    _one_line_error(runner.invoke(app, ["report", str(good), str(wrong)]), str(wrong), "lacks the column(s)")


def test_run_specs_defaults_budgets_and_kivi():
    """No method: the measured default comparison; --method X alone keeps the old default budget 0.25; several
    budgets run every method at each; kivi-N is the full cache in KIVI storage, once."""
    from modalkv.cli.generate import _run_specs

    assert _run_specs([], None, None) == [
        ("snapkv @ 0.25", "snapkv", 0.25, None), ("pyramidkv @ 0.75", "pyramidkv", 0.75, None),
        ("kivi-4 (every token)", "full", 1.0, "kivi-4"), ("pyramidkv @ 0.75 + kivi-4", "pyramidkv", 0.75, "kivi-4")]
    assert [s[0] for s in _run_specs([], "0.5", None)] == [
        "snapkv @ 0.5", "pyramidkv @ 0.5", "kivi-4 (every token)", "pyramidkv @ 0.5 + kivi-4"]
    assert _run_specs(["snapkv"], None, None) == [("snapkv @ 0.25", "snapkv", 0.25, None)]
    specs = _run_specs(["snapkv", "h2o", "kivi-4"], "0.25,512", "")
    assert [s[0] for s in specs] == ["snapkv @ 0.25", "h2o @ 0.25", "kivi-4 (every token)", "snapkv @ 512",
                                     "h2o @ 512"]
    assert specs[2][1:] == ("full", 1.0, "kivi-4") and specs[3][2] == 512
    assert _run_specs(["adakv"], None, "kivi-2")[0] == ("adakv @ 0.25 + kivi-2", "adakv", 0.25, "kivi-2")
    assert _run_specs(["pyramidkv+kivi-4", "h2o"], "0.75", None) == [
        ("pyramidkv @ 0.75 + kivi-4", "pyramidkv", 0.75, "kivi-4"), ("h2o @ 0.75", "h2o", 0.75, None)]
    with pytest.raises(ValueError, match="already quantized"):
        _run_specs(["snapkv+kivi-4"], None, "kivi-2")
    with pytest.raises(ValueError, match="already quantized"):
        _run_specs(["kivi-4"], None, "kivi-2")
    with pytest.raises(ValueError, match="budget must be a ratio"):
        _run_specs(["snapkv"], "0.25,x", None)


def test_interleaved_decoding_gives_each_cache_its_own_greedy_tokens():
    """Decoding several caches one step each in turn yields, for each, exactly the tokens, positions and mask lengths
    of decoding it alone."""
    import torch
    from transformers import DynamicCache

    from helpers import prompt, tiny_llama
    from modalkv import KVCache
    from modalkv.cli.generate import _decode_interleaved, _Run
    from modalkv.measure import greedy_generate

    model = tiny_llama()
    ids = prompt(40)
    mask = torch.ones_like(ids)
    calls: dict = {}  # cache -> (position ids, mask length) of every forward with it

    def record(module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        calls.setdefault(id(cache), []).append((kwargs["position_ids"].tolist(), kwargs["attention_mask"].shape[1]))

    model.register_forward_pre_hook(record, with_kwargs=True)
    make = [lambda: KVCache(model, "snapkv", 0.5, window=8), lambda: KVCache(model, "h2o", 0.5),
            lambda: DynamicCache(config=model.config)]
    alone_caches = [m() for m in make]
    alone = [greedy_generate(model, ids, mask, c, 12).tokens[0] for c in alone_caches]
    runs = [_Run(str(i), "x", m()) for i, m in enumerate(make)]
    for run in runs:
        run.tokens = greedy_generate(model, ids, mask, run.cache, 1).tokens[0]
    _decode_interleaved(model, runs, ids.shape[1], 12, eos=set())
    assert [run.tokens for run in runs] == alone
    assert len(set(map(tuple, alone))) > 1  # the caches really differ, so a mix-up would show
    for cache, run in zip(alone_caches, runs):
        assert calls[id(run.cache)] == calls[id(cache)] and len(calls[id(cache)]) == 12
    assert all(len(run.step_ms) == 11 and min(run.step_ms) > 0 for run in runs)


def test_agreement_and_the_verdict_line():
    from modalkv.cli.comparison import agreement, verdict
    from modalkv.cli.generate import _Run

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    full = _Run("full", "full", None, tokens=[1, 2, 3, 4])
    same = _Run("a", "snapkv", None, tokens=[1, 2, 3, 4])
    early = _Run("b", "h2o", None, tokens=[1, 2, 9])
    agree = agreement([full, same, early], full, None, Tok())
    assert agree == {"full": (4, 4, True), "a": (4, 4, True), "b": (2, 4, False)}
    assert verdict([full, same, early], full, None, agree) == (
        "[bold]Compression does not keep the full cache's answer with:[/bold] b. It does with: a.")
    agree = agreement([full, same, early], full, "2 9", Tok())
    assert agree["b"] == (2, 4, True) and agree["a"] == (4, 4, False)
    assert "Every compressed cache keeps the answer ('2 9')" in verdict([full, early], full, "2 9", agree)


def test_save_and_load_cache_from_the_command_line(tmp_path, tiny_folder):
    """--save-cache keeps a method's compressed prompt; --load-cache answers a longer prompt that starts with it by
    running only the new tokens, with the same tokens as a cache that saw both parts in one process."""
    import torch

    from modalkv import KVCache, load_model, prefill
    from modalkv.cli.generate import _decode_interleaved, _prefill, _Run

    folder = tiny_folder
    first = "The museum opened in 1887 and its first curator catalogued 4,310 objects from the old collection."
    second = first + " Question: when did the museum open?"
    (tmp_path / "a.txt").write_text(first)
    (tmp_path / "b.txt").write_text(second)
    saved = tmp_path / "doc.safetensors"
    common = ["generate", "--model", folder, "--no-chat", "--max-new-tokens", "4", "--threads", "1"]
    result = runner.invoke(app, [*common, "--method", "snapkv", "--budget", "0.5", "--param", "window=4",
                                 "--prompt-file", str(tmp_path / "a.txt"), "--save-cache", str(saved)])
    assert result.exit_code == 0, result.output
    assert saved.is_file() and "saved the compressed prompt of snapkv @ 0.5" in result.output
    result = runner.invoke(app, [*common, "--load-cache", str(saved), "--prompt-file", str(tmp_path / "b.txt"),
                                 "--compare-full"])
    assert result.exit_code == 0, result.output
    assert "snapkv @ 0.5 (loaded:" in result.output and "full (DynamicCache)" in result.output
    _one_line_error(runner.invoke(app, [*common, "--load-cache", str(saved), "--prompt", "Another text entirely."]),
                    "does not start with the")
    _one_line_error(runner.invoke(app, [*common, "--methods", "snapkv,h2o", "--prompt", "x", "--save-cache",
                                        str(tmp_path / "x.safetensors")]), "--save-cache saves one method's cache")

    model, tok = load_model(folder)
    ids = {name: tok((tmp_path / name).read_text(), return_tensors="pt", add_special_tokens=False).input_ids
           for name in ("a.txt", "b.txt")}
    reference = KVCache(model, "snapkv", 0.5, window=4)
    prefill(model, reference, ids["a.txt"])
    from modalkv import load_cache

    runs = [_Run("loaded", "snapkv", load_cache(saved, model, method="snapkv")), _Run("reference", "snapkv", reference)]
    enc = {"input_ids": ids["b.txt"], "attention_mask": torch.ones_like(ids["b.txt"])}
    fed = []
    model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    for run in runs:
        _prefill(model, run, enc, set(), {}, tok)
    new_tokens = ids["b.txt"].shape[1] - ids["a.txt"].shape[1]
    assert fed == [new_tokens, new_tokens]  # only the tokens after the saved prompt went through the model
    assert runs[0].cache.get_seq_length() == ids["b.txt"].shape[1]
    assert runs[0].cache.memory_report() == runs[1].cache.memory_report()
    _decode_interleaved(model, runs, ids["b.txt"].shape[1], 6, set())
    assert runs[0].tokens == runs[1].tokens and len(runs[0].tokens) == 6

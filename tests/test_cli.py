"""The command line: listing, clear errors, and a real generation with the memory/speed table."""

import pytest
from typer.testing import CliRunner

from modalkv.cli import app
from modalkv.methods import REGISTRY

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
    assert "error" in result.output
    import re

    assert re.search(message, result.output.replace("\n", " ")), result.output


@pytest.mark.real
def test_generate_prints_answer_and_table():
    result = runner.invoke(
        app,
        ["generate", "--method", "snapkv", "--budget", "0.5", "--param", "window=8", "--prompt",
         "The capital of France is Paris. The capital of Italy is Rome. What is the capital of Italy?",
         "--max-new-tokens", "6", "--compare-full", "--threads", "1"],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "answer:" in out and "full cache answer:" in out
    for col in ("KV bytes full", "KV bytes kept", "compression", "prefill s", "decode ms/token"):
        assert col in out
    assert "answers agree with the full cache:" in out


@pytest.mark.real
def test_generate_with_images_on_the_vlm():
    from modalkv import vlm

    q, a, paths = vlm.easy_vqa_split("test")
    i = next(j for j, question in enumerate(q) if question == "what shape is in the image?")
    result = runner.invoke(app, ["generate", "--model", "modalkv-vlm", "--image", paths[i], "--method", "snapkv",
                                 "--budget", "0.5", "--modality-caps", "image=0.5", "--max-new-tokens", "3",
                                 "--compare-full", "--threads", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"answer: {a[i]}" in result.output and "full cache answer:" in result.output
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

"""The benchmark harness: rows per cell, resumption, the report, and the Ray executor giving the same results."""

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from modalkv.bench import BenchConfig, run_bench, write_report
from modalkv.bench.report import pareto


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local transformers folder."""
    from modalkv.models import ensure_converted

    tok = AutoTokenizer.from_pretrained(str(ensure_converted("smollm2-135m")))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def config(folder, out, **kw):
    base = dict(models=[folder], methods=["snapkv", "h2o"], budgets=[0.5], tasks=["niah_single", "fidelity"],
                lengths=[300], samples=1, threads=1, out=str(out))
    base.update(kw)
    return BenchConfig(**base)


def test_rows_resume_and_report(tiny_folder, tmp_path):
    out = tmp_path / "r.csv"
    run_bench(config(tiny_folder, out), progress=False)
    df = pd.read_csv(out)
    assert len(df) == 2 * 3  # 2 tasks x (full + 2 methods)
    assert set(df.method) == {"full", "snapkv", "h2o"}
    full = df[df.method == "full"]
    assert (full.kv_kept_bytes > df[df.method != "full"].groupby("task").kv_kept_bytes.max().min()).all()
    fid = df[df.task == "fidelity"].set_index("method")
    assert fid.loc["full", "kl"] == 0 and fid.loc["full", "top1"] == 1
    assert (fid.loc[["snapkv", "h2o"], "kl"] > 0).all()
    assert (df.decode_ms > 0).all() and (df.prefill_s > 0).all()
    # re-running skips finished cells; a new budget adds only its cells
    run_bench(config(tiny_folder, out), progress=False)
    assert len(pd.read_csv(out)) == 6
    run_bench(config(tiny_folder, out, budgets=[0.5, 0.25]), progress=False)
    df2 = pd.read_csv(out)
    assert len(df2) == 10 and (df2.method == "full").sum() == 2
    assert (tmp_path / "r.json").exists()
    md = write_report(out)
    text = md.read_text()
    assert "fidelity: KL" in text and "decode speed-up" in text
    kl = df2[(df2.task == "fidelity") & (df2.method == "snapkv") & (df2.budget == 0.25)].kl.iloc[0]
    assert f"{kl:.4f}" in text  # the report's numbers are the results file's
    assert len(list(tmp_path.glob("r_*.png"))) == 4


def test_ray_executor_matches_local(tiny_folder, tmp_path):
    pytest.importorskip("ray")
    local, remote = tmp_path / "local.csv", tmp_path / "ray.csv"
    run_bench(config(tiny_folder, local, tasks=["niah_single"]), progress=False)
    run_bench(config(tiny_folder, remote, tasks=["niah_single"], executor="ray"), progress=False)
    cols = ["method", "budget", "score", "output", "kv_kept_bytes"]
    a = pd.read_csv(local)[cols].sort_values(["method", "budget"]).reset_index(drop=True)
    b = pd.read_csv(remote)[cols].sort_values(["method", "budget"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_config_file_and_errors(tmp_path):
    f = tmp_path / "sweep.toml"
    f.write_text('[bench]\nmethods = ["snapkv"]\nbudgets = [0.1, 0.5]\nlengths = [1024]\n')
    cfg = BenchConfig.from_file(f, samples=2)
    assert cfg.methods == ["snapkv"] and cfg.budgets == [0.1, 0.5] and cfg.samples == 2
    f.write_text('[bench]\nmetods = ["snapkv"]\n')
    with pytest.raises(ValueError, match="unknown setting"):
        BenchConfig.from_file(f)
    from modalkv.cli import _check_bench

    _check_bench(BenchConfig(methods=["hae(mode=kv_only,tau_g=0.01)", "snapkv@image=0.1"]))
    with pytest.raises(TypeError, match="no parameter"):
        _check_bench(BenchConfig(methods=["hae(tau=0.01)"]))
    with pytest.raises(ValueError, match="tau_g"):
        _check_bench(BenchConfig(methods=["hae(tau_g=2.0)"]))


def test_pareto_front():
    assert pareto([(1, 0.5), (2, 0.4), (3, 0.9), (0.5, 0.1)]) == [(0.5, 0.1), (1, 0.5), (3, 0.9)]


def test_kivi_cell_peak_rss_and_schema_guard(tiny_folder, tmp_path):
    """A KIVI entry is one cell at budget 1.0 holding fewer bytes than the full cache; each row has its own
    peak RSS window; appending to a file written with other columns is refused."""
    out = tmp_path / "k.csv"
    run_bench(config(tiny_folder, out, methods=["kivi-2", "snapkv"], tasks=["niah_single"]), progress=False)
    df = pd.read_csv(out).set_index("method")
    assert list(df.index) == ["full", "kivi-2", "snapkv"]
    assert df.loc["kivi-2", "budget"] == 1.0
    assert df.loc["kivi-2", "kv_kept_bytes"] < 0.75 * df.loc["full", "kv_kept_bytes"]  # 128-token fp residual
    assert (df.cell_peak_rss_bytes >= df.rss_bytes).all()  # a peak since the reset, at least the RSS then
    old = tmp_path / "old.csv"
    old.write_text("library,model,task\n")
    with pytest.raises(ValueError, match="written with other columns"):
        run_bench(config(tiny_folder, old, methods=["snapkv"], tasks=["niah_single"]), progress=False)


def test_report_summary_and_failed_cells(tmp_path):
    """The summary row of a method is computed from the results file (score, Δ, KV share, speed-up), and a cell
    that crashed (kvpress rows) is listed, not hidden."""
    from modalkv.bench.runner import COLUMNS

    rows = []
    for seed, (fs, ms) in enumerate([(1.0, 0.0), (1.0, 1.0)]):
        base = dict(library="modalkv", model="m", task="niah_single", length=1000, seed=seed, prompt_tokens=1000,
                    kv_full_bytes=1000, cell_peak_rss_bytes=2**30, output="x")
        rows.append(dict(base, method="full", budget=1.0, score=fs, kv_kept_bytes=1000, decode_ms=100.0))
        rows.append(dict(base, method="snapkv", budget=0.25, score=ms, kv_kept_bytes=260, decode_ms=50.0))
    rows.append(dict(library="kvpress", model="m", task="niah_single", length=1000, seed=0, method="full", budget=1.0,
                     score=1.0, kv_kept_bytes=1000, decode_ms=90.0))
    rows.append(dict(library="kvpress", model="m", task="niah_single", length=1000, seed=0, method="pyramidkv",
                     budget=0.25, output="ERROR RuntimeError: size mismatch"))
    path = tmp_path / "r.csv"
    pd.DataFrame(rows).reindex(columns=COLUMNS).to_csv(path, index=False)
    text = write_report(path).read_text()
    assert "| modalkv | snapkv | 0.25 | 0.500 | -0.500 |  | 0.260 | 2.00x | 2.00x | 1.00 |" in text
    assert "### Libraries side by side (only the 1 prompts every library ran: niah_single; lengths 1000)" in text
    assert "| full | 1 | 1.000 |  | 1.000 | 90.0 | 1.00x | 1.000 |  | 1.000 | 100.0 | 1.00x |" in text
    assert "## Cells that failed" in text and "| kvpress | m | pyramidkv | 0.25 | niah_single | 1000 | 0 | ERROR" in text

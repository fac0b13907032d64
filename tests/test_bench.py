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
    from modalkv.cli.bench import check_bench

    check_bench(BenchConfig(methods=["hae(mode=kv_only,tau_g=0.01)", "snapkv@image=0.1"]))
    with pytest.raises(TypeError, match="no parameter"):
        check_bench(BenchConfig(methods=["hae(tau=0.01)"]))
    with pytest.raises(ValueError, match="tau_g"):
        check_bench(BenchConfig(methods=["hae(tau_g=-2.0)"]))


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
    from modalkv.bench.sweep import COLUMNS

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
    assert "| modalkv | snapkv | 0.25 | 2 | 0.500 | -0.500 |  | 0.260 | 2.00x | 2.00x | 1.00 |" in text  # 2 prompts:
    assert "| kvpress | pyramidkv | 0.25 | 1 |" in text  # each library's own
    assert "### Libraries side by side (only the 1 prompts every library ran: niah_single; lengths 1000)" in text
    assert "| full | 1 | 1.000 |  | 1.000 | 90.0 | 1.00x | 1.000 |  | 1.000 | 100.0 | 1.00x |" in text
    assert "## Cells that failed" in text and "| kvpress | m | pyramidkv | 0.25 | niah_single | 1000 | 0 | ERROR" in text


def _rows(library, seeds_lengths, scores):
    """Results rows of one library: a full-cache row and a snapkv 0.25 row per (task, length, seed)."""
    rows = []
    for (task, length, seed), (full, snap) in zip(seeds_lengths, scores):
        base = dict(library=library, model="m", task=task, length=length, seed=seed, kv_full_bytes=1000,
                    decode_ms=10.0, kl=float("nan"), top1=float("nan"))
        rows.append(dict(base, method="full", budget=1.0, score=full, kv_kept_bytes=1000))
        rows.append(dict(base, method="snapkv", budget=0.25, score=snap, kv_kept_bytes=250))
    return rows


def test_library_comparisons_use_only_shared_prompts():
    """kvpress ran one of modalkv's three prompts (the easy one): wherever the two libraries are compared, each is
    averaged over that prompt only, while modalkv alone is shown over all of its prompts."""
    from modalkv.bench.report import method_points, panels, pareto_panels, shared_prompts
    from modalkv.bench.sweep import add_ratios

    keys = [("niah_single", 1000, 0), ("niah_single", 1000, 1), ("vt", 2000, 0)]
    df = add_ratios(pd.DataFrame(_rows("modalkv", keys, [(1, 1), (1, 0), (1, 0)]) +
                                 _rows("kvpress", keys[:1], [(1, 1)])))
    shared, restricted = shared_prompts(df)
    assert restricted and set(zip(shared.task, shared.length, shared.seed)) == {keys[0]}
    (t1, own, r1), (t2, both, r2) = pareto_panels(df)
    assert not r1 and set(own.library) == {"modalkv"} and len(own) == 6
    assert r2 and len(both) == 4
    pts = method_points(both)
    assert pts.loc[("modalkv", "snapkv", 0.25), "y"] == pts.loc[("kvpress", "snapkv", 0.25), "y"] == 1.0
    assert method_points(own).loc[("modalkv", "snapkv", 0.25), "y"] == pytest.approx(1 / 3)
    by_task = {task: (rows, r) for task, rows, r in panels(df, "task")}
    assert by_task["niah_single"][1] and set(by_task["niah_single"][0].seed) == {0}
    assert not by_task["vt"][1] and len(by_task["vt"][0]) == 2  # modalkv alone: nothing to restrict
    assert shared_prompts(df[df.library == "modalkv"])[1] is False


def test_method_colours_are_the_same_in_every_plot():
    """A method has one colour wherever it appears; a variant of it shares the colour with another line style."""
    from modalkv.bench.report import method_styles

    a = method_styles(["snapkv", "h2o"])
    b = method_styles(["adakv", "kivi-4", "snapkv", "retentivekv(state_readout=none)", "retentivekv", "zzz"])
    assert a["snapkv"] == b["snapkv"] and a["snapkv"][1] == "-"
    assert b["retentivekv(state_readout=none)"][0] == b["retentivekv"][0]
    assert b["retentivekv(state_readout=none)"][1] != "-"
    assert len({color for color, _ in b.values()}) == len(b) - 1  # distinct, but for the variant
    assert method_styles(["zzz"])["zzz"] == b["zzz"]  # unknown names too: by name, not by position

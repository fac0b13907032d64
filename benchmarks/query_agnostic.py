"""Tables and plot of the query-agnostic benchmark (docs/results/query_agnostic.md) from its results files.

    modalkv bench --config benchmarks/sweep_query_agnostic_text.toml     # docs/results/query_agnostic.csv
    modalkv bench --config benchmarks/sweep_query_agnostic_multi.toml    # docs/results/query_agnostic_multi.csv
    modalkv bench --config benchmarks/sweep_query_agnostic_vlm.toml      # docs/results/query_agnostic_vlm.csv
    PYTHONPATH=src .venv-kvpress/bin/python benchmarks/kvpress_side_by_side.py --presses kvzip expected_attention \\
        --tasks niah_single_after docqa_cast_after --samples 5 --out docs/results/query_agnostic_kvpress.csv
    .venv/bin/python benchmarks/query_agnostic.py [--results-dir docs/results]

Prints Markdown tables (one row per library, task, method and budget) and writes query_agnostic_score_vs_bytes.png.
Every ratio is against the full cache of the same library on the same prompts (same task, length and seed):
``share of full`` = the method's summed score / the full cache's summed score over those prompts; ``KV kept`` = mean
kept bytes / mean full-cache kept bytes; ``decode vs full`` = median over prompts of full decode ms / method decode ms
(> 1: faster than the full cache); ``same answer as full`` = share of prompts whose output is exactly the full
cache's (of every answer, for multi-question and chat rows); ``compress s`` = mean compression seconds (modalkv) and ``prefill s`` = mean
seconds from the context's tokens to a compressed cache (the forward plus the compression; kvpress's rows: the
press's whole prefill, its reconstruction included).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

FILES = ["query_agnostic.csv", "query_agnostic_multi.csv", "query_agnostic_vlm.csv", "query_agnostic_kvpress.csv"]
GROUP = ["library", "model", "task", "length", "seed"]


def load(results: Path) -> pd.DataFrame:
    frames = [pd.read_csv(results / f) for f in FILES if (results / f).exists()]
    if not frames:
        raise SystemExit(f"no results file in {results} (expected one of {', '.join(FILES)})")
    df = pd.concat(frames, ignore_index=True)
    failed = df[df.score.isna()]
    if len(failed):
        print(f"{len(failed)} failed cells (no score): {sorted(set(failed.method))}")
    return df[df.score.notna()]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    full = df[df.method == "full"].set_index(GROUP)[["score", "kv_kept_bytes", "decode_ms", "prefill_s", "output"]]
    full.columns = ["full_score", "full_kept", "full_decode_ms", "full_prefill_s", "full_output"]
    df = df.join(full, on=GROUP)
    df = df[df.full_score.notna()]  # only prompts whose full cache ran in the same run
    rows = []
    for (lib, model, task, length, method, budget), g in df.groupby(
            ["library", "model", "task", "length", "method", "budget"], sort=False):
        rows.append(dict(
            library=lib, model=model, task=task, length=length, method=method, budget=budget, n=len(g),
            score=g.score.mean(), full_score=g.full_score.mean(),
            share=g.score.sum() / g.full_score.sum() if g.full_score.sum() else float("nan"),
            same=(g.output.fillna("") == g.full_output.fillna("")).mean(),
            kept_mb=g.kv_kept_bytes.mean() / 2**20, kept_ratio=g.kv_kept_bytes.mean() / g.full_kept.mean(),
            compress_s=g.compress_s.mean(), prefill_s=g.prefill_s.mean(), full_prefill_s=g.full_prefill_s.mean(),
            decode_ms=g.decode_ms.median(), decode_vs_full=(g.full_decode_ms / g.decode_ms).median(),
        ))
    return pd.DataFrame(rows)


def markdown(s: pd.DataFrame) -> str:
    lines = []
    for (model, task, length), g in s.groupby(["model", "task", "length"], sort=False):
        lines += [f"\n**{task}**, {model}, {length} tokens\n",
                  "| library | method | budget | n | score | share of full | same answer as full | KV kept (MiB) | "
                  "KV kept / full | compress s | prefill s (full: same run) | decode ms | decode vs full |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        g = g.assign(order=(g.method != "full").astype(int))  # the full cache first
        for r in g.sort_values(["library", "order", "method", "budget"], ascending=[False, True, True, True]) \
                .itertuples():
            comp = "" if pd.isna(r.compress_s) else f"{r.compress_s:.2f}"
            lines.append(f"| {r.library} | {r.method} | {r.budget:g} | {r.n} | {r.score:.2f} | {r.share:.2f} | {r.same:.2f} | "
                         f"{r.kept_mb:.1f} | {r.kept_ratio:.3f} | {comp} | {r.prefill_s:.1f} ({r.full_prefill_s:.1f}) "
                         f"| {r.decode_ms:.0f} | {r.decode_vs_full:.2f} |")
    return "\n".join(lines)


def plot(s: pd.DataFrame, out: Path, tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in tasks if t in set(s.task)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.6), squeeze=False)
    colours = {"kvzip": "C0", "expected_attention": "C1", "snapkv": "C2", "streamingllm": "C3", "h2o": "C4"}
    for ax, task in zip(axes[0], tasks):
        g = s[s.task == task]
        for lib, style in [("modalkv", "-o"), ("kvpress", "--s")]:
            full = g[(g.library == lib) & (g.method == "full")]
            if not len(full):
                continue
            n = int(full.n.iloc[0])
            ax.axhline(full.score.iloc[0], color="k", ls="-" if lib == "modalkv" else ":", lw=1,
                       label=f"full cache ({lib}, {full.kept_mb.iloc[0]:.0f} MiB, {n} prompts)")
            for method, m in g[(g.library == lib) & (g.method != "full")].groupby("method"):
                m = m.sort_values("budget")
                ax.plot(m.kept_mb, m.score, style, color=colours.get(method.split("(")[0], "C7"),
                        label=f"{method} ({lib})", alpha=1 if lib == "modalkv" else 0.6)
                if m.kept_mb.max() - m.kept_mb.min() < 1:  # every budget holds the same bytes (a masking press)
                    ax.annotate("budgets " + ", ".join(f"{b:g}" for b in m.budget) + ": masked, all bytes held",
                                (m.kept_mb.iloc[0], m.score.iloc[0]), textcoords="offset points", xytext=(-200, 6),
                                fontsize=7)
        ax.set_title(f"{task} ({g.model.iloc[0]}, {g.length.iloc[0]} tokens)", fontsize=10)
        ax.set_xlabel("KV bytes kept (MiB, mean; markers left to right: budgets " +
                      ", ".join(f"{b:g}" for b in sorted(set(g[g.method != "full"].budget))) + ")")
        ax.set_ylabel("score (mean)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
    fig.suptitle("Question after compression: score against KV bytes kept", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", type=Path, default=Path("docs/results"))
    args = p.parse_args()
    s = summary(load(args.results_dir))
    print(markdown(s))
    out = args.results_dir / "query_agnostic_score_vs_bytes.png"
    plot(s, out, ["niah_single_after", "docqa_cast_after"])
    print(f"\nplot: {out}")


if __name__ == "__main__":
    main()

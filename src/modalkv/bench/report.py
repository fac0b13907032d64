"""``modalkv report RESULTS``: Markdown tables and PNG plots from a results file."""

from __future__ import annotations

from pathlib import Path


def _table(df, index, columns, values, fmt) -> list[str]:
    pivot = df.pivot_table(index=index, columns=columns, values=values, aggfunc="mean")
    cols = list(pivot.columns)
    lines = ["| " + " | ".join([str(i) for i in ([index] if isinstance(index, str) else index)] +
                               [f"{c:g}" if isinstance(c, float) else str(c) for c in cols]) + " |"]
    n_index = 1 if isinstance(index, str) else len(index)
    lines.append("|" + "---|" * n_index + "---:|" * len(cols))
    for key, row in pivot.iterrows():
        key = key if isinstance(key, tuple) else (key,)
        lines.append("| " + " | ".join([str(k) for k in key] + [fmt(v) if v == v else "" for v in row]) + " |")
    return lines


def _slug(model: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name) or "model"


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated (fewer bytes and higher accuracy), sorted by bytes."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def summary_table(d) -> list[str]:
    """One row per (library, method, budget): the three numbers a user chooses by, over all tasks and lengths."""
    import pandas as pd

    acc = d[d.task != "fidelity"]
    fid = d[d.task == "fidelity"]
    g = d.groupby(["library", "method", "budget"])
    t = pd.DataFrame({
        "score": acc.groupby(["library", "method", "budget"]).score.mean(),
        "score_vs_full": (acc.score - acc.full_score).groupby([acc.library, acc.method, acc.budget]).mean(),
        "kl": fid.groupby(["library", "method", "budget"]).kl.mean() if len(fid) else float("nan"),
        "kv": g.kv_ratio_vs_full.mean(),
        "speedup": g.speedup_vs_full.median(),
        "speedup_long": d[d.length == d.length.max()].groupby(["library", "method", "budget"]).speedup_vs_full.median(),
        "peak": (d[d.length == d.length.max()].groupby(["library", "method", "budget"]).cell_peak_rss_bytes.median()
                 / 2**30 if "cell_peak_rss_bytes" in d else float("nan")),
    })
    longest = int(d.length.max())
    lines = ["### Summary: accuracy, memory and speed together", "",
             "Score: mean over the generation tasks, lengths and seeds (Δ: minus the full cache on the same prompts). "
             "KL: fidelity task. KV: bytes kept / full cache. Speed-up: median decode ms/token of the full cache / "
             f"the method's, same run, same prompt (all lengths; and at {longest} tokens). Peak RSS: median per-cell "
             f"process peak at {longest} tokens (building the cache + decoding; the prompt's captured prefill, shared "
             "by all cells, is resident and included).", "",
             f"| library | method | budget | score | Δ vs full | KL | KV kept | speed-up | speed-up @{longest} | "
             f"peak RSS @{longest} GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    for (lib, method, budget), r in t.iterrows():
        lines.append(f"| {lib} | {method} | {budget:g} | {_f(r.score, '.3f')} | {_f(r.score_vs_full, '+.3f')} | "
                     f"{_f(r.kl, '.4f')} | {_f(r.kv, '.3f')} | {_f(r.speedup, '.2f', 'x')} | "
                     f"{_f(r.speedup_long, '.2f', 'x')} | {_f(r.peak, '.2f')} |")
    return lines


def _f(v, spec, unit=""):
    return format(v, spec) + unit if v == v else ""


def libraries_table(d) -> list[str]:
    """modalkv beside other libraries on exactly the prompts (task, length, seed) that every library ran."""
    libs = sorted(d.library.unique())
    if len(libs) < 2:
        return []
    key = ["task", "length", "seed"]
    common = set.intersection(*[set(map(tuple, d[d.library == lib][key].drop_duplicates().values)) for lib in libs])
    c = d[[tuple(x) in common for x in d[key].values]]
    if c.empty:
        return []
    shared = sorted(set.intersection(*[set(c[c.library == lib].method) for lib in libs]))
    tasks = ", ".join(sorted(c.task.unique()))
    lines = [f"### Libraries side by side (only the {len(common)} prompts every library ran: {tasks}; lengths "
             f"{', '.join(str(x) for x in sorted(c.length.unique()))})", "",
             "Speed-up is against each library's own full cache in its own run (modalkv's compact store; "
             "transformers' DynamicCache for kvpress). Decode ms/token comes from each library's own run, whose "
             "thread count and machine load may differ: compare ratios across libraries, not milliseconds.", "",
             "| method | budget | " + " | ".join(f"{lib} score | {lib} KL | {lib} KV kept | {lib} decode ms | "
                                              f"{lib} speed-up" for lib in libs) + " |",
             "|---|---:|" + "---:|" * (5 * len(libs))]
    for method in shared:
        for budget in sorted(c[c.method == method].budget.unique()):
            cells = []
            for lib in libs:
                r = c[(c.library == lib) & (c.method == method) & (c.budget == budget)]
                fid = r.task == "fidelity"
                cells += [_f(r[~fid].score.mean(), ".3f"), _f(r[fid].kl.mean(), ".4f"),
                          _f(r.kv_ratio_vs_full.mean(), ".3f"), _f(r.decode_ms.median(), ".1f"),
                          _f(r.speedup_vs_full.median(), ".2f", "x")]
            lines.append(f"| {method} | {budget:g} | " + " | ".join(cells) + " |")
    return lines


def write_report(results: str | Path, out_dir: str | Path | None = None, extra: list | None = None,
                 name: str | None = None) -> Path:
    """Write ``<stem>_report.md`` and plots next to the results (or into ``out_dir``); returns the Markdown path.

    ``extra``: more results files (e.g. kvpress rows from its own environment) shown in the same tables and plots.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from .runner import add_ratios

    results = Path(results)
    df = add_ratios(pd.concat([pd.read_csv(results), *[pd.read_csv(x) for x in (extra or [])]], ignore_index=True))
    out = Path(out_dir) if out_dir else results.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = name or results.stem
    df["label"] = df.library + ":" + df.method
    names = ", ".join(f"`{Path(x).name}`" for x in [results, *(extra or [])])
    lines = [f"# Benchmark report: {names}", "",
             f"{len(df)} cells; models {', '.join(sorted(df.model.unique()))}; tasks {', '.join(sorted(df.task.unique()))}; "
             f"lengths {', '.join(str(x) for x in sorted(df.length.unique()))}; "
             f"{df.seed.nunique()} seed(s). Scores are means over seeds; ratios are against the full cache of the same "
             "run and prompt.", ""]
    tasks = [t for t in sorted(df.task.unique()) if t != "fidelity"]
    for model in sorted(df.model.unique()):
        d = df[df.model == model]
        lines += [f"## {model}", ""]
        lines += summary_table(d) + [""]
        side = libraries_table(d)
        if side:
            lines += side + [""]
        for task in tasks:
            lines += [f"### {task}: score by budget", ""]
            lines += _table(d[d.task == task], ["label", "length"], "budget", "score", lambda v: f"{v:.2f}") + [""]
        if "fidelity" in set(d.task):
            f = d[d.task == "fidelity"]
            lines += ["### fidelity: KL(full || method) by budget (teacher-forced continuation)", ""]
            lines += _table(f, ["label", "length"], "budget", "kl", lambda v: f"{v:.4f}") + [""]
            lines += ["### fidelity: top-1 agreement with the full cache", ""]
            lines += _table(f, ["label", "length"], "budget", "top1", lambda v: f"{v:.3f}") + [""]
        lines += ["### KV kept / full cache (bytes, metadata included)", ""]
        lines += _table(d, ["label", "length"], "budget", "kv_ratio_vs_full", lambda v: f"{v:.3f}") + [""]
        lines += ["### KV kept, MiB (mean; metadata included)", ""]
        lines += _table(d.assign(kv_mib=d.kv_kept_bytes / 2**20), ["label", "length"], "budget", "kv_mib",
                        lambda v: f"{v:.1f}") + [""]
        lines += ["### decode ms/token (mean over prompts of each cell's median step)", ""]
        lines += _table(d, ["label", "length"], "budget", "decode_ms", lambda v: f"{v:.1f}") + [""]
        lines += ["### decode speed-up vs the full cache (same run, same prompt)", ""]
        lines += _table(d, ["label", "length"], "budget", "speedup_vs_full", lambda v: f"{v:.2f}x") + [""]

    plots = []
    for model in sorted(df.model.unique()):
        d = df[(df.model == model) & (df.method != "full")]
        acc = d[d.task != "fidelity"]
        if len(acc):
            acc_tasks = sorted(acc.task.unique())
            cols = min(3, len(acc_tasks))
            rows_n = -(-len(acc_tasks) // cols)
            fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
            for ax, task in zip(axes.flat, acc_tasks):
                t = acc[(acc.task == task) & ~acc.method.str.startswith("kivi")]
                for label, g in t.groupby("label"):
                    s = g.groupby("budget").score.mean()
                    ax.plot(s.index, s.values, marker="o", label=label)
                full = df[(df.model == model) & (df.method == "full") & (df.task == task)].score.mean()
                ax.axhline(full, color="k", ls="--", label="full cache")
                ax.set(xlabel="budget", ylabel="score", title=task, ylim=(-0.05, 1.05))
            for ax in list(axes.flat)[len(acc_tasks):]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=6)
            fig.suptitle(f"{model}: accuracy vs budget (mean over lengths and seeds)")
            plots.append(_save(fig, out / f"{stem}_{_slug(model)}_accuracy_vs_budget.png"))
            fig, ax = plt.subplots(figsize=(6, 4))
            pts = acc.groupby(["label", "budget"]).agg(kv=("kv_ratio_vs_full", "mean"), score=("score", "mean"))
            for label, g in pts.groupby(level=0):
                ax.scatter(g.kv, g.score, label=label)
            front = pareto(list(zip(pts.kv, pts.score)))
            ax.plot([p[0] for p in front], [p[1] for p in front], "k-", lw=1, label="Pareto front")
            ax.set(xlabel="KV bytes kept / full cache (metadata counted)", ylabel="score (mean over tasks)",
                   title=f"{model}: accuracy vs memory")
            ax.legend(fontsize=7)
            plots.append(_save(fig, out / f"{stem}_{_slug(model)}_pareto.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        at = 0.25 if (d.budget == 0.25).any() else d.budget.min()
        for label, g in d[(d.budget == at) | d.method.str.startswith("kivi")].groupby("label"):
            s = g.groupby("length").speedup_vs_full.median()
            ax.plot(s.index, s.values, marker="o", label=label)
        ax.axhline(1.0, color="k", ls="--")
        ax.set(xlabel="context length (tokens)", ylabel="decode speed-up vs full (median)",
               title=f"{model}: budget {at:g} (KIVI: all tokens, quantized)")
        ax.legend(fontsize=7)
        plots.append(_save(fig, out / f"{stem}_{_slug(model)}_speedup_vs_length.png"))
        fid = d[d.task == "fidelity"]
        if len(fid):
            fig, ax = plt.subplots(figsize=(6, 4))
            for label, g in fid.groupby("label"):
                s = g.groupby("budget").kl.mean()
                ax.plot(s.index, s.values, marker="o", label=label)
            ax.set(xlabel="budget", ylabel="KL(full || method), nats", yscale="log", title=f"{model}: fidelity")
            ax.legend(fontsize=7)
            plots.append(_save(fig, out / f"{stem}_{_slug(model)}_fidelity.png"))
    failed = df[df.output.astype(str).str.startswith("ERROR")] if "output" in df else df.iloc[:0]
    if len(failed):
        lines += ["## Cells that failed", "",
                  "| library | model | method | budget | task | length | seed | error |", "|---|---|---|---:|---|---:|---:|---|"]
        for r in failed.itertuples():
            lines.append(f"| {r.library} | {r.model} | {r.method} | {r.budget:g} | {r.task} | {r.length} | {r.seed} | "
                         f"{r.output} |")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    md = out / f"{stem}_report.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

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


def write_report(results: str | Path, out_dir: str | Path | None = None, extra: list | None = None) -> Path:
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
    stem = results.stem
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
        lines += ["### decode speed-up vs the full cache (same run, same prompt)", ""]
        lines += _table(d, ["label", "length"], "budget", "speedup_vs_full", lambda v: f"{v:.2f}x") + [""]

    plots = []
    for model in sorted(df.model.unique()):
        d = df[(df.model == model) & (df.method != "full")]
        acc = d[d.task != "fidelity"]
        if len(acc):
            fig, ax = plt.subplots(figsize=(6, 4))
            for label, g in acc.groupby("label"):
                s = g.groupby("budget").score.mean()
                ax.plot(s.index, s.values, marker="o", label=label)
            full = df[(df.model == model) & (df.method == "full") & (df.task != "fidelity")].score.mean()
            ax.axhline(full, color="k", ls="--", label="full cache")
            ax.set(xlabel="budget (share of the prompt kept)", ylabel="score (mean over tasks)", title=model)
            ax.legend(fontsize=7)
            plots.append(_save(fig, out / f"{stem}_{_slug(model)}_accuracy_vs_budget.png"))
            fig, ax = plt.subplots(figsize=(6, 4))
            pts = acc.groupby(["label", "budget"]).agg(kv=("kv_kept_bytes", "mean"), score=("score", "mean"))
            for label, g in pts.groupby(level=0):
                ax.scatter(g.kv / 2**20, g.score, label=label)
            front = pareto(list(zip(pts.kv / 2**20, pts.score)))
            ax.plot([p[0] for p in front], [p[1] for p in front], "k-", lw=1, label="Pareto front")
            ax.set(xlabel="KV bytes kept (MiB)", ylabel="score", title=f"{model}: accuracy vs memory")
            ax.legend(fontsize=7)
            plots.append(_save(fig, out / f"{stem}_{_slug(model)}_pareto.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, g in d.groupby("label"):
            s = g.groupby("length").speedup_vs_full.median()
            ax.plot(s.index, s.values, marker="o", label=label)
        ax.axhline(1.0, color="k", ls="--")
        ax.set(xlabel="context length (tokens)", ylabel="decode speed-up vs full", title=model)
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

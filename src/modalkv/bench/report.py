"""``modalkv report RESULTS``: Markdown tables and PNG plots from a results file."""

from __future__ import annotations

import re
import textwrap
import zlib
from pathlib import Path

import pandas as pd

from ..methods import parse_label
from .runner import add_ratios

# matplotlib is an optional extra (modalkv[plot]): it is imported where a plot is drawn.


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
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name) or "model"


REPORT_COLUMNS = ("library", "model", "method", "budget", "task", "length", "seed", "score", "kl", "top1",
                  "kv_kept_bytes", "decode_ms")
PROMPT_KEY = ["task", "length", "seed"]


def read_results(path: str | Path):
    """One results CSV as a DataFrame; a file that is empty, not a CSV or lacks a column the report needs is a
    ValueError naming the file (and the missing columns)."""
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty; expected a results CSV written by `modalkv bench`") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as err:
        raise ValueError(f"{path} is not a CSV file ({type(err).__name__}); expected a results CSV written by "
                         "`modalkv bench`") from None
    missing = [c for c in REPORT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}; a results CSV written by `modalkv bench` "
                         f"has {', '.join(REPORT_COLUMNS)}")
    if df.empty:
        raise ValueError(f"{path} has a header but no rows")
    return df


def shared_prompts(d):
    """``(rows, restricted)``: with two or more libraries, only the prompts (task, length, seed) that every library
    ran, so that no comparison averages one library over other prompts than another; otherwise all rows."""
    libs = sorted(d.library.unique())
    if len(libs) < 2:
        return d, False
    keys = [set(map(tuple, d[d.library == lib][PROMPT_KEY].drop_duplicates().values)) for lib in libs]
    common = set.intersection(*keys)
    return d[[tuple(x) in common for x in d[PROMPT_KEY].values]], True


# One colour per method wherever it appears (every plot of every report); variants of a method, e.g.
# "retentivekv(state_readout=none)" or "snapkv@image=0.1", share its colour with another line style.
METHOD_COLORS = {
    "streamingllm": "#1f77b4", "h2o": "#ff7f0e", "snapkv": "#2ca02c", "pyramidkv": "#d62728", "adakv": "#9467bd",
    "lookm": "#8c564b", "madakv": "#e377c2", "hae": "#bcbd22", "retentivekv": "#17becf", "sphericalkv": "#7f7f7f",
    "kivi-2": "#393b79", "kivi-4": "#5254a3", "kivi-8": "#6b6ecf", "expected_attention": "#ad494a",
    "knorm": "#8ca252", "full": "#000000",
}
SPARE_COLORS = ["#e7ba52", "#843c39", "#637939", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1"]
VARIANT_STYLES = ["--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
LIBRARY_MARKERS = {"modalkv": "o", "kvpress": "s"}
FULL_STYLES = {"modalkv": "--", "kvpress": ":"}


def method_styles(methods) -> dict[str, tuple[str, object]]:
    """Method label -> (colour, line style): the base method's colour; plain labels solid, variants dashed etc."""
    styles, variants = {}, {}
    for label in sorted(set(methods)):
        try:
            base = parse_label(label)[0]
        except ValueError:
            base = label
        color = METHOD_COLORS.get(base) or SPARE_COLORS[zlib.crc32(base.encode()) % len(SPARE_COLORS)]
        if label == base:
            styles[label] = (color, "-")
        else:
            n = variants[base] = variants.get(base, -1) + 1
            styles[label] = (color, VARIANT_STYLES[n % len(VARIANT_STYLES)])
    return styles


def _marker(library: str) -> str:
    return LIBRARY_MARKERS.get(library, "^")


def _plot(ax, x, y, library: str, color: str, ls) -> None:
    """A method's line: its colour, the library's marker (hollow, thinner for other libraries, so that lines of
    two libraries lying on top of each other both stay visible)."""
    own = library == "modalkv"
    ax.plot(x, y, color=color, ls=ls, marker=_marker(library), ms=5 if own else 8, lw=1.5 if own else 1.0,
            mfc=color if own else "none", alpha=1.0 if own else 0.8)


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
    several = d.library.nunique() > 1  # then say how many prompts each row covers: they differ between libraries
    if several:
        t["prompts"] = d.drop_duplicates(["library", "method", "budget"] + PROMPT_KEY).groupby(
            ["library", "method", "budget"]).size()
    lines = ["### Summary: accuracy, memory and speed together", "",
             "Score: mean over the generation tasks, lengths and seeds (Δ: minus the full cache on the same prompts). "
             "KL: fidelity task. KV: bytes kept / full cache. Speed-up: median decode ms/token of the full cache / "
             f"the method's, same run, same prompt (all lengths; and at {longest} tokens). Peak RSS: median per-cell "
             f"process peak at {longest} tokens (building the cache + decoding; the prompt's captured prefill, shared "
             "by all cells, is resident and included)." + (
                 " Each library's rows cover the prompts it ran (column 'prompts'), which differ between libraries: "
                 "compare libraries in the side-by-side table below, which keeps only the prompts every library "
                 "ran." if several else ""), "",
             "| library | method | budget | " + ("prompts | " if several else "") + "score | Δ vs full | KL | "
             f"KV kept | speed-up | speed-up @{longest} | peak RSS @{longest} GiB |",
             "|---|---|---:|" + ("---:|" if several else "") + "---:|---:|---:|---:|---:|---:|---:|"]

    for (lib, method, budget), r in t.iterrows():
        lines.append(f"| {lib} | {method} | {budget:g} | " + (f"{r.prompts:.0f} | " if several else "") +
                     f"{_f(r.score, '.3f')} | {_f(r.score_vs_full, '+.3f')} | "
                     f"{_f(r.kl, '.4f')} | {_f(r.kv, '.3f')} | {_f(r.speedup, '.2f', 'x')} | "
                     f"{_f(r.speedup_long, '.2f', 'x')} | {_f(r.peak, '.2f')} |")
    return lines


def _f(v, spec, unit=""):
    return format(v, spec) + unit if v == v else ""


def libraries_table(d) -> list[str]:
    """modalkv beside other libraries on exactly the prompts (task, length, seed) that every library ran."""
    libs = sorted(d.library.unique())
    c, restricted = shared_prompts(d)
    if not restricted or c.empty:
        return []
    common = set(map(tuple, c[PROMPT_KEY].values))
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


def _legend(fig, d, styles) -> None:
    """One legend for the whole figure: a colour per method, a marker per library, the full cache per library."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=styles[m][0], ls=styles[m][1], label=m) for m in sorted(d.method.unique())
               if m != "full"]
    libs = sorted(d.library.unique())
    if len(libs) > 1:
        handles += [Line2D([], [], color="0.3", marker=_marker(lib), ls="none", label=lib,
                           mfc="0.3" if lib == "modalkv" else "none") for lib in libs]
    if (d.method == "full").any():
        handles += [Line2D([], [], color="k", ls=FULL_STYLES.get(lib, "-."),
                           label=f"full cache ({lib})" if len(libs) > 1 else "full cache") for lib in libs]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def method_points(d, y: str = "score"):
    """One point per (library, method, budget) of the compressed rows: mean KV bytes kept / full cache (``kv``) and
    the mean of ``y`` (``y``), over the rows given."""
    return d[d.method != "full"].groupby(["library", "method", "budget"]).agg(
        kv=("kv_ratio_vs_full", "mean"), y=(y, "mean")).dropna()


def panels(d, by: str) -> list[tuple[object, object, bool]]:
    """``(value, rows, restricted)`` per value of column ``by`` (one panel each), each panel's rows restricted to
    the prompts every library in it ran."""
    return [(value, *shared_prompts(d[d[by] == value])) for value in sorted(d[by].unique())]


def pareto_panels(acc) -> list[tuple[str, object, bool]]:
    """``(title, rows, restricted)`` of the mean-over-tasks plot: the main library (modalkv if present) over every
    prompt it ran and, with several libraries, all of them over the prompts they share."""
    primary = "modalkv" if "modalkv" in set(acc.library) else sorted(acc.library.unique())[0]
    out = [(f"{primary}, every prompt it ran", acc[acc.library == primary], False)]
    if acc.library.nunique() > 1:
        out.append(("libraries side by side", *shared_prompts(acc)))
    return out


def _method_lines(ax, d, styles, y: str) -> None:
    """One line per (library, method) across budgets: x = KV bytes kept / full cache, y = mean of ``y``."""
    for (lib, method), s in method_points(d, y).groupby(level=[0, 1]):
        s = s.sort_values("kv")
        _plot(ax, s.kv, s.y, lib, *styles[method])


def _full_lines(ax, d, y: str) -> None:
    for lib, g in d[d.method == "full"].groupby("library"):
        if g[y].notna().any():
            ax.axhline(g[y].mean(), color="k", ls=FULL_STYLES.get(lib, "-."), lw=1)


def _prompts_note(d, restricted: bool) -> str:
    n = len(d[PROMPT_KEY].drop_duplicates())
    lengths = "/".join(f"{x // 1024}k" if x % 1024 == 0 else str(x) for x in sorted(d.length.unique()))
    shared = f", shared by {' and '.join(sorted(d.library.unique()))}" if restricted else ""
    return f"{n} prompt{'s' if n != 1 else ''}, {lengths}{shared}"


def _suptitle(fig, text: str, panels: int) -> None:
    """A figure title wrapped to the width of its panels (at most three per row)."""
    fig.suptitle(textwrap.fill(text, 45 * min(3, panels)), fontsize=11)


def _grid(n: int, width: float = 4.0, height: float = 3.2):
    """A figure with ``n`` axes, at most three per row."""
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def model_plots(df, model: str, out: Path, stem: str) -> list[Path]:
    """The plots of one model: accuracy against KV bytes kept per task, the same averaged over tasks (with its
    Pareto front), decode speed-up against context length, and fidelity (KL) against KV bytes kept. Wherever two
    libraries share an axes, only the prompts both ran are used (:func:`shared_prompts`)."""
    import matplotlib.pyplot as plt

    d = df[df.model == model]
    styles = method_styles(df.method.unique())
    slug, plots = _slug(model), []
    acc = d[d.task != "fidelity"]
    if (acc.method != "full").any():
        per_task = panels(acc, "task")
        fig, axes = _grid(len(per_task))
        for ax, (task, t, restricted) in zip(axes, per_task):
            _method_lines(ax, t, styles, "score")
            _full_lines(ax, t, "score")
            ax.set(title=f"{task}\n({_prompts_note(t, restricted)})", xlim=(0, 1.05), ylim=(-0.05, 1.05),
                   xlabel="KV bytes kept / full cache", ylabel="score")
            ax.title.set_fontsize(9)
        _suptitle(fig, f"{model}: accuracy against KV memory kept (one point per budget; mean over seeds and "
                       "lengths)", len(per_task))
        _legend(fig, acc, styles)
        plots.append(_save(fig, out / f"{stem}_{slug}_accuracy_vs_memory.png"))

        mean_panels = pareto_panels(acc)
        fig, axes = _grid(len(mean_panels), 5.2, 4.0)
        for ax, (title, p, restricted) in zip(axes, mean_panels):
            _method_lines(ax, p, styles, "score")
            _full_lines(ax, p, "score")
            pts = method_points(p, "score")
            front = pareto(list(zip(pts.kv, pts.y)))
            ax.plot([x for x, _ in front], [y for _, y in front], color="0.6", lw=4, alpha=0.35, zorder=0,
                    label="Pareto front")
            tasks = textwrap.fill("tasks " + ", ".join(sorted(p.task.unique())), 70)
            ax.set(title=f"{title}\n({_prompts_note(p, restricted)})\n{tasks}", xlim=(0, 1.05), ylim=(-0.02, None),
                   xlabel="KV bytes kept / full cache", ylabel="score (mean over tasks)")
            ax.title.set_fontsize(8)
            ax.legend(loc="lower right", fontsize=7)
        _suptitle(fig, f"{model}: accuracy against KV memory, mean over tasks", len(mean_panels))
        _legend(fig, acc, styles)
        plots.append(_save(fig, out / f"{stem}_{slug}_pareto.png"))

    comp = d[d.method != "full"]
    at = 0.25 if (comp.budget == 0.25).any() else comp.budget.min()
    sel = comp[(comp.budget == at) | comp.method.str.startswith("kivi")]
    speed = pd.concat([rows for _, rows, _ in panels(sel, "length")])
    speed = speed.groupby(["library", "method", "length"]).speedup_vs_full.median().dropna()
    lengths = sorted(d.length.unique())
    several = d.library.nunique() > 1
    title = (f"{model}: decode speed-up at budget {at:g} (KIVI: every token, quantized)" +
             ("\neach library against its own full cache, on the prompts both ran" if several else ""))
    if len(lengths) == 1:  # one context length: a bar per method
        fig, ax = plt.subplots(figsize=(6, 0.6 + 0.32 * len(speed)))
        labels = [f"{method} ({lib})" if several else method for lib, method, _ in speed.index]
        colors = [styles[method][0] for _, method, _ in speed.index]
        ax.barh(range(len(speed)), speed.values, color=colors, hatch=[None if lib == "modalkv" else "//"
                                                                     for lib, _, _ in speed.index])
        ax.set_yticks(range(len(speed)), labels)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", ls="--", lw=1)
        ax.set(xlabel=f"decode speed-up vs the full cache (median; {lengths[0]}-token prompts)", title=title)
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (lib, method), s in speed.groupby(level=[0, 1]):
            _plot(ax, s.index.get_level_values("length"), s.values, lib, *styles[method])
        ax.axhline(1.0, color="k", ls="--", lw=1)
        if lengths[-1] >= 4 * lengths[0]:
            ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.minorticks_off()
        ax.set(xlabel="context length (tokens)", ylabel="decode speed-up vs the full cache (median)", title=title)
        _legend(fig, sel[sel.method.isin(speed.index.get_level_values("method"))], styles)
    ax.title.set_fontsize(10)
    plots.append(_save(fig, out / f"{stem}_{slug}_speedup_vs_length.png"))

    fid = d[d.task == "fidelity"]
    if (fid.method != "full").any():
        per_length = panels(fid, "length")
        fig, axes = _grid(len(per_length))
        for ax, (length, f, restricted) in zip(axes, per_length):
            _method_lines(ax, f, styles, "kl")
            ax.set(title=f"{length} tokens ({_prompts_note(f, restricted)})", xlim=(0, 1.05), yscale="log",
                   xlabel="KV bytes kept / full cache", ylabel="KL(full || method), nats")
            ax.title.set_fontsize(9)
        _suptitle(fig, f"{model}: fidelity on a teacher-forced continuation (lower is better)", len(per_length))
        _legend(fig, fid[fid.method != "full"], styles)
        plots.append(_save(fig, out / f"{stem}_{slug}_fidelity.png"))
    return plots


def write_report(results: str | Path, out_dir: str | Path | None = None, extra: list | None = None,
                 name: str | None = None) -> Path:
    """Write ``<stem>_report.md`` and plots next to the results (or into ``out_dir``); returns the Markdown path.

    ``extra``: more results files (e.g. kvpress rows from its own environment) shown in the same tables and plots.
    """
    import matplotlib

    matplotlib.use("Agg")
    results = Path(results)
    df = add_ratios(pd.concat([read_results(x) for x in [results, *(extra or [])]], ignore_index=True))
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

    plots = [p for model in sorted(df.model.unique()) for p in model_plots(df, model, out, stem)]
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
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the figure legend sits right of the axes
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

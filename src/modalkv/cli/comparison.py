"""The display of ``modalkv generate``'s comparison: which caches keep the answer, the table, the one-line verdict and
the optional plot (matplotlib, the ``modalkv[plot]`` extra, is imported by the plot only)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from ..bench.report import method_styles
from .common import fmt_bytes


def agreement(runs, full, expected, tok) -> dict:
    """Per run: (leading tokens equal to the full cache's, the full answer's length or None, answer kept or None).
    The answer is kept when it contains ``expected`` if given, else when it equals the full cache's answer."""
    out = {}
    for run in runs:
        same = n = None
        if full is not None:
            n = len(full.tokens)
            same = next((i for i, (a, b) in enumerate(zip(run.tokens, full.tokens)) if a != b),
                        min(len(run.tokens), n))
        if expected is not None:
            kept = expected.strip().lower() in tok.decode(run.tokens, skip_special_tokens=True).lower()
        elif full is not None:
            kept = run.tokens == full.tokens
        else:
            kept = None
        out[run.label] = (same, n, kept)
    return out


def results_table(runs, full, expected, agree, tok):
    """One row per cache: its answer (yellow from where it departs from the full cache's), whether it keeps the
    answer, KV bytes kept and compression, prefill seconds, decode ms/token and its ratio to the full cache's."""
    table = Table(show_header=True, header_style="bold", show_lines=True)
    table.add_column("cache", max_width=22)
    table.add_column("answer", ratio=1)
    if full is not None or expected is not None:
        table.add_column("keeps\nanswer", no_wrap=True)
    table.add_column("KV kept", justify="right", no_wrap=True)
    table.add_column("prefill s", justify="right", no_wrap=True)
    table.add_column("decode\nms/token", justify="right", no_wrap=True)
    for run in runs:
        same, n, kept = agree[run.label]
        answer = Text(tok.decode(run.tokens[:same] if same is not None else run.tokens, skip_special_tokens=True))
        if same is not None and same < len(run.tokens):
            answer.append(tok.decode(run.tokens[same:], skip_special_tokens=True), style="yellow")
        row = [run.label, answer]
        if full is not None or expected is not None:
            verdict = "" if kept is None else ("yes" if kept else "[red]no[/red]")
            tokens = "" if run is full or same is None else f"{same}/{n} tok"
            row.append("—" if run is full and expected is None else "\n".join(x for x in (verdict, tokens) if x))
        ratio = run.memory["compression_ratio"]
        row.append(fmt_bytes(run.memory["kept_bytes"]) + ("" if run is full else f"\n{ratio:.2f}x less" if ratio >= 1
                                                           else f"\n{1 / ratio:.2f}x more"))
        row.append(f"{run.prefill_s:.2f}")
        speed = f"{run.decode_ms:.1f}"
        if full is not None and run is not full:
            speed += f"\n{full.decode_ms / run.decode_ms:.2f}x"
        row.append(speed)
        table.add_row(*row)
    return table


def verdict(runs, full, expected, agree) -> str:
    """One line: which compressed caches keep the answer and which do not."""
    compressed = [run for run in runs if run is not full]
    if full is None and expected is None:
        return "(add --compare-full to see whether compression keeps the full cache's answer)"
    what = f"the answer ({expected!r})" if expected is not None else "the full cache's answer"
    keep = [run.label for run in compressed if agree[run.label][2]]
    lose = [run.label for run in compressed if not agree[run.label][2]]
    if not lose:
        return f"[green]Every compressed cache keeps {what}.[/green]"
    line = f"[bold]Compression does not keep {what} with:[/bold] {', '.join(lose)}."
    if keep:
        line += f" It does with: {', '.join(keep)}."
    return line


def plot_comparison(runs, full, agree, path: Path, model: str, prompt_tokens: int) -> Path:
    """KV bytes kept against decode ms/token, one point per cache: filled where the answer is kept, a cross where
    it is not; the method's colour as in `modalkv report`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    styles = method_styles([run.method for run in runs])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = [run.memory["kept_bytes"] / 2**20 for run in runs]
    ys = [run.decode_ms for run in runs]
    if full is not None:
        ax.axhline(full.decode_ms, color="0.6", ls=":", lw=1, zorder=1)
        ax.axvline(full.memory["kept_bytes"] / 2**20, color="0.6", ls=":", lw=1, zorder=1)
    for run, x, y in zip(runs, xs, ys):
        kept = agree[run.label][2]
        ax.scatter([x], [y], s=90, marker="X" if kept is False else "o", color=styles[run.method][0], zorder=3,
                   edgecolors="k" if run is full else "none")
        ax.annotate(run.label, (x, y), xytext=(7, 4), textcoords="offset points", fontsize=8)
    ax.set(xlabel="KV bytes kept (MiB, metadata counted)", ylabel="decode ms/token (median)",
           xlim=(0, max(xs) * 1.45), ylim=(0, max(y for y in ys if y == y) * 1.25 if any(y == y for y in ys) else 1),
           title=f"{model}, {prompt_tokens}-token prompt: memory and decode time of each cache"
                 + ("\n(dotted: the full cache)" if full is not None else ""))
    ax.title.set_fontsize(10)
    if any(kept is not None for _, _, kept in agree.values()):
        ax.legend(handles=[Line2D([], [], marker="o", ls="none", color="0.3", label="answer kept"),
                           Line2D([], [], marker="X", ls="none", color="0.3", label="answer not kept")],
                  loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

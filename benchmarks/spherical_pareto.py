"""Spherical KV's allocation variants on the Pareto front of accuracy against bytes: needles on SmolLM2 and a VLM task.

    PYTHONPATH=src .venv/bin/python benchmarks/spherical_pareto.py needle --samples 8      # SmolLM2, ~2.2k tokens
    modalkv bench --config benchmarks/sweep_spherical_pareto_vlm.toml                      # the VLM's task (c)
    PYTHONPATH=src .venv/bin/python benchmarks/spherical_pareto.py plot                    # CSV summary + plot
    PYTHONPATH=src .venv/bin/python benchmarks/spherical_pareto.py shares                  # bytes per layer

The needle prompts are those of ``benchmarks/needle.py`` (a 4-digit code at a seeded depth in ~2.2k tokens of
offline Wikipedia summaries, chat template, question last); each prompt is prefilled once and every variant's cache
is built from that prefill (``modalkv.replay``), then decodes greedily (16 tokens). Bytes are the cache's
``kept_bytes / full_bytes`` after decoding (codebooks are one copy per model, reported apart as ``shared_bytes``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [
    "sphericalkv",
    "sphericalkv(allocation=global)",
    "sphericalkv(proxy=paper)",
    "sphericalkv(allocation=global,proxy=paper)",
    "sphericalkv(preset=paper)",
    "sphericalkv(tiers=paper,allocation=global)",
]
# A label of the first run (docs/results/spherical_rdr.md): the preset overrides proxy="rms" because it is the
# default, so these rows repeat sphericalkv(preset=paper) exactly; they are checked to be equal and left out.
DUPLICATE = ("sphericalkv(preset=paper,proxy=rms)", "sphericalkv(preset=paper)")
NEEDLE_CSV = ROOT / "docs/results/spherical_pareto_needle.csv"
VLM_CSV = ROOT / "docs/results/spherical_pareto_vlm.csv"


def run_needle(args) -> None:
    import pandas as pd
    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from needle import chat_ids, continue_greedy

    from modalkv.measure import pin_threads
    from modalkv.methods import make_method, parse_label
    from modalkv.models import load_model
    from modalkv.replay import capture_prefill
    from modalkv.tasks import make_needle, score_contains

    hf_logging.disable_progress_bar()
    pin_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    rows = []
    t0 = time.time()
    for i in range(args.samples):
        sample = make_needle(tok, args.tokens, seed=i)
        ids = chat_ids(tok, sample.prompt)
        n = ids.shape[1]
        cap = capture_prefill(model, ids)
        for label in ["full", "snapkv", *args.variants]:
            for budget in ([1.0] if label == "full" else args.budgets):
                name, params, _ = parse_label(label)
                t = time.time()
                cache = cap.build_cache(model, make_method(name, **params), budget)
                gen = tok.decode(continue_greedy(model, cache, cap.logits[0, -1], n, 16, tok.eos_token_id))
                rep = cache.memory_report()
                rows.append(dict(task="needle-2k", sample=i, method=label, budget=budget, tokens=n,
                                 score=float(score_contains(gen, sample.answer)), output=gen.strip(),
                                 kept=rep["kept_bytes"] / rep["full_bytes"], shared_bytes=rep.get("shared_bytes", 0),
                                 seconds=time.time() - t))
        del cap
        done = pd.DataFrame(rows)
        print(f"[{i + 1}/{args.samples} {time.time() - t0:.0f}s] " +
              ", ".join(f"{m} {g.score.mean():.2f}" for m, g in done.groupby("method")), flush=True)
        done.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


def run_shares(args) -> None:
    """Per layer: the bytes a global allocation gives it against its per-layer share (one needle prompt)."""
    import pandas as pd

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from needle import chat_ids

    from modalkv.measure import pin_threads
    from modalkv.models import load_model
    from modalkv.replay import capture_prefill
    from modalkv.tasks import make_needle

    pin_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    ids = chat_ids(tok, make_needle(tok, args.tokens, seed=0).prompt)
    cap = capture_prefill(model, ids)
    rows = []
    for proxy in ("rms", "paper"):
        for allocation in ("layer", "global"):
            for budget in args.budgets:
                cache = cap.build_cache(model, "sphericalkv", budget, allocation=allocation, proxy=proxy)
                for layer in cache.managed_layers:
                    held = sum(s.bytes()["payload"] + s.bytes()["meta"] for s in layer.heads)
                    dense = layer.seen * sum(s.dense_bytes_per_entry() for s in layer.heads)
                    tiers = torch.cat([s.tiers()[0][s.valid[0, : s.n]] for s in layer.heads])
                    rows.append(dict(proxy=proxy, allocation=allocation, budget=budget, layer=layer.layer_idx,
                                     held_over_dense=held / dense, entries=int(tiers.numel()),
                                     b1=int((tiers == 1).sum()), b2=int((tiers == 2).sum()),
                                     b3=int((tiers == 3).sum())))
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False, float_format="%.4f")
    print(df.groupby(["proxy", "allocation", "budget"]).held_over_dense.agg(["min", "max", "mean"]))
    print(f"wrote {args.out}")


def summary(needle_csv: Path, vlm_csv: Path):
    """Mean score and kept-bytes ratio per task, method and budget (both sources in one table)."""
    import pandas as pd

    parts = []
    if needle_csv.exists():
        parts.append(pd.read_csv(needle_csv)[["task", "method", "budget", "score", "kept"]])
    if vlm_csv.exists():
        v = pd.read_csv(vlm_csv)
        v = v.assign(kept=v.kv_kept_bytes / v.kv_full_bytes)
        parts.append(v[["task", "method", "budget", "score", "kept"]])
    df = pd.concat(parts)
    dup, same = DUPLICATE
    if (df.method == dup).any():
        a = df[df.method == dup].reset_index(drop=True)
        b = df[df.method == same].reset_index(drop=True)
        if len(a) != len(b) or not (a.score.values == b.score.values).all():
            raise ValueError(f"{dup} rows differ from {same}: not a duplicate")
        df = df[df.method != dup]
    out = df.groupby(["task", "method", "budget"]).agg(score=("score", "mean"), kept=("kept", "mean"),
                                                       samples=("score", "count")).reset_index()
    return out


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which (bytes, score) points no other point beats (fewer or equal bytes and a higher score, or equal score and
    fewer bytes)."""
    return [not any((b2 <= b and s2 > s) or (b2 < b and s2 >= s) for b2, s2 in points) for b, s in points]


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary(Path(args.needle_csv), Path(args.vlm_csv))
    table["pareto"] = False
    for task, g in table.groupby("task"):
        front = pareto(list(zip(g.kept, g.score)))
        table.loc[g.index, "pareto"] = front
    table.to_csv(args.out_csv, index=False, float_format="%.4f")
    tasks = list(table.task.unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.6), squeeze=False)
    markers = dict(zip(["full", "snapkv", *VARIANTS], "*sodv^<>P"))
    for ax, task in zip(axes[0], tasks):
        g = table[table.task == task]
        for method, m in g.groupby("method", sort=False):
            m = m.sort_values("kept")
            ax.plot(m.kept, m.score, marker=markers.get(method, "x"), label=method,
                    linestyle="--" if method in ("full", "snapkv") else "-")
        ax.set_xlabel("KV bytes kept / full cache")
        ax.set_ylabel("accuracy")
        n = int(g.samples.max())
        ax.set_title(f"{task} ({n} prompts)")
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.05, 1.05)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Spherical KV: allocation (layer / global) x proxy (rms / paper) x tiers, budgets 0.1 / 0.25 / 0.5")
    fig.tight_layout()
    fig.savefig(args.out_png, dpi=110)
    print(table.to_string())
    print(f"wrote {args.out_csv} and {args.out_png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("needle")
    a.add_argument("--samples", type=int, default=8)
    a.add_argument("--tokens", type=int, default=2200)
    a.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    a.add_argument("--variants", nargs="+", default=VARIANTS)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--out", default=str(NEEDLE_CSV))
    c = sub.add_parser("shares")
    c.add_argument("--tokens", type=int, default=2200)
    c.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", default=str(ROOT / "docs/results/spherical_layer_shares.csv"))
    b = sub.add_parser("plot")
    b.add_argument("--needle-csv", default=str(NEEDLE_CSV))
    b.add_argument("--vlm-csv", default=str(VLM_CSV))
    b.add_argument("--out-csv", default=str(ROOT / "docs/results/spherical_pareto.csv"))
    b.add_argument("--out-png", default=str(ROOT / "docs/results/spherical_pareto.png"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"needle": run_needle, "shares": run_shares, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    main()

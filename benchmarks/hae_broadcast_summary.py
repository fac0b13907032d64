"""Tables of the HAE decode-time broadcast sweep (benchmarks/sweep_seeds3_hae_broadcast.toml): per method and budget
the mean score, KV kept / full and decode time against the full cache of the same prompt, then the paired difference
broadcast minus per-layer per budget (mean, standard error, prompts won / tied / lost). Only prompts whose every cell
finished are used.

    PYTHONPATH=src .venv/bin/python benchmarks/hae_broadcast_summary.py docs/results/bench_seeds3_hae_broadcast.csv
"""

from __future__ import annotations

import sys

import pandas as pd

ON, OFF = "hae(ddes_broadcast=True)", "hae(ddes_broadcast=False)"


def main(path: str) -> None:
    d = pd.read_csv(path)
    cells = d.groupby(["task", "seed"]).size()
    complete = cells[cells == cells.max()].index
    d = d.set_index(["task", "seed"]).loc[complete].reset_index()
    full = d[d.method == "full"].set_index(["task", "seed"])
    d["kept"] = d.kv_kept_bytes / d.kv_full_bytes
    d["decode_vs_full"] = [r.decode_ms / full.loc[(r.task, r.seed), "decode_ms"] for r in d.itertuples()]
    for task, t in d.groupby("task"):
        f = t[t.method == "full"]
        print(f"\n{task}: {len(f)} prompts; full cache score {f.score.mean():.3f}, decode {f.decode_ms.median():.1f} "
              f"ms/token (median), {f.decode_steps.mean():.1f} tokens generated (mean)\n")
        print("| method | budget | score | KV kept / full | decode ms/token (median) | decode / full (median) | tokens |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for (m, b), x in t[t.method != "full"].groupby(["method", "budget"]):
            print(f"| {m} | {b} | {x.score.mean():.3f} | {x.kept.mean():.3f} | {x.decode_ms.median():.1f} | "
                  f"{x.decode_vs_full.median():.2f} | {x.decode_steps.mean():.1f} |")
        diff = (t[t.method == ON].set_index(["seed", "budget"]).score
                - t[t.method == OFF].set_index(["seed", "budget"]).score).dropna()
        print("\n| budget | broadcast − per-layer (mean) | standard error | prompts won / tied / lost |\n|---|---:|---:|---|")
        for b, x in list(diff.groupby(level="budget")) + [("all", diff)]:
            se = x.std(ddof=1) / len(x) ** 0.5
            print(f"| {b} | {x.mean():+.3f} | {se:.3f} | {(x > 0).sum()} / {(x == 0).sum()} / {(x < 0).sum()} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/bench_seeds3_hae_broadcast.csv")

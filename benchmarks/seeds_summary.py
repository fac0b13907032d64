"""Tables of the seed-method result pages from their sweeps: score per task and budget, KV kept vs full, decode and
prefill time vs the full cache of the same prompt.

    PYTHONPATH=src .venv/bin/python benchmarks/seeds_summary.py            # issue 5: seeds_hae_madakv.md
    PYTHONPATH=src .venv/bin/python benchmarks/seeds_summary.py --issue 6  # issue 6: seeds_retentive_spherical.md
    PYTHONPATH=src .venv/bin/python benchmarks/seeds_summary.py --issue 17 # issue 17: seeds_current_defaults.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from modalkv.bench.runner import add_ratios

ORDER = ["full", "hae", "madakv", "snapkv", "adakv", "h2o", "lookm"]
ISSUES = {
    5: (ORDER, ["bench_seeds_vlm.csv", "bench_seeds_text.csv"],
        ["bench_seeds_hae_variants.csv", "bench_seeds_madakv_ablation.csv"]),
    6: (["full", "retentivekv", "retentivekv(state_readout=none)", "sphericalkv", "sphericalkv(tiers=paper)",
         "snapkv", "adakv", "kivi-4", "hae", "madakv"],
        ["bench_seeds2_vlm.csv", "bench_seeds2_text.csv", "bench_seeds2_gemma3.csv"], []),
    17: (["full", "retentivekv", "retentivekv(state_readout=none)", "sphericalkv", "sphericalkv(tiers=paper)",
          "snapkv", "adakv", "kivi-4", "hae", "madakv"],
         ["bench_seeds5_vlm.csv", "bench_seeds5_text.csv"], []),
}


def load(path: Path) -> pd.DataFrame:
    df = add_ratios(pd.read_csv(path))
    group = ["library", "model", "task", "length", "seed"]
    full = df[df.method == "full"].set_index(group)["prefill_s"].rename("full_prefill_s")
    return df.join(full, on=group)


def table(df: pd.DataFrame, value: str, tasks=None, fmt="{:.2f}") -> str:
    d = df if tasks is None else df[df.task.isin(tasks)]
    budgets = sorted(b for b in d.budget.unique() if b < 1.0)
    rows = []
    for m in [m for m in ORDER if m in set(d.method)]:
        dm = d[d.method == m]
        if m == "full" or not (dm.budget < 1.0).any():  # one setting only (full, KIVI): the same in every column
            rows.append([m, *[fmt.format(dm[value].mean())] * len(budgets)])
            continue
        rows.append([m, *[fmt.format(dm[dm.budget == b][value].mean()) for b in budgets]])
    head = "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |\n|---|" + "---|" * len(budgets) + "\n"
    return head + "\n".join("| " + " | ".join(r) + " |" for r in rows)


def speed(df: pd.DataFrame) -> str:
    """Median over prompts of decode and prefill time ratios (full / method), per budget."""
    d = df[df.method != "full"].copy()
    d["prefill_vs_full"] = d.full_prefill_s / d.prefill_s
    g = d.groupby(["method", "budget"]).agg(decode=("speedup_vs_full", "median"), prefill=("prefill_vs_full", "median"))
    budgets = sorted(b for b in d.budget.unique() if b < 1.0)
    out = "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |\n|---|" + "---|" * len(budgets) + "\n"
    for m in [m for m in ORDER if m in set(d.method)]:
        bs = budgets if (m, budgets[0]) in g.index else [1.0] * len(budgets)
        cells = [f"{g.loc[(m, b), 'decode']:.2f}× / {g.loc[(m, b), 'prefill']:.2f}×" for b in bs]
        out += f"| {m} | " + " | ".join(cells) + " |\n"
    full = df[df.method == "full"]
    return out + f"\nfull cache: decode {full.decode_ms.median():.1f} ms/token, prefill {full.prefill_s.median():.2f} s (medians)\n"


def variants(path: Path) -> str:
    """Score and KV kept per method label, task and budget (the HAE variants and the MadaKV ablation)."""
    df = add_ratios(pd.read_csv(path))
    out = ""
    for t in df.task.unique():
        d = df[df.task == t]
        n = d[d.method == "full"].shape[0]
        budgets = sorted(b for b in d.budget.unique() if b < 1.0)
        out += f"#### {t} ({n} prompts): score (KV kept / full)\n\n| method | " + " | ".join(f"{b:g}" for b in budgets)
        out += " |\n|---|" + "---|" * len(budgets) + "\n"
        out += f"| full | {d[d.method == 'full'].score.mean():.2f} |" + " |" * (len(budgets) - 1) + "\n"
        for m in [m for m in d.method.unique() if m != "full"]:
            dm = d[d.method == m]
            cells = [f"{dm[dm.budget == b].score.mean():.2f} ({dm[dm.budget == b].kv_ratio_vs_full.mean():.2f})"
                     for b in budgets]
            out += f"| `{m}` | " + " | ".join(cells) + " |\n"
        out += "\n"
    return out


def main() -> None:
    import argparse

    global ORDER
    ap = argparse.ArgumentParser()
    ap.add_argument("--issue", type=int, default=5, choices=sorted(ISSUES))
    args = ap.parse_args()
    ORDER, sweeps, extra = ISSUES[args.issue]
    root = Path("docs/results")
    for name in extra:
        if (root / name).exists():
            print(f"## {name}\n\n{variants(root / name)}")
    for name in sweeps:
        path = root / name
        if not path.exists():
            print(f"(missing {path})", file=sys.stderr)
            continue
        whole = load(path)
        # a sweep whose lengths hold different method sets (issue 17's 8k half) gets its tables per length
        split = whole.groupby("length").method.apply(frozenset).nunique() > 1
        for L, df in (whole.groupby("length") if split else [(None, whole)]):
            summarise(name if L is None else f"{name}, {L} tokens", df)


def summarise(name: str, df: pd.DataFrame) -> None:
    """Tables of one sweep (or one length of it): scores, fidelity, bytes, states, speed."""
    print(f"## {name}\n")
    tasks = [t for t in df.task.unique() if t != "fidelity"]
    for t in tasks:
        n = df[(df.task == t) & (df.method == "full")].shape[0]
        print(f"### score, {t} ({n} prompts)\n\n{table(df, 'score', [t])}\n")
    if len(tasks) > 1:
        print(f"### score, mean over {', '.join(tasks)}\n\n{table(df, 'score', tasks, '{:.3f}')}\n")
    if "fidelity" in set(df.task):
        print(f"### fidelity: KL(full || method) over 48 teacher-forced tokens\n\n{table(df, 'kl', ['fidelity'], '{:.4f}')}\n")
    print(f"### KV kept / full (bytes, end of generation)\n\n{table(df, 'kv_ratio_vs_full')}\n")
    if "kv_state_bytes" in df and df.kv_state_bytes.fillna(0).any():
        d = df[df.kv_state_bytes.fillna(0) > 0]
        print("### state / shared bytes (MiB; state is inside KV kept, shared is one copy per model)\n")
        for m, dm in d.groupby("method"):
            print(f"- {m}: state {dm.kv_state_bytes.median() / 2**20:.2f} MiB")
        for m, dm in df[df.kv_shared_bytes.fillna(0) > 0].groupby("method"):
            print(f"- {m}: shared {dm.kv_shared_bytes.median() / 2**20:.2f} MiB")
        print()
    print(f"### decode / prefill speed-up vs the full cache of the same prompt (median)\n\n{speed(df)}")
    if "length" in df and df.length.nunique() > 1:
        for L in sorted(df.length.unique()):
            print(f"#### at {L} tokens\n\n{speed(df[df.length == L])}")


if __name__ == "__main__":
    main()

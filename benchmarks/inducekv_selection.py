"""InduceKV's bank selection compared at equal bytes: bilevel (hypergradient through the calibration) vs greedy vs
random, on the Wikipedia fact stream (SmolLM2-135M), several seeds and two task orders, evaluated after the last
task on held-out paraphrased questions (q_test and q_para, never seen in training or calibration).

    PYTHONPATH=src .venv/bin/python benchmarks/inducekv_selection.py --out docs/results/inducekv_selection.csv

One CSV row per (seed, order, selection, task): answer accuracy on the held-out questions, how often the top
retrieved entry is the question's own fact (``own_entry``) and from its own task (``own_task``), the bank's bytes
and entries of the task, and the learning time. Every selection learns the same examples under the same budget.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from modalkv.continual import InduceKV
from modalkv.continual.frozen import embed
from modalkv.models import load_model
from modalkv.tasks.continual import fact_examples, fact_queries, fact_tasks, is_correct

NAMES = ("cities", "scientists", "artists", "leaders")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--orders", nargs="+", default=["forward", "reverse"])
    ap.add_argument("--selections", nargs="+", default=["greedy", "bilevel", "random"])  # or frozen
    ap.add_argument("--per-task", type=int, default=6)
    ap.add_argument("--budget-entries", type=int, default=6)
    ap.add_argument("--ell", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--bilevel-steps", type=int, default=5)
    ap.add_argument("--probes", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("docs/results/inducekv_selection.csv"))
    ap.add_argument("--summary", action="store_true", help="only print the summary tables of an existing --out CSV")
    args = ap.parse_args()
    if args.summary:
        print(summary(pd.read_csv(args.out)))
        return
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    rows = []
    for seed in args.seeds:
        tasks = fact_tasks(args.per_task, seed, NAMES)
        for order in args.orders:
            stream = tasks if order == "forward" else tasks[::-1]
            examples = [fact_examples(tok, t, i) for i, t in enumerate(stream)]
            queries = [fact_queries(tok, t, "held_out") for t in stream]
            kappas = [[embed(model, ex.prefix, ex.key_span) for ex in exs] for exs in examples]  # each fact's key
            for selection in args.selections:
                kw = dict(ell=args.ell, top_k=args.top_k, seed=seed, bilevel_steps=args.bilevel_steps,
                          probes=args.probes)
                t0 = time.perf_counter()
                if selection == "frozen":  # the reference: the model without memories (an empty bank)
                    m = InduceKV(budget_bytes=None, selection="all", **kw)
                    m._bank(model)
                else:
                    m = InduceKV(budget_bytes=InduceKV.budget_for(model, args.budget_entries, **kw),
                                 selection=selection, **kw)
                    for i, ex in enumerate(examples):
                        m.add_task(model, i, ex)
                learn_s = time.perf_counter() - t0
                keys = m.bank.entries.keys
                for j, (task, qs) in enumerate(zip(stream, queries)):
                    ok = own_entry = own_task = 0
                    for n, q in enumerate(qs):
                        fact = task.facts[n // 2]  # two held-out questions per fact
                        toks, info = m.generate(model, q.ids, args.max_new_tokens, span=q.span)
                        ok += is_correct(tok.decode(toks, skip_special_tokens=True), fact.answer)
                        if info["entries"]:
                            top = info["entries"][0]
                            own_entry += bool((keys[top] - kappas[j][n // 2]).abs().max() < 1e-5)
                            own_task += info["tasks"][0] == j
                    rows.append({"seed": seed, "order": order, "selection": selection, "task": task.name,
                                 "task_stage": j, "accuracy": ok / len(qs), "own_entry": own_entry / len(qs),
                                 "own_task": own_task / len(qs), "entries_of_task": m.bank.tasks().get(j, 0),
                                 "bank_bytes": m.bank.nbytes, "learn_s": round(learn_s, 1), "questions": len(qs)})
                last = [r for r in rows if (r["seed"], r["order"], r["selection"]) == (seed, order, selection)]
                print(f"seed {seed} {order:7s} {selection:8s} acc {sum(r['accuracy'] for r in last) / len(last):.3f} "
                      f"own entry {sum(r['own_entry'] for r in last) / len(last):.3f} "
                      f"entries {[r['entries_of_task'] for r in last]} learn {learn_s:.0f}s", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_csv(args.out, index=False)


def summary(df: pd.DataFrame) -> str:
    """Markdown tables: per selection, the mean over tasks of each (seed, order) run, then mean over runs and wins."""
    runs = df.groupby(["selection", "seed", "order"])[["accuracy", "own_entry", "own_task"]].mean().reset_index()
    lines = ["| selection | held-out accuracy (mean of runs) | per run (seed/order) | own fact's entry first | "
             "own task's entry first | bank bytes |", "|---|---:|---|---:|---:|---:|"]
    for sel, g in runs.groupby("selection", sort=False):
        per = " / ".join(f"{a:.3f}" for a in g.sort_values(["seed", "order"]).accuracy)
        nbytes = df[df.selection == sel].bank_bytes.iloc[0]
        lines.append(f"| {sel} | {g.accuracy.mean():.3f} | {per} | {g.own_entry.mean():.3f} | "
                     f"{g.own_task.mean():.3f} | {nbytes / 2**20:.2f} MiB |")
    wide = runs.pivot_table(index=["seed", "order"], columns="selection", values="accuracy")
    lines += ["", f"Runs: {len(wide)} (seed x order). Pairwise, runs where the row beats / ties / loses to the "
              "column on held-out accuracy:", "", "| | " + " | ".join(wide.columns) + " |",
              "|---|" + "---|" * len(wide.columns)]
    for a in wide.columns:
        cells = []
        for b in wide.columns:
            d = wide[a] - wide[b]
            cells.append("" if a == b else f"{int((d > 1e-9).sum())} / {int((d.abs() <= 1e-9).sum())} / "
                                            f"{int((d < -1e-9).sum())}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Added inference latency of InduceKV's memories on SmolLM2-135M, against the frozen model in the same run.

For each number of retrieved entries (top_k) it times, per query and for the same greedy generation: the retrieval
embedding (one extra forward of the query), the retrieval and placement (re-rotating M = top_k * ell memory tokens
into a cache), the prompt prefill over the memory, and the decode steps. Medians over queries x repeats.

    .venv/bin/python benchmarks/inducekv_latency.py --out docs/results/inducekv_latency.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from modalkv.continual import InduceKV
from modalkv.continual.frozen import embed, forward
from modalkv.measure import pin_threads
from modalkv.models import load_model
from modalkv.tasks.continual import fact_examples, fact_queries, fact_tasks


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def decode(model, ids, cache, steps):
    out, ms_prefill = timed(lambda: forward(model, ids[None], cache))
    nxt = out.logits[0, -1].argmax()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = forward(model, nxt.view(1, 1), cache)
        nxt = out.logits[0, -1].argmax()
    return ms_prefill, (time.perf_counter() - t0) * 1e3 / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--ell", type=int, default=64)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/results/inducekv_latency.md"))
    args = ap.parse_args()
    pin_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    task = fact_tasks(per_task=32)[0]
    from transformers import DynamicCache

    kv = InduceKV(budget_bytes=None, selection="all", ell=args.ell)
    kv.add_task(model, 0, fact_examples(tok, task, 0))
    queries = fact_queries(tok, task)[: args.queries]
    ks = [0, *args.top_k]
    parts = {k: {"embed": [], "place": [], "prefill": [], "decode": []} for k in ks}
    for _ in range(args.repeats):  # every top_k measured on each query in turn: machine noise spreads evenly
        for q in queries:
            for k in ks:
                p = parts[k]
                if k:
                    z, ms = timed(lambda: embed(model, q.ids, q.span))
                    p["embed"].append(ms)
                    (cache, _), ms = timed(lambda: kv.bank.memory_cache(model, kv.bank.retrieve(z, k)[0]))
                    p["place"].append(ms)
                else:
                    cache = DynamicCache()
                    p["embed"].append(0.0)
                    p["place"].append(0.0)
                pre, dec = decode(model, q.ids, cache, args.steps)
                p["prefill"].append(pre)
                p["decode"].append(dec)
    rows = {k: {name: statistics.median(v) for name, v in parts[k].items()} | {"memory_tokens": k * args.ell}
            for k in ks}
    base = rows[0]
    first = base["prefill"]
    lines = [f"InduceKV added latency, SmolLM2-135M, {args.threads} threads, ell={args.ell}, "
             f"{args.queries} queries x {args.repeats} repeats (~{queries[0].ids.numel()}-token prompts), medians; "
             "ratios against the frozen model (top_k 0) in the same run.", "",
             "| top_k | memory tokens | embed ms | place ms | prefill ms | time to first token vs frozen | "
             "decode ms/token | decode vs frozen |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in rows.items():
        ttft = r["embed"] + r["place"] + r["prefill"]
        lines.append(f"| {k} | {r['memory_tokens']} | {r['embed']:.1f} | {r['place']:.1f} | {r['prefill']:.1f} | "
                     f"{ttft / first:.2f}x | {r['decode']:.1f} | {r['decode'] / base['decode']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

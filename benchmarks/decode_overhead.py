"""Decode ms/token of methods that evict while decoding (H2O, StreamingLLM) against the full cache and SnapKV.

One captured prefill of a random-token prompt on SmolLM2-135M, then ``--steps`` greedy-free decode steps per method
(the same fed token each step), median step time, repeated ``--repeats`` times in alternation (median of medians).
Run from a checkout (``PYTHONPATH=src``) to compare two versions of modalkv on the same machine:

    PYTHONPATH=src .venv/bin/python benchmarks/decode_overhead.py --length 2048 --budget 0.25
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["full", "snapkv", "streamingllm", "h2o"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from modalkv import cache_kwargs, load_model
    from modalkv.replay import capture_prefill

    model, _ = load_model("smollm2-135m")
    ids = torch.randint(100, 20000, (1, args.length), generator=torch.Generator().manual_seed(0))
    cap = capture_prefill(model, ids)
    runs: dict[str, list[float]] = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for method in args.methods:
            cache = cap.build_cache(model, method, 1.0 if method == "full" else args.budget)
            kw = cache_kwargs(model, cache)
            steps = []
            with torch.no_grad():
                for i in range(args.steps):
                    t0 = time.perf_counter()
                    model(input_ids=torch.tensor([[5]]), position_ids=torch.tensor([[args.length + i]]), **kw)
                    steps.append((time.perf_counter() - t0) * 1e3)
            runs[method].append(statistics.median(steps[1:]))
    full = statistics.median(runs["full"]) if "full" in runs else None
    print(f"| method | decode ms/token (L={args.length}, budget {args.budget:g}, {args.threads} thread) | vs full |")
    print("|---|---:|---:|")
    for method, values in runs.items():
        ms = statistics.median(values)
        print(f"| {method} | {ms:.1f} | {full / ms:.2f}x |" if full else f"| {method} | {ms:.1f} | |")


if __name__ == "__main__":
    main()

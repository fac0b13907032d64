"""KV memory, peak RSS and decode speed of each method against the full cache, beside the bandwidth floor.

Every (method, prompt length, batch) runs in its own subprocess so that peak RSS is that configuration's.
Within one run every configuration uses the same prompt, thread count and machine, and the ratios are taken
against transformers' own DynamicCache and modalkv's ``full`` measured in the same run.

    python benchmarks/memory_speed.py                       # the published sweep (about 25 minutes)
    python benchmarks/memory_speed.py --lengths 2048 --batches 1 --methods dynamic full snapkv  # quick
    python benchmarks/memory_speed.py --lengths 8192 --batches 4 8 --threads 1 --budget 0.2 \
        --methods full snapkv kivi-4 sphericalkv                     # the compressed formats, KV-bound
    python benchmarks/memory_speed.py --kv-bound --lengths 8192 --batches 4 8 --threads 1 2 --budget 0.2 \
        --new-tokens 12 --repeats 2 --out docs/results/memory_speed_kv_bound.md
                      # the KV-bound sweep in one process: one captured prefill, every method at every batch size
                      # and thread count, ratios to modalkv's full cache

Decode ms/token: a hand-written greedy loop, one forward per token; the median step time over ``--new-tokens``
steps (the first token comes from prefill), repeated ``--repeats`` times on the same cache, median of the
repeats. Batch B > 1: the prompt is prefilled once and the cache is replicated B times
(``batch_repeat_interleave``), so every row holds a full-length context without B long prefills.

Bandwidth floor: (weight bytes + KV bytes stored) / bandwidth, the bandwidth measured on this machine by
summing a 1 GiB float32 tensor with the same thread count (median of 7). A decode step reads every weight and
every stored K/V entry once, so it cannot be faster than that.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure_bandwidth(threads: int, gib: float = 1.0, repeats: int = 7) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.empty(int(gib * 2**30 // 4), dtype=torch.float32).uniform_()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


def build_prompt(tok, length: int):
    """Exactly ``length`` tokens of real text (Wikipedia summaries, deterministic order) ending in a question."""
    import torch

    from modalkv.data import wiki_summaries

    texts = wiki_summaries()
    question = tok("\n\nQuestion: summarise the text above in one sentence.\nAnswer:", add_special_tokens=False).input_ids
    ids: list[int] = []
    for title in sorted(texts):
        ids += tok(texts[title] + "\n\n", add_special_tokens=False).input_ids
        if len(ids) >= length:
            break
    ids = (ids[: length - len(question)] + question)[-length:]
    return torch.tensor([ids])


def worker(args) -> dict:
    import resource

    import psutil
    import torch
    from transformers import DynamicCache
    from transformers.utils import logging as hf_logging

    from modalkv import KVCache
    from modalkv.measure import cache_bytes, greedy_generate
    from modalkv.models import load_model, model_info

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.prefill_threads)
    model, tok = load_model(args.model)
    info = model_info(model)
    ids = build_prompt(tok, args.length)
    from modalkv.storage import storage_names

    if args.method == "dynamic":
        cache = DynamicCache(config=model.config)
    elif args.method in storage_names():  # quantized storage of every token (KIVI): the full cache, quantized
        cache = KVCache(model, "full", quantize=args.method)
    else:
        cache = KVCache(model, args.method, args.budget if args.method != "full" else 1.0)
    rss_loaded = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    res = greedy_generate(model, ids, None, cache, 1)
    prefill_s = time.perf_counter() - t0
    if args.batch > 1:
        cache.batch_repeat_interleave(args.batch)
    gc.collect()
    rss_after_prefill = psutil.Process().memory_info().rss
    mem = cache_bytes(cache)
    # decode: hand-written greedy loop on the prefilled cache
    first = torch.tensor([[res.tokens[0][0] if res.tokens[0] else 0]] * args.batch)
    with torch.no_grad():
        medians = step_medians(model, cache, first, args.length, args.threads, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stored = cache_bytes(cache)
    return {
        "method": args.method, "budget": 1.0 if args.method in ("dynamic", "full", *storage_names()) else args.budget,
        "length": args.length, "batch": args.batch, "threads": args.threads,
        "prefill_s": prefill_s, "decode_ms": statistics.median(medians), "decode_ms_repeats": medians,
        "kv_full_bytes": mem["full_bytes"], "kv_kept_bytes": mem["kept_bytes"],
        "kv_payload_bytes": mem["payload_bytes"], "kv_allocated_bytes": mem["allocated_bytes"],
        "kv_read_bytes_at_end": stored["payload_bytes"],
        "weight_bytes": info["weight_bytes"], "rss_loaded": rss_loaded, "rss_after_prefill": rss_after_prefill,
        "peak_rss": peak,
    }


def run_sweep(args) -> None:
    import pandas as pd
    import torch

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bw = measure_bandwidth(args.threads)
    print(f"bandwidth ({args.threads} thread(s), 1 GiB sum): {bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(max(args.threads, args.prefill_threads)))
    t_start = time.time()
    # a 32-token context with the plain cache: the step time of the weights alone (and per-step overhead), the
    # part of every decode step that no KV method can change
    configs = [(32, B, "dynamic") for B in args.batches]
    configs += [(L, B, m) for L in args.lengths for B in args.batches for m in args.methods]
    for i, (L, B, m) in enumerate(configs):
        cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--method", m, "--length", str(L),
               "--batch", str(B), "--budget", str(args.budget), "--threads", str(args.threads),
               "--prefill-threads", str(args.prefill_threads), "--repeats", str(args.repeats),
               "--new-tokens", str(args.new_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"worker failed: {m} L={L} B={B}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["floor_ms"] = (row["weight_bytes"] + row["kv_read_bytes_at_end"]) / bw * 1e3
        rows.append(row)
        print(f"[{i + 1}/{len(configs)} {time.time() - t_start:.0f}s] {m:12s} L={L:5d} B={B} "
              f"prefill {row['prefill_s']:.1f}s decode {row['decode_ms']:.1f} ms (floor {row['floor_ms']:.1f}) "
              f"KV {row['kv_kept_bytes'] / 2**20:.1f}/{row['kv_full_bytes'] / 2**20:.1f} MiB "
              f"peak RSS {row['peak_rss'] / 2**30:.2f} GiB", flush=True)
    df = pd.DataFrame(rows)
    for ref in ("dynamic", "full"):
        base = df[df.method == ref].set_index(["length", "batch"])["decode_ms"]
        df[f"speedup_vs_{ref}"] = [base.get((L, B), float("nan")) / d for L, B, d in
                                   zip(df.length, df.batch, df.decode_ms)]
    df["floor_ratio"] = df.decode_ms / df.floor_ms
    df["bandwidth_GBps"] = bw / 1e9
    df.to_csv(out.with_suffix(".csv"), index=False)
    write_markdown(df, out, bw, args, torch.__version__)
    print(f"wrote {out} and {out.with_suffix('.csv')}; plot {plot_kv_bound(out.with_suffix('.csv'))}")


def write_markdown(df, out: Path, bw: float, args, torch_version: str) -> None:
    import transformers

    mib = 2**20
    lines = [
        "# Memory and decode speed on SmolLM2-135M (CPU)", "",
        f"Generated by `python benchmarks/memory_speed.py {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d')}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch_version}, transformers {transformers.__version__}, fp32. Decode pinned to {args.threads} "
        f"thread(s); prefill used {args.prefill_threads}. Budget {args.budget} for the compressing methods. "
        f"Decode ms/token: median step over {args.new_tokens} steps, median of {args.repeats} repeats, "
        "each configuration in its own process.", "",
        f"Measured bandwidth (sum of a 1 GiB fp32 tensor, {args.threads} thread(s), median of 7): "
        f"**{bw / 1e9:.1f} GB/s**. Floor = (weight bytes + stored KV bytes) / bandwidth.", "",
        "`dynamic` is transformers' own DynamicCache with its SDPA attention; `full` is modalkv's layout keeping "
        "everything; ratios (x) are decode speed-ups against them measured in the same run.", "",
        "| length | batch | method | KV kept MiB | KV full MiB | peak RSS GiB | RSS after prefill GiB | prefill s | "
        "decode ms/token | vs dynamic | vs full | floor ms | time / floor |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in df.itertuples():
        lines.append(
            f"| {r.length} | {r.batch} | {r.method} | {r.kv_kept_bytes / mib:.1f} | {r.kv_full_bytes / mib:.1f} | "
            f"{r.peak_rss / 2**30:.2f} | {r.rss_after_prefill / 2**30:.2f} | {r.prefill_s:.1f} | "
            f"{r.decode_ms:.1f} | {r.speedup_vs_dynamic:.2f}x | {r.speedup_vs_full:.2f}x | {r.floor_ms:.1f} | "
            f"{r.floor_ratio:.2f} |"
        )
    out.write_text("\n".join(lines) + "\n")


# the KV-bound sweep (--kv-bound): the methods the decode/storage work targets, at one budget
KV_BOUND_METHODS = ["full", "snapkv", "adakv", "madakv", "hae", "retentivekv", "sphericalkv", "kivi-4"]


def kv_bound(args) -> None:
    """One prompt forward (captured), then per method: the compressed cache, replicated to each batch size, decoded
    at each thread count. Prints a markdown table with every step time as a ratio to modalkv's full cache at the same
    batch size and thread count, and writes it (with a CSV) to ``--out``."""
    import pandas as pd
    import torch

    from modalkv.measure import cache_bytes
    from modalkv.models import load_model
    from modalkv.replay import capture_prefill
    from modalkv.storage import storage_names

    torch.set_num_threads(args.prefill_threads)
    model, tok = load_model(args.model)
    length = args.lengths[0]
    ids = build_prompt(tok, length)
    t0 = time.perf_counter()
    captured = capture_prefill(model, ids)
    print(f"prefill of {length} tokens captured in {time.perf_counter() - t0:.0f}s", flush=True)
    bandwidth = {t: measure_bandwidth(t) for t in args.threads}
    first = captured.logits[:, -1:].argmax(-1)
    methods = args.methods if args.methods != p_default_methods() else KV_BOUND_METHODS
    results = []
    with torch.no_grad():
        # the same model's step with a 32-token context (the weights' share of a step): the cache part of a step is
        # its time minus this one
        short = capture_prefill(model, ids[:, :32])
        base = {}
        for B in sorted(args.batches):
            cache = captured_rows(short, B).build_cache(model, "full", 1.0)
            for T in args.threads:
                base[B, T] = step_ms(model, cache, first.expand(B, 1), 32, T, args)
        for m in methods:
            for B in sorted(args.batches):
                # every row the same prompt; the cache is built at batch B from the captured rows (each method's
                # compression of a row costs what it would in a real batch)
                torch.set_num_threads(args.prefill_threads)
                t0 = time.perf_counter()
                rows = captured_rows(captured, B)
                if m in storage_names():
                    cache = rows.build_cache(model, "full", 1.0, quantize=m)
                else:
                    kw = {"mode": "kv_only"} if m == "hae" else {}
                    cache = rows.build_cache(model, m, 1.0 if m == "full" else args.budget, **kw)
                build_s = time.perf_counter() - t0
                pos = length
                kept = cache_bytes(cache)["kept_bytes"]
                for T in args.threads:
                    ms = step_ms(model, cache, first.expand(B, 1), pos, T, args)
                    pos += args.repeats * args.new_tokens
                    results.append(dict(method=m, budget=1.0 if m in ("full", *storage_names()) else args.budget,
                                     length=length, batch=B, threads=T, decode_ms=ms, kv_kept_bytes=kept,
                                     build_s=build_s, floor_ms=kept / bandwidth[T] * 1e3,
                                     base_ms_32_tokens=base[B, T], cache_ms=ms - base[B, T],
                                     cache_vs_floor=(ms - base[B, T]) / (kept / bandwidth[T] * 1e3)))
                    print(f"{m:12s} B={B} threads={T}: {ms:.1f} ms/token (KV {kept / 2**20:.0f} MiB)", flush=True)
                del cache, rows
    df = pd.DataFrame(results)
    full = df[df.method == "full"].set_index(["batch", "threads"])["decode_ms"]
    df["vs_full"] = [full.get((B, T), float("nan")) / ms for B, T, ms in zip(df.batch, df.threads, df.decode_ms)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    lines = [f"KV-bound decode on {args.model}: {length}-token prompt, budget {args.budget}, "
             f"median of {args.repeats} repeats of {args.new_tokens} steps; `python benchmarks/memory_speed.py "
             f"{' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}. KV floor = kept bytes / bandwidth "
             f"({', '.join(f'{t} thread(s) {bw / 1e9:.1f} GB/s' for t, bw in bandwidth.items())}).", "",
             "| method | batch | threads | KV MiB | ms/token | vs full | cache part ms | KV floor ms | part / floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in df.sort_values(["batch", "threads"], kind="stable").itertuples():
        lines.append(f"| {r.method} | {r.batch} | {r.threads} | {r.kv_kept_bytes / 2**20:.0f} | {r.decode_ms:.1f} | "
                     f"{r.vs_full:.2f}x | {r.cache_ms:.1f} | {r.floor_ms:.1f} | {r.cache_vs_floor:.1f} |")
    lines += ["", "Cache part = step minus the same model's step with a 32-token context at the same batch size and "
              "thread count (" + ", ".join(f"B={B} T={T}: {v:.1f} ms" for (B, T), v in base.items()) + ")."]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out} and {out.with_suffix('.csv')}; plot {plot_kv_bound(out.with_suffix('.csv'))}")


def plot_kv_bound(csv_path: Path) -> Path:
    """ms/token against the KV bytes each cache holds, one panel per (batch, threads), with the floor line: the same
    model's 32-token step plus the bytes read at the measured bandwidth. Written beside the CSV as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv_path)
    panels = sorted({(int(b), int(t)) for b, t in zip(df.batch, df.threads)})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (B, T) in zip(axes[0], panels):
        rows = df[(df.batch == B) & (df.threads == T)]
        mib = rows.kv_kept_bytes / 2**20
        ax.scatter(mib, rows.decode_ms, color="tab:blue")
        for m, x, y in zip(rows.method, mib, rows.decode_ms):
            ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if "base_ms_32_tokens" in rows:
            per_mib = (rows.floor_ms / mib).median()  # ms per MiB read at the measured bandwidth
            xs = pd.Series([0.0, float(mib.max()) * 1.05])
            base = float(rows.base_ms_32_tokens.median())
            ax.plot(xs, base + xs * per_mib, color="gray", linestyle="--", label="floor: 32-token step + KV bytes / bandwidth")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"batch {B}, {T} thread(s)", fontsize=9)
        ax.set_xlabel("KV bytes held (MiB)")
        ax.set_ylabel("decode ms/token")
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    out = Path(csv_path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def step_ms(model, cache, first, pos: int, threads: int, args) -> float:
    """Median decode step time (ms) of ``cache`` at ``threads`` threads: the median of :func:`step_medians`."""
    return statistics.median(step_medians(model, cache, first, pos, threads, args))


def step_medians(model, cache, first, pos: int, threads: int, args) -> list[float]:
    """Decode step times (ms) of ``cache`` at ``threads`` threads: ``--repeats`` runs of ``--new-tokens`` greedy
    steps from ``first`` at position ``pos``, each run's median step (first step excluded)."""
    import torch

    from modalkv.cache import cache_kwargs

    torch.set_num_threads(threads)
    B = first.shape[0]
    kw = cache_kwargs(model, cache)
    nxt, medians = first, []
    for _ in range(args.repeats):
        steps = []
        for _ in range(args.new_tokens):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, position_ids=torch.full((B, 1), pos), **kw)
            nxt = out.logits[:, -1:].argmax(-1)
            steps.append((time.perf_counter() - t0) * 1e3)
            pos += 1
        medians.append(statistics.median(steps[1:]))
    return medians


def captured_rows(captured, batch: int):
    """The captured prefill of one prompt as ``batch`` identical rows (views, no copies)."""
    import copy

    if batch == 1:
        return captured
    out = copy.copy(captured)
    out.layers = {i: (q.expand(batch, *q.shape[1:]), k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]),
                      real.expand(batch, -1), scaling) for i, (q, k, v, real, scaling) in captured.layers.items()}
    out.logits = captured.logits.expand(batch, *captured.logits.shape[1:])
    if captured.modality is not None:
        out.modality = captured.modality.expand(batch, -1)
    return out


def p_default_methods() -> list[str]:
    return ["dynamic", "full", "snapkv", "adakv", "streamingllm", "h2o"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=p_default_methods())
    p.add_argument("--kv-bound", action="store_true",
                   help="the KV-bound sweep in one process: one captured prefill, then every method of --methods "
                        f"(default {' '.join(KV_BOUND_METHODS)}) at every --batches and --threads")
    p.add_argument("--method", default="full")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="decode threads (pinned); --kv-bound: a list")
    p.add_argument("--prefill-threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--out", default=str(ROOT / "docs/results/memory_speed.md"))
    p.add_argument("--plot-from", help="only draw the --kv-bound plot from this CSV")
    args = p.parse_args()
    if args.plot_from:
        print(plot_kv_bound(Path(args.plot_from)))
        return
    if args.kv_bound:
        kv_bound(args)
        return
    if len(args.threads) != 1:
        p.error("--threads takes one value except with --kv-bound")
    args.threads = args.threads[0]
    if args.worker:
        print(json.dumps(worker(args)))
    else:
        run_sweep(args)


if __name__ == "__main__":
    main()

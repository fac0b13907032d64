"""Where a decode step's time goes, per method, against the full cache on the same prompt (issue 6's profile).

One prompt is prefilled once (modalkv.replay); each method's cache is built from it and decoded for ``--steps``
tokens under cProfile (after warm-up steps). The step time is split into: the model's weight matmuls (``linear``),
modalkv's attention over the stored entries (excluding the parts below), the method's per-step bookkeeping
(``decode``: scores, evictions, state updates, refreshes), RetentiveKV's state readout, and Spherical KV's code
handling (unpacking codes, radii, lookup tables). The bytes-read bound is also printed: a memory-bound step reads the
weights plus the stored KV, so the best possible speed-up over the full cache is (W + KV_full) / (W + KV_kept).

    python benchmarks/profile_decode.py --model smollm2-135m --length 8192 --budget 0.2
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

GROUPS = {
    "linear": ("{built-in method torch._C._nn.linear}",),
    "method decode": ("decode", "_decode_one", "_refresh", "encode", "_absorb", "_absorb_decode"),
    "state readout": ("readout", "_readout_first_order"),
    "codes (LUT, unpack)": ("section_logits", "unpack_codes", "_radii", "section_keys"),
}


def profile(model, cache, first, start, steps, warm=3):
    from modalkv import cache_kwargs

    nxt = first.argmax(-1).view(1, 1)
    kw = cache_kwargs(model, cache)

    def run(k, pos0):
        nonlocal nxt
        times = []
        for i in range(k):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, position_ids=torch.tensor([[pos0 + i]]), **kw)
            nxt = out.logits[:, -1].argmax(-1).view(1, 1)
            times.append(time.perf_counter() - t0)
        return times

    with torch.no_grad():
        run(warm, start)
        times = run(steps, start + warm)
        prof = cProfile.Profile()
        prof.enable()
        run(steps, start + warm + steps)
        prof.disable()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values() if v[2] > 0) or 1.0
    wall = sum(v[3] for k, v in stats.stats.items() if k[2] == "run") or 1.0
    parts = {}
    for group, names in GROUPS.items():
        if group == "linear":
            parts[group] = sum(v[2] for k, v in stats.stats.items() if f"{{{k[2]}}}" in names or k[2] in names
                               or str(k[2]) == "<built-in method torch._C._nn.linear>")
        else:
            parts[group] = max((v[3] for k, v in stats.stats.items() if k[2] in names), default=0.0)
    attn = max((v[3] for k, v in stats.stats.items() if k[2] == "attend_stored"), default=0.0)
    parts["attention (rest)"] = max(0.0, attn - parts["method decode"] - parts["state readout"]
                                    - parts["codes (LUT, unpack)"])
    del total
    return statistics.median(times) * 1e3, {k: v / wall for k, v in parts.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["full", "snapkv", "retentivekv", "retentivekv(state_readout=none)",
                                                       "sphericalkv", "sphericalkv(reference=True)"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    from modalkv.methods import parse_label
    from modalkv.models import load_model
    from modalkv.replay import capture_prefill
    from modalkv.tasks import make_needle

    model, tok = load_model(args.model)
    sample = make_needle(tok, args.length, seed=0)
    ids = tok(sample.prompt, return_tensors="pt").input_ids
    n = ids.shape[1]
    cap = capture_prefill(model, ids)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{args.model}, {n} prompt tokens, budget {args.budget}, weights {weights / 2**20:.0f} MiB, "
          f"{args.steps} steps after 3 warm-up steps\n")
    print("| method | ms/token | vs full | KV kept MiB | bytes-read bound | linear | attention | method decode | "
          "state readout | codes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = None
    for label in args.methods:
        name, params, _ = parse_label(label)
        cache = cap.build_cache(model, name, 1.0 if name == "full" else args.budget, **params)
        rep = cache.memory_report()
        ms, parts = profile(model, cache, cap.logits[0, -1], n, args.steps)
        if base is None:
            base = (ms, rep["kept_bytes"])
        bound = (weights + base[1]) / (weights + rep["kept_bytes"])
        print(f"| {label} | {ms:.1f} | {base[0] / ms:.2f}x | {rep['kept_bytes'] / 2**20:.1f} | {bound:.2f}x | "
              f"{parts['linear']:.0%} | {parts['attention (rest)']:.0%} | {parts['method decode']:.0%} | "
              f"{parts['state readout']:.0%} | {parts['codes (LUT, unpack)']:.0%} |")


if __name__ == "__main__":
    main()

"""Decode cost at a real model's attention shape: modalkv's caches against transformers' DynamicCache.

    python benchmarks/decode_core.py                       # Llama-3-8B attention shape, 2 layers, 8k context
    python benchmarks/decode_core.py --kv-heads 2 --context 2048 --steps 16

A random-weight Llama with Llama-3-8B's layer shape (hidden 4096, 32 query heads, 8 KV heads, head_dim 128, MLP
14336; a 1,024-token vocabulary so the embedding does not dominate) and ``--layers`` layers. Per configuration:
prefill ``--context`` tokens, then ``--steps`` greedy decode steps; the median step time (first step excluded).
Every configuration runs in the same process, interleaved over ``--repeats`` rounds, and the report gives each
median as a ratio to DynamicCache + SDPA and to modalkv's full cache measured in the same run. The cache-dependent
part of a step is the step time minus the same model's step at a 32-token context; its floor is the bytes the cache
holds over the measured read bandwidth. ``packed`` (default) is the batched step over all KV heads of a layer;
``per-head`` forces the head-by-head path. ``--profile`` counts aten ops per decode step and layer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(args, kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=kv_heads, head_dim=128,
                      max_position_embeddings=max(8192, args.context + 64))
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    return model


def read_bandwidth() -> float:
    """Bytes per second of a large contiguous read (a sum over 512 MiB), median of 5."""
    x = torch.ones(128 * 2**20)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


@torch.no_grad()
def decode_ms(model, ids, make_cache, steps: int, per_head: bool = False) -> tuple[float, object]:
    from modalkv import cache_kwargs

    cache = make_cache()
    out = model(input_ids=ids, **cache_kwargs(model, cache))
    if per_head:
        for layer in getattr(cache, "managed_layers", []):
            layer.packed = False
            for store in layer.heads or []:  # compressed payloads: the pure torch reads (dequantize / LUT gathers)
                store.payload.fused = False
    nxt = out.logits[:, -1:].argmax(-1)
    pos = ids.shape[1]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, position_ids=torch.full((ids.shape[0], 1), pos), **cache_kwargs(model, cache))
        times.append(time.perf_counter() - t0)
        nxt = out.logits[:, -1:].argmax(-1)
        pos += 1
    return statistics.median(times[1:]) * 1e3, cache


def cache_bytes(cache) -> int:
    if hasattr(cache, "memory_report"):
        return cache.memory_report()["kept_bytes"]
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


@torch.no_grad()
def aten_ops_per_layer_step(model, ids, make_cache, layers: int, per_head: bool = False, steps: int = 1,
                            top: dict | None = None) -> float:
    """aten ops per decode step and layer (torch.profiler counts, load-independent), averaged over ``steps`` steps
    after one warm-up step; ``top`` (a dict) receives the count of each aten op over those steps."""
    from torch.profiler import ProfilerActivity, profile

    from modalkv import cache_kwargs

    cache = make_cache()
    out = model(input_ids=ids, **cache_kwargs(model, cache))
    if per_head:
        for layer in getattr(cache, "managed_layers", []):
            layer.packed = False
    nxt = out.logits[:, -1:].argmax(-1)
    pos = ids.shape[1]
    model(input_ids=nxt, position_ids=torch.full((ids.shape[0], 1), pos), **cache_kwargs(model, cache))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for t in range(steps):
            model(input_ids=nxt, position_ids=torch.full((ids.shape[0], 1), pos + 1 + t),
                  **cache_kwargs(model, cache))
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    if top is not None:
        top.update({e.key: e.count for e in events})
    return sum(e.count for e in events) / layers / steps


# the configurations of the op-count table (--profile): name -> (method, budget, KVCache keywords)
PROFILED = {
    "DynamicCache": None,
    "full": ("full", 1.0, {}),
    "snapkv 0.25": ("snapkv", 0.25, {}),
    "h2o 0.25": ("h2o", 0.25, {}),
    "streamingllm 0.25": ("streamingllm", 0.25, {}),
    "hae 0.25": ("hae", 0.25, {}),
    "hae broadcast 0.25": ("hae", 0.25, {"ddes_broadcast": True}),
    "retentivekv 0.25": ("retentivekv", 0.25, {}),
    "knorm 0.25": ("knorm", 0.25, {}),
    "kivi-4": ("full", 1.0, {"quantize": "kivi-4"}),
    "sphericalkv 0.25": ("sphericalkv", 0.25, {"calib_tokens": 128}),
}


def profile_table(args) -> None:
    """Aten ops per decode step and layer at 2 and 8 KV heads for every configuration of PROFILED: a markdown table,
    appended to ``decode_core_ops.csv`` (``--ops-out``)."""
    import pandas as pd
    from transformers import DynamicCache

    from modalkv import KVCache

    rows = []
    for kv_heads in (2, 8):
        model = build(args, kv_heads)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 1024, (args.batch, args.profile_context), generator=g)
        for name, spec in PROFILED.items():
            if args.configs and name not in args.configs and name not in ("DynamicCache", "full"):
                continue
            if spec is None:
                def make():
                    return DynamicCache(config=model.config)
            else:
                def make(spec=spec):
                    method, budget, kw = spec
                    return KVCache(model, method, budget, **kw)
            top: dict = {}
            ops = aten_ops_per_layer_step(model, ids, make, args.layers, steps=args.profile_steps, top=top)
            rows.append(dict(run=args.run, config=name, kv_heads=kv_heads, ops_per_layer_step=ops,
                             context=args.profile_context, batch=args.batch, steps=args.profile_steps))
            if args.verbose:
                busiest = sorted(top.items(), key=lambda kv: -kv[1])[:(40 if args.verbose > 1 else 12)]
                print(f"{name} @ {kv_heads} KV heads: {ops:.0f} ops/layer/step; " +
                      ", ".join(f"{k[6:]} {v / args.layers / args.profile_steps:.1f}" for k, v in busiest), flush=True)
        del model
    df = pd.DataFrame(rows)
    table = df.pivot(index="config", columns="kv_heads", values="ops_per_layer_step").reindex(
        [c for c in PROFILED if c in set(df.config)])
    print(f"\n| configuration | 2 KV heads | 8 KV heads | 8 / 2 |\n|---|---:|---:|---:|")
    for name, r in table.iterrows():
        print(f"| {name} | {r[2]:.0f} | {r[8]:.0f} | {r[8] / r[2]:.2f} |")
    out = Path(args.ops_out)
    df.to_csv(out, mode="a", header=not out.exists(), index=False)
    print(f"appended to {out}", file=sys.stderr)


def kernel_times(args) -> None:
    """The reads alone on fixed tensors at the attention shape (1 row, ``--kv-heads`` KV heads, 4 query rows per KV
    head, head_dim 128, ``--context`` entries): torch matmuls over dense keys/values against the fused KIVI-4 kernels,
    Spherical KV's section logits (one tier-1 section, 64 two-channel groups of 6-bit codes, over a third of the
    entries, about what a 0.2 budget keeps) against the matmul over as many dense keys, and the dense values kernel
    against its matmul; min over ``--calls`` calls each, interleaved (a proxy that load on a shared machine inflates
    least). ``MODALKV_KERNELS=scalar`` times the portable loops instead of the AVX2 paths."""
    from types import SimpleNamespace

    from modalkv.cache import HeadStore
    from modalkv.storage import KIVI, kernels
    from modalkv.storage.kivi import kivi_logits, kivi_mix
    from modalkv.storage.spherical import spherical_logits, spherical_mix

    lib = kernels.library()
    if lib is None:
        raise SystemExit("the fused kernels could not be built")
    B, H, r, d, n = 1, args.kv_heads, 4, 128, args.context
    g = torch.Generator().manual_seed(0)
    K, V = torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g)
    q = torch.randn(B, H, r, d, generator=g) / d ** 0.5
    pos = torch.arange(n, dtype=torch.int32).expand(B, n)
    stores = [HeadStore(K[:, h], V[:, h], pos, torch.zeros(B, n, dtype=torch.int8), torch.ones(B, n, dtype=torch.bool),
                        {}, 0, storage=KIVI(bits=4)) for h in range(H)]
    payloads = [st.payload for st in stores]
    p = torch.softmax(q @ K.transpose(-1, -2), -1).contiguous()
    logits, out = torch.empty(B, H, r, n), torch.empty(B, H, r, d)
    m, page, groups, bits = n // 3, 128, 64, 6  # Spherical KV: one tier-1 section of m entries per head
    books = torch.nn.functional.normalize(torch.randn(H, groups, 1 << bits, d // groups, generator=g), dim=-1)

    def section():
        return dict(tier=1, start=0, width=m, bits=bits, G=groups, g=d // groups,
                    codes=torch.randint(0, 256, (B, m, groups * bits // 8), dtype=torch.uint8, generator=g),
                    rcode=torch.randint(0, 256, (B, m, groups), dtype=torch.uint8, generator=g),
                    scale=torch.rand(B, -(-m // page), groups, generator=g))

    sph = [SimpleNamespace(params=SimpleNamespace(page_size=page), dv=d, values=V[:, h].contiguous(), books=[books[h]],
                           sections=[section()]) for h in range(H)]
    Km = K[:, :, :m].contiguous()
    fns = {"dense logits (matmul)": lambda: torch.matmul(q, K.transpose(-1, -2)),
           "dense probs x values (matmul)": lambda: torch.matmul(p, V),
           "softmax": lambda: torch.softmax(logits, -1),
           "kivi-4 logits (kernel)": lambda: kivi_logits(lib, payloads, q, logits),
           "kivi-4 probs x values (kernel)": lambda: kivi_mix(lib, payloads, p, out),
           "dense probs x values (kernel)": lambda: spherical_mix(lib, sph, p, out, [n] * H),
           f"dense logits of {m} entries (matmul)": lambda: torch.matmul(q, Km.transpose(-1, -2)),
           f"sphericalkv 2:6 logits of {m} entries (kernel)": lambda: spherical_logits(lib, sph, 1, q, logits)}
    best = {name: float("inf") for name in fns}
    for _ in range(args.calls):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"\n| read ({H} KV heads x {n} entries, 1 thread) | min ms over {args.calls} calls |\n|---|---:|")
    for name, t in best.items():
        print(f"| {name} | {t * 1e3:.3f} |")
    dense = best["dense logits (matmul)"] + best["dense probs x values (matmul)"]
    kivi = best["kivi-4 logits (kernel)"] + best["kivi-4 probs x values (kernel)"]
    print(f"\nkivi-4 reads / dense reads: {kivi / dense:.2f} (the dense reads {dense / kivi:.2f}x slower)")
    import pandas as pd

    out = Path(args.kernels_out)
    pd.DataFrame([dict(run=args.run, read=name, min_ms=t * 1e3, kv_heads=H, context=n, calls=args.calls)
                  for name, t in best.items()]).to_csv(out, mode="a", header=not out.exists(), index=False)
    print(f"appended to {out}", file=sys.stderr)


@torch.no_grad()
def kv_bound_rounds(args) -> None:
    """SmolLM2 in the KV-bound regime: modalkv's full cache, each of ``--configs`` (default kivi-4) and the full cache
    at a 32-token context, built from one captured ``--context``-token prompt at batch ``--batch`` and decoded in
    ``--repeats`` interleaved rounds of ``--steps`` steps in this process (each round's median step after the first),
    so that load on a shared machine hits every cache alike; per round the full cache's step over each config's.
    Rows appended to ``--steps-out``."""
    import pandas as pd

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory_speed import build_prompt, captured_rows

    from modalkv.cache import cache_kwargs
    from modalkv.models import load_model
    from modalkv.replay import capture_prefill
    from modalkv.storage import storage_names

    torch.set_num_threads(2)  # the prompt forward
    model, tok = load_model("smollm2-135m")
    ids = build_prompt(tok, args.context)
    captured, short = capture_prefill(model, ids), capture_prefill(model, ids[:, :32])
    B = args.batch
    first = captured.logits[:, -1:].argmax(-1).expand(B, 1)

    def make(name):
        rows = captured_rows(captured, B)
        method, _, budget = name.partition(" ")
        if method in storage_names():
            return rows.build_cache(model, "full", 1.0, quantize=method)
        return rows.build_cache(model, method, float(budget or 1.0))

    caches = {"full, 32-token context": [captured_rows(short, B).build_cache(model, "full", 1.0), 32, first]}
    for name in ["full", *(args.configs or ["kivi-4"])]:
        caches[name] = [make(name), args.context, first]
    torch.set_num_threads(args.threads)
    rows = []
    for rnd in range(args.repeats):
        for name, c in caches.items():
            cache, pos, nxt = c
            kw, times = cache_kwargs(model, cache), []
            for i in range(args.steps):
                t0 = time.perf_counter()
                out = model(input_ids=nxt, position_ids=torch.full((B, 1), pos + i), **kw)
                nxt = out.logits[:, -1:].argmax(-1)
                times.append((time.perf_counter() - t0) * 1e3)
            c[1], c[2] = pos + args.steps, nxt
            rows.append(dict(run=args.run, config=name, round=rnd, ms_per_token=statistics.median(times[1:]),
                             context=32 if name.startswith("full, 32") else args.context, batch=B,
                             threads=args.threads))
    df = pd.DataFrame(rows)
    table = df.pivot(index="round", columns="config", values="ms_per_token")
    for name in caches:
        if name not in ("full", "full, 32-token context"):
            ratio = table["full"] / table[name]
            print(f"full / {name}: median of rounds {ratio.median():.2f} (rounds {', '.join(f'{x:.2f}' for x in ratio)})")
    print(table.median().round(1).to_string())
    out = Path(args.steps_out)
    df.to_csv(out, mode="a", header=not out.exists(), index=False)
    print(f"appended to {out}", file=sys.stderr)


def kernels_smollm2(args) -> None:
    """The reads of one SmolLM2 decode step's layer at batch ``--batch`` (3 KV heads, 3 query rows per KV head,
    head_dim 64, ``--context`` entries): dense matmuls, the KIVI-4 kernels (and, with ``--old-kernels FILE.c``, the
    same kernels built from that source, loaded beside them), Spherical KV's values through the dense-values kernel
    and through a batched matmul (over half the entries). Each read: the minimum of 10 calls; ``--repeats`` interleaved
    rounds; the median of the rounds' minima appended to ``--kernels-out``."""
    import ctypes
    import os
    import subprocess
    import tempfile

    import pandas as pd

    from modalkv.storage import KIVI, kernels
    from modalkv.storage.kivi import kivi_logits, kivi_mix
    from modalkv.storage.spherical import spherical_mix

    libs = {"": kernels.library()}
    if libs[""] is None:
        raise SystemExit("the fused kernels could not be built")
    if args.old_kernels:
        so = Path(tempfile.mkdtemp()) / "old_kernels.so"
        subprocess.run(["gcc", *kernels._flags("default"), args.old_kernels, "-o", str(so)], check=True)
        old = ctypes.CDLL(str(so))
        for fn in (old.kivi_logits, old.kivi_mix):
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 6
        libs = {", before": old, ", after": libs[""]}
    B, H, n, d, r = args.batch, 3, args.context, 64, 3
    g = torch.Generator().manual_seed(0)
    fmt = KIVI(bits=4, group_size=32, residual=128)
    payloads = [fmt.new(torch.randn(B, n, d, generator=g), torch.randn(B, n, d, generator=g), 64) for _ in range(H)]
    nq = payloads[0].nq
    K, V = torch.randn(B, H, nq, d, generator=g), torch.randn(B, H, nq, d, generator=g)
    q = torch.randn(B, H, r, d, generator=g).contiguous()
    logits, out = torch.empty(B, H, r, n), torch.empty(B, H, r, d)
    probs = torch.softmax(torch.randn(B, H, r, n, generator=g), -1).contiguous()
    m = n // 2
    pm = probs[..., :m].contiguous()
    sph = [type("P", (), {"values": V[:, h], "dv": d})() for h in range(H)]
    fns = {"dense logits (matmul)": lambda: torch.matmul(q, K.transpose(-1, -2)),
           "dense probs x values (matmul)": lambda: torch.matmul(probs[..., :nq], V)}
    for tag, lib in libs.items():
        fns[f"kivi-4 logits (kernel{tag})"] = lambda lib=lib: kivi_logits(lib, payloads, q, logits)
        fns[f"kivi-4 probs x values (kernel{tag})"] = lambda lib=lib: kivi_mix(lib, payloads, probs, out)
    fns[f"sphericalkv values of {m} entries (dense-values kernel)"] = \
        lambda: spherical_mix(libs[list(libs)[-1]], sph, pm, out, [m] * H)
    fns[f"sphericalkv values of {m} entries (batched matmul)"] = lambda: torch.matmul(pm, V[:, :, :m])
    minima = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, f in fns.items():
            best = float("inf")
            for _ in range(10):
                t0 = time.perf_counter()
                f()
                best = min(best, time.perf_counter() - t0)
            minima[name].append(best * 1e3)
    run = f"{args.run} smollm2 shape B={B} H=3 r=3 d=64, load {os.getloadavg()[0]:.1f}".strip()
    rows = [dict(run=run, read=name, min_ms=statistics.median(v), kv_heads=H, context=n, calls=f"{args.repeats}x10")
            for name, v in minima.items()]
    for row, v in zip(rows, minima.values()):
        print(f"| {row['read']} | {row['min_ms']:.2f} | {min(v):.2f}–{max(v):.2f} |")
    out_path = Path(args.kernels_out)
    pd.DataFrame(rows).to_csv(out_path, mode="a", header=not out_path.exists(), index=False)
    print(f"appended to {out_path}", file=sys.stderr)


@torch.no_grad()
def step_profile(args) -> None:
    """Where a decode step's attention time goes: the full cache, KIVI-4 and Spherical KV at 0.2 at the attention
    shape, the layer-level attention calls and the kernel calls inside them timed by wrapping the functions, per step
    (all layers), median and min over ``--steps`` steps after one warm-up step; appended to ``--profile-out``. The
    min is the figure to compare on a loaded machine (a median of a few-ms call includes preemption)."""
    import pandas as pd

    import modalkv.attention as attn
    import modalkv.storage.kivi as kivi
    import modalkv.storage.spherical as spherical
    from modalkv import KVCache, cache_kwargs

    spent: dict = {}

    def timed(module, name, label):
        real = getattr(module, name)

        def call(*a, **kw):
            t0 = time.perf_counter()
            result = real(*a, **kw)
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
            return result
        setattr(module, name, call)

    for module, name in [(attn, "attend_packed"), (attn, "attend_coded"), (attn, "attend_spherical"),
                         (kivi, "kivi_logits"), (kivi, "kivi_mix"), (spherical, "spherical_logits"),
                         (spherical, "spherical_tail_logits"), (spherical, "spherical_mix")]:
        timed(module, name, name)
    model = build(args, args.kv_heads)
    ids = torch.randint(0, 1024, (args.batch, args.context), generator=torch.Generator().manual_seed(0))
    configs = {"modalkv full": lambda: KVCache(model, "full"),
               "kivi-4": lambda: KVCache(model, "full", quantize="kivi-4"),
               "sphericalkv 0.2": lambda: KVCache(model, "sphericalkv", 0.2, calib_tokens=args.calib_tokens)}
    rows = []
    for config, make in configs.items():
        cache = make()
        out = model(input_ids=ids, **cache_kwargs(model, cache))
        nxt, pos, steps = out.logits[:, -1:].argmax(-1), ids.shape[1], []
        for _ in range(args.steps + 1):
            spent.clear()
            t0 = time.perf_counter()
            out = model(input_ids=nxt, position_ids=torch.full((ids.shape[0], 1), pos), **cache_kwargs(model, cache))
            steps.append({"whole step": time.perf_counter() - t0, **spent})
            nxt, pos = out.logits[:, -1:].argmax(-1), pos + 1
        for part in steps[1]:
            values = [st.get(part, 0.0) * 1e3 for st in steps[1:]]
            rows.append(dict(run=args.run, config=config, part=part, median_ms=statistics.median(values),
                             min_ms=min(values), layers=args.layers, kv_heads=args.kv_heads, context=args.context,
                             steps=args.steps))
            print(f"{config:16s} {part:22s} median {rows[-1]['median_ms']:8.3f} ms  min {rows[-1]['min_ms']:8.3f} ms")
        del cache
    out_path = Path(args.profile_out)
    pd.DataFrame(rows).to_csv(out_path, mode="a", header=not out_path.exists(), index=False)
    print(f"appended to {out_path}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--mlp", type=int, default=14336)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true",
                   help="only count aten ops per decode step and layer at 2 and 8 KV heads (no timing)")
    p.add_argument("--profile-context", type=int, default=512)
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--verbose", action="count", default=0, help="with --profile: the most frequent ops of each row (twice: 40 of them)")
    p.add_argument("--kernels", action="store_true", help="only time the reads alone on fixed tensors (see kernel_times)")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--step-profile", action="store_true",
                   help="only time the attention calls and kernel calls inside decode steps (see step_profile)")
    p.add_argument("--profile-out", default=str(ROOT / "docs/results/decode_core_step_profile.csv"))
    p.add_argument("--kernels-out", default=str(ROOT / "docs/results/decode_core_kernels.csv"))
    p.add_argument("--ops-out", default=str(ROOT / "docs/results/decode_core_ops.csv"))
    p.add_argument("--configs", nargs="+", help="run only these configurations (besides DynamicCache and full)")
    p.add_argument("--calib-tokens", type=int, default=512, help="Spherical KV codebook calibration tokens")
    p.add_argument("--kv-bound-rounds", action="store_true",
                   help="only SmolLM2 at --context x --batch: full vs --configs in interleaved rounds (kv_bound_rounds)")
    p.add_argument("--steps-out", default=str(ROOT / "docs/results/decode_core_pack_steps.csv"))
    p.add_argument("--kernels-smollm2", action="store_true",
                   help="only the reads at SmolLM2's decode shape (kernels_smollm2); --old-kernels: an old _kernels.c")
    p.add_argument("--old-kernels", help="with --kernels-smollm2: time the KIVI kernels built from this source too")
    p.add_argument("--run", default="", help="a label for this run in the CSV")
    p.add_argument("--out", default=str(ROOT / "docs/results/decode_core.csv"))
    args = p.parse_args()

    import pandas as pd
    from transformers import DynamicCache

    from modalkv import KVCache
    from modalkv.measure import pin_threads

    pin_threads(args.threads)
    if args.profile:
        profile_table(args)
        return
    if args.kernels:
        kernel_times(args)
        return
    if args.step_profile:
        step_profile(args)
        return
    if args.kv_bound_rounds:
        kv_bound_rounds(args)
        return
    if args.kernels_smollm2:
        kernels_smollm2(args)
        return
    model = build(args, args.kv_heads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (args.batch, args.context), generator=g)
    short = ids[:, :32]
    configs = {
        "DynamicCache": (lambda: DynamicCache(config=model.config), False),
        "modalkv full": (lambda: KVCache(model, "full"), False),
        "modalkv full per-head": (lambda: KVCache(model, "full"), True),
        "snapkv 0.25": (lambda: KVCache(model, "snapkv", 0.25), False),
        "snapkv 0.25 per-head": (lambda: KVCache(model, "snapkv", 0.25), True),
        "h2o 0.25": (lambda: KVCache(model, "h2o", 0.25), False),
        "streamingllm 0.25": (lambda: KVCache(model, "streamingllm", 0.25), False),
        "kivi-4": (lambda: KVCache(model, "full", quantize="kivi-4"), False),
        "kivi-4 unfused per-head": (lambda: KVCache(model, "full", quantize="kivi-4"), True),
        "retentivekv 0.2": (lambda: KVCache(model, "retentivekv", 0.2), False),
        "sphericalkv 0.2": (lambda: KVCache(model, "sphericalkv", 0.2, calib_tokens=args.calib_tokens), False),
        "sphericalkv 0.2 unfused": (lambda: KVCache(model, "sphericalkv", 0.2, calib_tokens=args.calib_tokens),
                                    True),
    }
    if args.configs:
        unknown = [name for name in args.configs if name not in configs]
        if unknown:
            p.error(f"unknown --configs {unknown}; known: {', '.join(repr(c) for c in configs)}")
        configs = {name: configs[name] for name in ["DynamicCache", "modalkv full", *args.configs]}
    bandwidth = read_bandwidth()
    base_ms = statistics.median(decode_ms(model, short, lambda: DynamicCache(config=model.config), args.steps)[0]
                                for _ in range(3))
    rows = []
    for r in range(args.repeats):
        for name, (make, per_head) in configs.items():
            ms, cache = decode_ms(model, ids, make, args.steps, per_head)
            rows.append(dict(config=name, round=r, ms=ms, kv_bytes=cache_bytes(cache)))
            del cache
            print(f"round {r} {name}: {ms:.1f} ms/token", flush=True)
    df = pd.DataFrame(rows)
    med = df.groupby("config", sort=False).agg(ms=("ms", "median"), kv_bytes=("kv_bytes", "median")).reset_index()
    dyn = float(med.loc[med.config == "DynamicCache", "ms"].iloc[0])
    full = float(med.loc[med.config == "modalkv full", "ms"].iloc[0])
    med["vs_dynamic"] = dyn / med.ms
    med["vs_modalkv_full"] = full / med.ms
    med["cache_ms"] = med.ms - base_ms
    med["floor_ms"] = med.kv_bytes / bandwidth * 1e3
    med["cache_vs_floor"] = med.cache_ms / med.floor_ms
    for key, val in dict(layers=args.layers, kv_heads=args.kv_heads, context=args.context, batch=args.batch,
                         threads=args.threads, base_ms_32_tokens=base_ms, read_gb_s=bandwidth / 1e9).items():
        med[key] = val
    med["aten_ops_per_layer_step"] = float("nan")  # (op counts: --profile)
    med.insert(0, "run", args.run)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    med.to_csv(out, mode="a", header=not out.exists(), index=False)
    print(med.to_string(index=False))
    print(f"appended to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

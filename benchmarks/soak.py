"""Long runs: does memory stay flat over a long decode, and are caches freed at once between requests?

For every method (each in its own process, one thread, a tiny random Llama: 2 layers, hidden 64, 2 KV heads):

* **decode soak**: a prompt of ``--prompt`` tokens, an absolute ``--budget`` and a ``--decode-budget``, then
  ``--steps`` greedy decode steps. Every ``--every`` steps: the cache's ``allocated_bytes``, the most valid entries
  any (layer, KV head) holds, and the process RSS. Checks: allocated bytes do not grow after ``--warmup`` steps
  (they may move below their maximum: Spherical KV re-encodes its stores), the entries stay within the decode
  budget, and RSS at the end is within 5 % of RSS at ``--warmup`` steps.
* **requests**: ``--requests`` sequential requests in the same process, as a server runs them: a new cache per
  request, a prompt of 200 to 400 tokens, ``--new-tokens`` tokens by ``model.generate``, with the cyclic garbage
  collector disabled. Checks: after each request, weak references to the cache and to one of its head stores are
  dead (freed by reference counting alone); peak RSS over the last half of the requests is within 5 % of the peak
  over the first half.

    python benchmarks/soak.py                       # every method (about 40 minutes on a busy 2-core machine)
    python benchmarks/soak.py --methods h2o snapkv --steps 2000 --requests 30 --out /tmp/soak.csv   # quick
    python benchmarks/soak.py --methods hae --update  # re-run one method, keeping the other rows of the CSV
    python benchmarks/soak.py --report docs/results/soak.csv  # rebuild the Markdown from a CSV

Writes ``docs/results/soak.csv`` (one row per sample: method, phase soak / requests, step = decode step or request
number, allocated_bytes, max_entries, rss_bytes, elapsed_s, budget, decode_budget, prompt = prompt tokens, ok = the
cache was freed after the request), ``soak.json`` (the command, date, machine, versions) and ``soak.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["method", "phase", "step", "allocated_bytes", "max_entries", "rss_bytes", "elapsed_s",
          "budget", "decode_budget", "prompt", "ok", "note"]
RSS_TOLERANCE = 0.05
# extra rows: H2O over KIVI-4 storage, with a residual and group small enough that entries are quantized, evicted
# from quantized groups (holes) and repacked while decoding (the default residual of 128 would hold them all)
VARIANTS = {"h2o+kivi-4": ("h2o", {"quantize": {"bits": 4, "group_size": 16, "residual": 16}})}


def tiny_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def repeat_tokenizer(text, add_special_tokens=False, return_tensors="pt"):
    """A stand-in tokenizer for methods with a context pass (KVzip's reconstruction prompt): the model has none."""
    import torch

    return types.SimpleNamespace(input_ids=torch.tensor([[3, 4, 5, 6]]))


def make_cache(model, label: str, args):
    from modalkv import KVCache

    from modalkv.methods.kivi import KIVI

    method, extra = VARIANTS.get(label, (label, {}))
    if "quantize" in extra:
        extra = {**extra, "quantize": KIVI(**extra["quantize"])}
    return KVCache(model, method, args.budget, decode_budget=args.decode_budget, **extra)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def max_entries(cache) -> int:
    return max(int(s.valid[:, : s.n].sum(-1).max()) for layer in cache.managed_layers for s in layer.heads)


def prefill(model, cache, ids):
    """The prompt forward (through modalkv.prefill for methods with a context pass); logits of the last position."""
    import torch

    import modalkv
    from modalkv import cache_kwargs

    with torch.no_grad():
        if getattr(cache.method, "needs_context_pass", False):
            return modalkv.prefill(model, cache, ids, tokenizer=repeat_tokenizer).logits[:, -1]
        return model(input_ids=ids, **cache_kwargs(model, cache)).logits[:, -1]


def soak(label: str, args) -> list[dict]:
    import torch

    from modalkv import cache_kwargs

    torch.set_num_threads(1)
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (1, args.prompt), generator=g)
    cache = make_cache(model, label, args)
    rows = []
    t0 = time.perf_counter()
    with torch.no_grad():
        token = prefill(model, cache, ids).argmax(-1)
        pos = args.prompt
        for step in range(1, args.steps + 1):
            out = model(input_ids=token[:, None], position_ids=torch.tensor([[pos]]), **cache_kwargs(model, cache))
            token = out.logits[:, -1].argmax(-1)
            pos += 1
            if step % args.every == 0 or step == 1:
                rows.append(dict(method=label, phase="soak", step=step,
                                 allocated_bytes=cache.memory_report()["allocated_bytes"],
                                 max_entries=max_entries(cache), rss_bytes=rss(),
                                 elapsed_s=round(time.perf_counter() - t0, 2)))
    return rows


def requests(label: str, args) -> list[dict]:
    import torch

    import modalkv
    from modalkv import cache_kwargs

    torch.set_num_threads(1)
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    rows = []
    t0 = time.perf_counter()
    gc.collect()
    gc.disable()
    try:
        for r in range(1, args.requests + 1):
            n = int(torch.randint(200, 401, (1,), generator=g))
            ids = torch.randint(0, 128, (1, n), generator=g)
            cache = make_cache(model, label, args)
            with torch.no_grad():
                if getattr(cache.method, "needs_context_pass", False):  # the context first, then the question
                    modalkv.prefill(model, cache, ids[:, :-8], tokenizer=repeat_tokenizer)
                model.generate(input_ids=ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))
            allocated = cache.memory_report()["allocated_bytes"]
            entries = max_entries(cache)
            refs = (weakref.ref(cache), weakref.ref(cache.managed_layers[0].heads[0]))
            del cache
            freed = all(ref() is None for ref in refs)
            rows.append(dict(method=label, phase="requests", step=r, prompt=n, allocated_bytes=allocated,
                             max_entries=entries, rss_bytes=rss(), elapsed_s=round(time.perf_counter() - t0, 2),
                             ok=int(freed), note="" if freed else "cache alive after the request"))
    finally:
        gc.enable()
    return rows


# ---------------------------------------------------------------------------------------------------------
# Checks and the report
# ---------------------------------------------------------------------------------------------------------


def judge_soak(rows: list[dict], warmup: int, decode_budget: int) -> dict:
    """Spherical KV's decode budget is bytes (coded entries are smaller), so its entry count is not checked."""
    after = [r for r in rows if r["step"] >= warmup]
    before = [r for r in rows if r["step"] <= warmup]
    growth = max(r["allocated_bytes"] for r in after) - max(r["allocated_bytes"] for r in before)
    warm = next(r for r in rows if r["step"] >= warmup)
    drift = (rows[-1]["rss_bytes"] - warm["rss_bytes"]) / warm["rss_bytes"]
    entries = max(r["max_entries"] for r in after)
    bounded = entries <= decode_budget or rows[0]["method"] == "sphericalkv"
    return {"alloc_growth": growth, "rss_drift": drift, "max_entries": entries,
            "ok": growth <= 0 and abs(drift) <= RSS_TOLERANCE and bounded}


def judge_requests(rows: list[dict]) -> dict:
    half = len(rows) // 2
    first = max(r["rss_bytes"] for r in rows[:half])
    last = max(r["rss_bytes"] for r in rows[half:])
    freed = all(int(r["ok"]) for r in rows)
    growth = (last - first) / first
    return {"peak_rss": max(r["rss_bytes"] for r in rows), "rss_growth": growth, "freed": freed,
            "ok": freed and growth <= RSS_TOLERANCE}


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("step", "allocated_bytes", "max_entries", "rss_bytes", "prompt", "decode_budget"):
            r[k] = int(r[k])
        r["elapsed_s"] = float(r["elapsed_s"])
    return rows


def at(rows: list[dict], step: int) -> dict | None:
    return next((r for r in rows if r["step"] == step), None)


def report(csv_path: Path, md_path: Path, meta: dict) -> bool:
    rows = read_csv(csv_path)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    first = next(r for r in rows if r["phase"] == "soak")
    steps = max(r["step"] for r in rows if r["phase"] == "soak")
    n_requests = max((r["step"] for r in rows if r["phase"] == "requests"), default=0)
    warmup = meta["warmup"]
    prompts = [r["prompt"] for r in rows if r["phase"] == "requests"] or [0]
    lo, hi = min(prompts), max(prompts)
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    kib = lambda b: f"{b / 1024:.1f}"  # noqa: E731
    lines = [
        "# Soak: memory over long decodes and many requests",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}: {meta['machine']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, one thread, each method in its own process. Data: "
        f"`docs/results/soak.csv` (one row per sample).{(' ' + meta['note']) if meta.get('note') else ''}",
        "",
        f"Model: a random tiny Llama (2 layers, hidden 64, 4 query heads, 2 KV heads of 16 dims, fp32). Decode soak: a "
        f"{first['prompt']}-token prompt, budget {first['budget']} tokens, `decode_budget={first['decode_budget']}`, "
        f"{steps} greedy decode steps, sampled every {meta['every']} steps. Requests: {n_requests} sequential requests "
        f"in one process, each a new `KVCache` (same budgets), a {lo}–{hi}-token prompt and `model.generate` of "
        f"{meta['new_tokens']} tokens, with `gc.disable()`. Every registered method runs with its default parameters; "
        "`h2o+kivi-4` is H2O over KIVI-4 storage with group 16 and residual 16, so that entries are quantized, "
        "evicted from quantized groups and repacked while decoding.",
        "",
        f"Checks: **alloc flat**: allocated bytes after step {warmup} never exceed their maximum up to step {warmup}; "
        f"**entries**: the most valid entries any (layer, KV head) held after step {warmup}, against the decode "
        "budget (not for Spherical KV, whose budget is bytes); "
        f"**RSS drift**: RSS at the last step against RSS at step {warmup} (within ±5 %); **freed**: weak references "
        "to the cache and to a head store dead right after each request (no cyclic GC); **RSS growth**: peak RSS "
        "over the second half of the requests against the first half (within 5 %).",
        "",
        f"| method | allocated KiB @1k | @10k | @20k | alloc flat | entries (max) | RSS MiB @1 | @{warmup // 1000}k | "
        f"@{steps // 1000}k | RSS drift | {n_requests} requests: peak RSS MiB | RSS growth | freed | steps/s | ok |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    failed = []
    all_ok = True
    for m in methods:
        s = [r for r in rows if r["method"] == m and r["phase"] == "soak"]
        q = [r for r in rows if r["method"] == m and r["phase"] == "requests"]
        js = judge_soak(s, warmup, first["decode_budget"])
        jq = judge_requests(q) if q else None
        cells = [kib(at(s, k)["allocated_bytes"]) if at(s, k) else "–" for k in (1000, 10000, 20000)]
        warm = next(r for r in s if r["step"] >= warmup)
        ok = js["ok"] and (jq is None or jq["ok"])
        if not ok:
            failed.append(m)
        flat = "yes" if js["alloc_growth"] <= 0 else f"NO (+{js['alloc_growth']} B)"
        lines.append(
            f"| {m} | {' | '.join(cells)} | {flat} | "
            f"{js['max_entries']} | {mib(s[0]['rss_bytes'])} | {mib(warm['rss_bytes'])} | {mib(s[-1]['rss_bytes'])} | "
            f"{100 * js['rss_drift']:+.2f} % | "
            + (f"{mib(jq['peak_rss'])} | {100 * jq['rss_growth']:+.2f} % | {'yes' if jq['freed'] else 'NO'}"
               if jq else "– | – | –")
            + f" | {s[-1]['step'] / s[-1]['elapsed_s']:.0f} | {'yes' if ok else 'NO'} |")
    verdict = (f"All {len(methods)} configurations passed every check." if not failed else
               f"{len(methods) - len(failed)} of {len(methods)} configurations passed every check; failed: "
               f"{', '.join(failed)}.")
    lines += ["", verdict, "", "steps/s: decode steps per second over the whole soak, prefill included (the machine "
              "was shared with other jobs, so these vary from run to run)."]
    md_path.write_text("\n".join(lines) + "\n")
    return not failed


# ---------------------------------------------------------------------------------------------------------
# Driver: one process per method and phase
# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered method and h2o+kivi-4")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--decode-budget", type=int, default=96)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "docs/results/soak.csv")
    p.add_argument("--phases", nargs="*", default=["soak", "requests"], choices=["soak", "requests"])
    p.add_argument("--update", action="store_true", help="replace (or add) only these methods' and phases' rows in "
                   "an existing CSV, keeping the others (a re-run, or a method registered after the main run)")
    p.add_argument("--report", type=Path, default=None, help="only rebuild the Markdown from this CSV")
    p.add_argument("--worker", nargs=2, metavar=("PHASE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps <= args.warmup or args.warmup % args.every:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}), a multiple of --every ({args.every})")

    if args.worker:
        phase, label = args.worker
        rows = soak(label, args) if phase == "soak" else requests(label, args)
        print(json.dumps(rows))
        return
    meta_path = (args.report or args.out).with_suffix(".json")
    if args.report:
        meta = json.loads(meta_path.read_text())
        ok = report(args.report, args.report.with_suffix(".md"), meta)
        sys.exit(0 if ok else 1)

    import torch
    import transformers

    from modalkv.methods import REGISTRY

    methods = args.methods or [*REGISTRY, *VARIANTS]
    settings = dict(budget=args.budget, decode_budget=args.decode_budget, prompt=args.prompt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    forwarded = ["--steps", str(args.steps), "--every", str(args.every), "--prompt", str(args.prompt),
                 "--budget", str(args.budget), "--decode-budget", str(args.decode_budget),
                 "--requests", str(args.requests), "--new-tokens", str(args.new_tokens)]
    kept = []
    if args.update:
        with open(args.out) as f:
            kept = [r for r in csv.DictReader(f) if r["method"] not in methods or r["phase"] not in args.phases]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(kept)
        for label in methods:
            for phase in args.phases:
                if phase == "requests" and args.requests == 0:
                    continue
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, *forwarded, "--worker", phase, label],
                                      capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{label} {phase} failed")
                for row in json.loads(done.stdout.strip().splitlines()[-1]):
                    writer.writerow({"ok": "", "note": "", **settings, **row})
                f.flush()
                print(f"{label:>14} {phase:<8} {time.perf_counter() - t0:6.1f} s", flush=True)
    command = "python benchmarks/soak.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("steps", "requests") and v != p.get_default(k))
    if args.update:
        command = (json.loads(meta_path.read_text())["command"] + "`, then `" + command + " --update"
                   + (" --methods " + " ".join(methods) if args.methods else "")
                   + ("" if args.phases == p.get_default("phases") else " --phases " + " ".join(args.phases)))
    meta = {"command": command, "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "transformers": transformers.__version__, "warmup": args.warmup, "every": args.every,
            "new_tokens": args.new_tokens}
    if args.update and json.loads(meta_path.read_text()).get("note"):
        meta["note"] = json.loads(meta_path.read_text())["note"]
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    ok = report(args.out, args.out.with_suffix(".md"), meta)
    print(args.out.with_suffix(".md").read_text())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

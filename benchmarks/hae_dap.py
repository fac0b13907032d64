"""HAE's Dual-Attention Pruning on the bundled VLM: how many image tokens each threshold setting evicts, what it costs
in easy-VQA accuracy, and what it saves in KV bytes and prefill time (docs/results/seeds_hae_madakv.md).

Plain easy-VQA test questions (one image, then the question: the paper's image-understanding setting). For every
question and setting: a fresh batch-1 prefill with HAE at budget 1.0 (so only DAP acts), greedy answer (<= 3 tokens),
exact match. Absolute thresholds are the paper's form (tau_g a share of the summed attention: its 0.0015 is 0.86 of
the uniform share of LLaVA-1.5's 576 image tokens; tau_i=1.0 switches the peak test off); relative ones (HAE's
default) are multiples of the visual tokens' mean global and mean peak attention. Prefill ms: median over questions, whole
model forward (vision tower included), relative to the full cache measured in the same loop.

    PYTHONPATH=src .venv/bin/python benchmarks/hae_dap.py --n 200 --out docs/results/hae_dap_relative.csv
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from modalkv import KVCache, cache_kwargs, vlm
from modalkv.measure import pin_threads
from modalkv.models import load_model

# (label, method, params): tau_g as a multiple of the uniform share, converted per prompt below
SETTINGS = [
    ("full", "full", {}),
    ("HAE absolute, paper thresholds (tau_g .0015, tau_i .001)", "hae", {"thresholds": "absolute"}),
    ("HAE absolute tau_g 0.94/|V|, peak test off", "hae", {"thresholds": "absolute", "c": 0.94, "tau_i": 1.0}),
    ("HAE relative 0.86 / 1.0", "hae", {"tau_g": 0.86, "tau_i": 1.0}),
    ("HAE relative 1.0 / 1.0 (default)", "hae", {}),
    ("HAE relative 1.0 / 1.5", "hae", {"tau_g": 1.0, "tau_i": 1.5}),
    ("HAE relative 1.2 / 1.2", "hae", {"tau_g": 1.2, "tau_i": 1.2}),
    ("HAE relative 1.0 / 1.0, kv_only", "hae", {"mode": "kv_only"}),
]


@torch.no_grad()
def run(n: int, threads: int, seed: int = 0) -> pd.DataFrame:
    import random

    pin_threads(threads)
    model, proc = load_model("modalkv-vlm")
    tok = proc.tokenizer
    tpi = model.config.image_seq_length
    q, a, paths = vlm.easy_vqa_split("test")
    idx = sorted(random.Random(seed).sample(range(len(q)), n))
    rows = []
    for i in idx:
        ids = torch.tensor([vlm.prompt_ids(tok, q[i], tpi)])
        pixels = vlm.load_images([paths[i]], proc)
        mm = (ids == model.config.image_token_id).long()
        for label, method, params in SETTINGS:
            params = dict(params)
            if "c" in params:
                params["tau_g"] = params.pop("c") / tpi
            cache = KVCache(model, method, 1.0, **params)
            cache.set_modality(mm)
            kw = cache_kwargs(model, cache)
            t0 = time.perf_counter()
            out = model(input_ids=ids, pixel_values=pixels, **kw)
            prefill = time.perf_counter() - t0
            mem = cache.memory_report()
            toks = []
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            for step in range(3):
                if int(nxt) == tok.eos_token_id:
                    break
                toks.append(int(nxt))
                if step == 2:
                    break
                out = model(input_ids=nxt, position_ids=torch.tensor([[ids.shape[1] + step]]), **kw)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            words = tok.decode(toks, skip_special_tokens=True).strip().lower().split()
            got = words[0].strip(".,!") if words else ""
            evicted = int(cache.method.dap_evicted[0]) if method == "hae" else 0
            rows.append({"question": i, "setting": label, "correct": got == a[i], "visual_evicted": evicted / tpi,
                         "kv_kept_share": mem["payload_bytes"] / mem["full_bytes"], "prefill_ms": prefill * 1e3,
                         "answer_kind": "yes/no" if a[i] in ("yes", "no") else ("shape" if a[i] in vlm.SHAPES else "color")})
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    order = [s[0] for s in SETTINGS]
    g = df.groupby("setting")
    out = pd.DataFrame({
        "accuracy": g.correct.mean(),
        "image tokens evicted": g.visual_evicted.mean(),
        "KV kept / full": g.kv_kept_share.mean(),
        "prefill ms (median)": g.prefill_ms.median(),
    }).reindex(order)
    full_ms = out.loc["full", "prefill ms (median)"]
    out["prefill vs full"] = full_ms / out["prefill ms (median)"]
    out["accuracy Δ vs full (pt)"] = (out.accuracy - out.loc["full", "accuracy"]) * 100
    return out


def markdown(table: pd.DataFrame) -> str:
    cols = ["setting", *table.columns]
    out = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for name, row in table.iterrows():
        out += f"| {name.replace('|', chr(92) + '|')} | " + " | ".join(f"{v:.3f}" for v in row) + " |\n"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/hae_dap_relative.csv")
    ap.add_argument("--summarise", action="store_true", help="only print the table of an existing --out file")
    args = ap.parse_args()
    if args.summarise:
        df = pd.read_csv(args.out)
    else:
        df = run(args.n, args.threads)
        df.to_csv(args.out, index=False)
    table = summarise(df)
    print(markdown(table))
    print(f"{args.n} questions; medians of per-question prefill times")


if __name__ == "__main__":
    main()

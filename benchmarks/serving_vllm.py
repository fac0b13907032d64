"""Serving benchmark: vanilla vLLM against modalkv's plugin (SnapKV at 0.5 and 0.25) in the same KV space.

Every configuration serves the same needle requests (a distinct 4-digit code hidden at a random depth of filler text,
the question at the end) through vLLM's engine, in its own process of .venv-vllm, one after the other in one run.
Per configuration: the most requests running at once (read from the scheduler after every engine step), total
time, output tokens per second, needle accuracy, and the blocks of a compressed prompt returned to vLLM's pool.

    .venv-vllm/bin/python benchmarks/serving_vllm.py --requests 8 --prompt-tokens 1000 --output-tokens 32 \\
        --blocks 24 --out docs/results/serving_vllm_small.csv
    .venv-vllm/bin/python benchmarks/serving_vllm.py            # the issue's configuration: 32 x 2,000 + 64, 1 GiB

``--blocks`` overrides vLLM's KV block count (num_gpu_blocks_override) to scale the KV space down with the workload;
without it the space is ``--kv-space`` GiB (VLLM_CPU_KVCACHE_SPACE). Run scripts/vllm_setup.sh first.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("vanilla", None, 1.0), ("snapkv", "snapkv", 0.5), ("snapkv", "snapkv", 0.25)]


def needle_prompts(tok, n: int, tokens: int, seed: int = 0) -> list[tuple[list[int], str]]:
    """``n`` prompts of exactly ``tokens`` tokens, each hiding its own code; returns (token ids, code)."""
    rng = random.Random(seed)
    towns = ["Arden", "Belmont", "Corvik", "Dunmore", "Elstow", "Farrow", "Glenby", "Harlow", "Ivers", "Jessop"]
    goods = ["apples", "barley", "candles", "rope", "salt", "wool", "copper", "timber", "honey", "flax"]
    out = []
    for i in range(n):
        code = f"{rng.randrange(1000, 10000)}"
        question = f"\nQuestion: What is the secret code of the archive? Answer: The secret code of the archive is"
        budget = tokens - len(tok(question).input_ids) - 16
        lines = []
        while len(tok(" ".join(lines)).input_ids) < budget:
            lines.append(f"In {rng.choice(towns)} the market of day {len(lines) + rng.randrange(100)} sold "
                         f"{rng.randrange(2, 90)} crates of {rng.choice(goods)}.")
        lines.insert(rng.randrange(1, len(lines)), f"The secret code of the archive is {code}.")
        ids = tok(" ".join(lines)).input_ids
        qids = tok(question).input_ids
        ids = ids[: tokens - len(qids)] + qids
        if f"{code}." not in tok.decode(ids):  # the cut removed the needle: put it back near the middle
            return needle_prompts(tok, n, tokens, seed + 1)
        out.append((ids, code))
    return out


def child(args) -> None:
    """One configuration, inside .venv-vllm (the plugin is on when MODALKV_VLLM_METHOD is set)."""
    from vllm import LLM, SamplingParams

    job = json.loads(Path(args.child).read_text())
    kw = {"num_gpu_blocks_override": job["blocks"]} if job["blocks"] else {}
    llm = LLM(model=job["model"], dtype="float32", max_model_len=job["max_model_len"], enforce_eager=True,
              enable_prefix_caching=False, async_scheduling=False, seed=0, **kw)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    tok = llm.get_tokenizer()
    extra = None if job["budget"] is None else {"modalkv_budget": job["budget"]}
    params = SamplingParams(temperature=0, max_tokens=job["output_tokens"], ignore_eos=True, extra_args=extra)
    load_start = os.getloadavg()[0]  # the machine's load (other processes slow every configuration differently)
    start = time.perf_counter()
    for i, ids in enumerate(job["prompts"]):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
    texts, out_tokens, max_running, steps, min_free = {}, 0, 0, 0, pool.get_num_free_blocks()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                texts[o.request_id] = tok.decode(o.outputs[0].token_ids)
                out_tokens += len(o.outputs[0].token_ids)
        max_running = max(max_running, len(scheduler.running))
        min_free = min(min_free, pool.get_num_free_blocks())
        steps += 1
    total = time.perf_counter() - start
    correct = sum(job["codes"][int(r[1:])] in t for r, t in texts.items())
    state = scheduler.__dict__.get("_modalkv")
    log = state["log"] if state else []
    freed = [(e["blocks_before"] - e["blocks_after"]) / e["blocks_before"] for e in log]
    print("RESULT " + json.dumps({
        "kv_blocks": pool.num_gpu_blocks - 1, "max_running": max_running, "total_s": round(total, 2),
        "output_tok_s": round(out_tokens / total, 3), "output_tokens": out_tokens, "steps": steps,
        "needle_correct": correct, "requests": len(job["prompts"]), "min_free_blocks": min_free,
        "blocks_freed_fraction": round(min(freed), 4) if freed else 0.0, "compressed": len(log),
        "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="transformers folder (default: the bundled smollm2-135m)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=2000)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--kv-space", type=int, default=1, help="GiB (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--blocks", type=int, default=0, help="override the KV block count (0: from --kv-space)")
    p.add_argument("--out", default="docs/results/serving_vllm.csv")
    p.add_argument("--configs", nargs="+", default=[f"{m or 'vanilla'}@{b}" for _, m, b in CONFIGS],
                   help="which configurations to run (vanilla@1.0 snapkv@0.5 snapkv@0.25); vanilla first")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    from transformers import AutoTokenizer

    model = args.model or str(Path(os.environ.get("MODALKV_CACHE", Path.home() / ".cache" / "modalkv"))
                              / "smollm2-135m")
    tok = AutoTokenizer.from_pretrained(model)
    prompts = needle_prompts(tok, args.requests, args.prompt_tokens)
    rows = []
    for label, method, budget in CONFIGS:
        if f"{method or 'vanilla'}@{budget}" not in args.configs:
            continue
        job = {"model": model, "prompts": [ids for ids, _ in prompts], "codes": [c for _, c in prompts],
               "output_tokens": args.output_tokens, "blocks": args.blocks, "budget": None if method is None else budget,
               "max_model_len": args.prompt_tokens + args.output_tokens + 128}
        path = Path(args.out).with_suffix(f".{label}-{budget}.job.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODALKV_VLLM_")}
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=str(args.kv_space))
        if method:
            env.update(MODALKV_VLLM_METHOD=method, MODALKV_VLLM_BUDGET=str(budget))
        print(f"running {label} {budget} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env, capture_output=True,
                              text=True)
        path.unlink()
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"{label} {budget} failed:\n{done.stderr[-4000:]}")
        row = {"config": label if method is None else f"{method}@{budget}", "budget": budget,
               "requests": args.requests, "prompt_tokens": args.prompt_tokens, "output_tokens_each": args.output_tokens,
               **json.loads(lines[-1][7:])}
        if method and row["compressed"] == 0:  # the plugin did not run: the numbers would be vanilla's, mislabelled
            sys.exit(f"{label} {budget}: no request was compressed (is modalkv installed in this environment and its "
                     f"plugin loaded?)\n{done.stderr[-4000:]}")
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["running_vs_vanilla"] = round(r["max_running"] / base["max_running"], 3)
        r["tok_s_vs_vanilla"] = round(r["output_tok_s"] / base["output_tok_s"], 3)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""kvpress on the same weights, tasks, budgets and seeds, writing rows in modalkv's results format (library=kvpress).

kvpress 0.5.5 pins transformers < 5.3, so it runs in its own virtual environment:

    bash benchmarks/kvpress_setup.sh                 # creates .venv-kvpress (torch 2.13 CPU, kvpress 0.5.5)
    PYTHONPATH=src .venv-kvpress/bin/python benchmarks/kvpress_side_by_side.py \\
        --tasks niah_single fidelity --lengths 2048 --samples 3 --budgets 0.1 0.25 0.5 --out results/bench.csv
    .venv/bin/modalkv report results/bench.csv       # both libraries in one table and one plot

Protocol (kvpress's own pipeline): the chat-templated context is prefilled inside ``with press(model)``, the question
is appended afterwards uncompressed, then a greedy loop with explicit positions. The model is modalkv's converted
SmolLM2 folder (the same safetensors modalkv loads). KV bytes are the tensors the cache holds after prefill (kvpress's
per-head presses mask instead of freeing, so their bytes stay at the layer maximum). The fidelity task is
teacher-forced as in modalkv's runner.

Query-agnostic presses: ``kvzip`` (KVzipPress: after the prefill, the press reconstructs the context and masks the
lowest-scored pairs; it loads the tokenizer from ``model.config.name_or_path``, here the local folder) and
``expected_attention`` (ExpectedAttentionPress). kvpress's protocol already reads the question after the compressed
context, so the ``<task>_after`` tasks (``niah_single_after``, ``docqa_cast_after``, ...) give the same prompts, cut
at the same place, as modalkv's runner; their rows share modalkv's cell keys except ``library``:

    PYTHONPATH=src .venv-kvpress/bin/python benchmarks/kvpress_side_by_side.py --presses kvzip expected_attention \
        snapkv --tasks niah_single_after docqa_cast_after --samples 10 --out docs/results/query_agnostic_kvpress.csv
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

PRESSES = ["snapkv", "pyramidkv", "streamingllm", "h2o", "adakv", "knorm", "expected_attention", "kvzip"]


def make_press(name: str, budget: float):
    import kvpress as kp

    ratio = 1.0 - budget  # kvpress's compression_ratio is the share removed
    if name == "snapkv":
        return kp.SnapKVPress(compression_ratio=ratio)
    if name == "pyramidkv":
        return kp.PyramidKVPress(compression_ratio=ratio)
    if name == "streamingllm":
        return kp.StreamingLLMPress(compression_ratio=ratio)
    if name == "h2o":
        return kp.ObservedAttentionPress(compression_ratio=ratio)
    if name == "adakv":
        return kp.AdaKVPress(kp.SnapKVPress(compression_ratio=ratio))
    if name == "knorm":
        return kp.KnormPress(compression_ratio=ratio)
    if name == "expected_attention":
        return kp.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "kvzip":
        return kp.KVzipPress(compression_ratio=ratio)
    raise ValueError(f"unknown press {name!r}; known: {', '.join(PRESSES)}")


def reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS count (same as modalkv.measure, inlined: that module needs
    transformers 5.5, this environment has kvpress's pin)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_fields() -> dict:
    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    fields[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return dict(rss_bytes=fields.get("VmRSS"), cell_peak_rss_bytes=fields.get("VmHWM"))


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


@torch.no_grad()
def run_cell(model, tok, press, context_ids, tail_ids, max_new: int, teacher=None):
    """Prefill the context under the press, append ``tail_ids`` uncompressed, then greedy (or teacher-forced)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    n = context_ids.shape[1]
    t0 = time.perf_counter()
    if press is None:
        model.model(input_ids=context_ids, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=context_ids, past_key_values=cache)
    prefill_s = time.perf_counter() - t0
    kept = cache_bytes(cache)
    pos = n
    logps, tokens, step_ms = [], [], []
    if tail_ids is not None and tail_ids.shape[1]:
        out = model(input_ids=tail_ids, past_key_values=cache,
                    position_ids=torch.arange(pos, pos + tail_ids.shape[1])[None])
        pos += tail_ids.shape[1]
        logits = out.logits[0, -1]
        if teacher is not None:
            logps.append(torch.log_softmax(logits.float(), -1))
    else:
        logits = None
    feed = teacher
    steps = len(feed) if feed is not None else max_new
    for i in range(steps):
        if feed is not None:
            nxt = feed[i]
        else:
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            tokens.append(nxt)
        t1 = time.perf_counter()
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, position_ids=torch.tensor([[pos]]))
        step_ms.append((time.perf_counter() - t1) * 1e3)
        pos += 1
        logits = out.logits[0, -1]
        logps.append(torch.log_softmax(logits.float(), -1))
    return dict(tokens=tokens, logps=logps, prefill_s=prefill_s, kept=kept, step_ms=step_ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presses", nargs="+", default=PRESSES)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    p.add_argument("--tasks", nargs="+", default=["niah_single", "fidelity"])
    p.add_argument("--lengths", nargs="+", type=int, default=[2048])
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-folder", default=None, help="default: modalkv's converted SmolLM2 folder")
    p.add_argument("--out", default="results/bench.csv")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from modalkv.bench.runner import append_rows, cell_key, done_keys
    from modalkv.models import cache_dir

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    folder = args.model_folder or str(cache_dir() / "smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    model_name = "smollm2-135m"
    out = Path(args.out)
    done = done_keys(out)
    models = {}

    def get_model(impl):
        if impl not in models:
            models[impl] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                attn_implementation=impl).eval()
        return models[impl]

    for task_name in args.tasks:
        for length in args.lengths:
            for seed in range(args.samples):
                cells = [("full", 1.0)] + [(pr, b) for pr in args.presses for b in args.budgets]
                base = dict(library="kvpress", model=model_name, task=task_name, length=length, seed=seed)
                if all(cell_key(dict(base, method=m, budget=b)) in done for m, b in cells):
                    continue
                rows, reference = [], None
                if task_name == "fidelity":
                    import random

                    from modalkv.data import wiki_summaries

                    texts = wiki_summaries()
                    titles = sorted(texts)
                    random.Random(f"fidelity-{seed}").shuffle(titles)
                    ids = []
                    for t in titles:
                        ids += tok(texts[t] + "\n\n", add_special_tokens=False).input_ids
                        if len(ids) >= length + 48:
                            break
                    context_ids, tail_ids, teacher = torch.tensor([ids[: length]]), None, ids[length: length + 48]
                    sample, task = None, None
                else:
                    from modalkv.tasks import get_task

                    task = get_task(task_name)
                    sample = task.make(tok, length, seed)
                    if getattr(sample, "questions", None) or getattr(sample, "turns", None):
                        raise SystemExit(f"{task_name}: multi-question and chat tasks run only in modalkv's runner")
                    text = tok.apply_chat_template([{"role": "user", "content": sample.prompt}], tokenize=False,
                                                   add_generation_prompt=True)
                    cut = text.rindex(sample.question)  # as modalkv's runner cuts a deferred (_after) sample
                    context_ids = tok(text[:cut], return_tensors="pt", add_special_tokens=False).input_ids
                    tail_ids = tok(text[cut:], return_tensors="pt", add_special_tokens=False).input_ids
                    teacher = None
                for method, budget in cells:
                    impl = "eager" if method == "h2o" else "sdpa"
                    model = get_model(impl)
                    press = None if method == "full" else make_press(method, budget)
                    gc.collect()
                    reset_peak_rss()
                    try:
                        if teacher is not None:  # fidelity: the first logits come from the prompt's last position
                            r = run_cell(model, tok, press, context_ids[:, :-1], context_ids[:, -1:], 0,
                                         teacher=teacher[:-1])
                        else:
                            r = run_cell(model, tok, press, context_ids, tail_ids, sample.max_new_tokens)
                    except Exception as err:  # a press that crashes is reported as such, not dropped silently
                        msg = f"ERROR {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                        print(f"{task_name} L={length} seed={seed} {method}@{budget:g}: {msg}", flush=True)
                        rows.append(dict(base, method=method, budget=budget, prompt_tokens=context_ids.shape[1],
                                         output=msg))
                        continue
                    row = dict(base, method=method, budget=budget, prompt_tokens=context_ids.shape[1],
                               **rss_fields(),
                               kv_full_bytes=None, kv_kept_bytes=r["kept"], kv_allocated_bytes=r["kept"],
                               prefill_s=r["prefill_s"],
                               decode_ms=statistics.median(r["step_ms"][1:]) if len(r["step_ms"]) > 1 else None,
                               decode_steps=len(r["step_ms"]))
                    row["tokens_per_s"] = 1e3 / row["decode_ms"] if row["decode_ms"] else None
                    if teacher is not None:
                        logp = torch.stack(r["logps"])
                        if reference is None:
                            reference = logp
                        row["kl"] = float((reference.exp() * (reference - logp)).sum(-1).mean())
                        row["top1"] = float((reference.argmax(-1) == logp.argmax(-1)).float().mean())
                        row["score"] = row["top1"]
                    else:
                        output = tok.decode(r["tokens"], skip_special_tokens=True)
                        row["output"] = output.strip()
                        row["score"] = task.score(output, sample)
                    rows.append(row)
                full_bytes = rows[0]["kv_kept_bytes"]
                for row in rows:
                    row["kv_full_bytes"] = full_bytes
                    row["compression"] = full_bytes / row["kv_kept_bytes"] if row.get("kv_kept_bytes") else None
                append_rows(out, [r for r in rows if cell_key(r) not in done])
                print(f"{task_name} L={length} seed={seed}: " + ", ".join(
                    f"{r['method']}@{r['budget']:g}={r.get('score', float('nan')):.2f}" for r in rows), flush=True)


if __name__ == "__main__":
    main()

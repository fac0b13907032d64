"""Needle retrieval on SmolLM2-135M for every baseline and budget, and why SnapKV may lose the digits.

    python benchmarks/needle.py                      # 20 needles, budgets 0.1 0.25 0.5 (about 20 minutes)
    python benchmarks/needle.py --samples 3 --budgets 0.25

Each needle prompt (~2.2k tokens of offline Wikipedia summaries with "The secret code is NNNN." at a seeded depth,
the question last, in the chat template) is prefilled once; every method and budget then builds its cache from that
one prefill (``modalkv.replay``: identical to a normal prefill, tested) and decodes greedily.

Two settings:
* ``question-in-window`` (modalkv's default use, and SnapKV's paper): the question is part of the compressed
  prompt, so SnapKV's observation window is the question.
* ``question-after`` (what kvpress's pipeline does): the context alone is prefilled and compressed; the question is
  fed afterwards and appended uncompressed, so the observation window is the end of the haystack.
A key-norm scorer (kvpress's KnormPress: keep the lowest-norm keys) runs as an experiment beside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def chat_ids(tok, text: str, add_generation_prompt: bool = True) -> torch.Tensor:
    s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                add_generation_prompt=add_generation_prompt)
    return tok(s, return_tensors="pt", add_special_tokens=False).input_ids


@torch.no_grad()
def continue_greedy(model, cache, first_logits, start_pos: int, max_new: int, eos: int) -> list[int]:
    from modalkv import cache_kwargs

    out_ids = []
    nxt = first_logits.argmax(-1).view(1, 1)
    pos = start_pos
    for _ in range(max_new):
        t = int(nxt)
        if t == eos:
            break
        out_ids.append(t)
        out = model(input_ids=nxt, position_ids=torch.tensor([[pos]]), **cache_kwargs(model, cache))
        nxt = out.logits[:, -1].argmax(-1).view(1, 1)
        pos += 1
    return out_ids


def digits_kept(cache, digit_positions: list[int]) -> float:
    """Share of (layer, KV head) pairs that kept every digit token of the needle."""
    ok = total = 0
    want = torch.tensor(digit_positions)
    for layer in cache.managed_layers:
        for s in layer.heads:
            kept = s.pos[0, : s.n][s.valid[0, : s.n]]
            ok += int(torch.isin(want, kept).all())
            total += 1
    return ok / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--tokens", type=int, default=2200)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    p.add_argument("--methods", nargs="+", default=["streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "knorm"])
    p.add_argument("--after-methods", nargs="+", default=["snapkv", "adakv", "knorm"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "docs/results/needle.md"))
    args = p.parse_args()

    import pandas as pd
    from transformers.utils import logging as hf_logging

    from modalkv import cache_kwargs
    from modalkv.measure import pin_threads
    from modalkv.methods import make_method
    from modalkv.models import load_model
    from modalkv.replay import capture_prefill
    from modalkv.tasks import make_needle, score_contains

    hf_logging.disable_progress_bar()
    pin_threads(args.threads)
    model, tok = load_model(args.model)
    eos = tok.eos_token_id
    rows = []
    t0 = time.time()

    def method_arg(name):
        # knorm as these figures were taken: prompt compression only (every generated token kept)
        return make_method("knorm", evict_during_decode=False) if name == "knorm" else name

    for i in range(args.samples):
        sample = make_needle(tok, args.tokens, seed=i)
        ids = chat_ids(tok, sample.prompt)
        n = ids.shape[1]
        # digit token positions of the needle (SmolLM2 writes one digit per token)
        needle_ids = tok(f" {sample.answer}", add_special_tokens=False).input_ids
        flat = ids[0].tolist()
        start = next(j for j in range(n) if flat[j: j + len(needle_ids)] == needle_ids)
        digit_pos = list(range(start, start + len(needle_ids)))

        cap = capture_prefill(model, ids)
        for method in ["full", *args.methods]:
            for budget in ([1.0] if method == "full" else args.budgets):
                cache = cap.build_cache(model, method_arg(method), budget)
                kept = digits_kept(cache, digit_pos)
                gen = tok.decode(continue_greedy(model, cache, cap.logits[0, -1], n, args.max_new_tokens, eos))
                rows.append(dict(sample=i, setting="question-in-window", method=method, budget=budget,
                                 correct=score_contains(gen, sample.answer), output=gen.strip(),
                                 digits_kept=kept, answer=sample.answer, depth=sample.depth, tokens=n))
        del cap
        # kvpress-style: compress the context alone, then append the question uncompressed
        full_text = tok.apply_chat_template([{"role": "user", "content": sample.prompt}], tokenize=False,
                                            add_generation_prompt=True)
        cut = full_text.index(sample.question)
        ctx_ids = tok(full_text[:cut], return_tensors="pt", add_special_tokens=False).input_ids
        q_ids = tok(full_text[cut:], return_tensors="pt", add_special_tokens=False).input_ids
        cap = capture_prefill(model, ctx_ids)
        m = ctx_ids.shape[1]
        for method in args.after_methods:
            for budget in args.budgets:
                cache = cap.build_cache(model, method_arg(method), budget)
                kept = digits_kept(cache, digit_pos)
                with torch.no_grad():
                    out = model(input_ids=q_ids, position_ids=torch.arange(m, m + q_ids.shape[1])[None],
                                **cache_kwargs(model, cache))
                gen = tok.decode(continue_greedy(model, cache, out.logits[0, -1], m + q_ids.shape[1],
                                                 args.max_new_tokens, eos))
                rows.append(dict(sample=i, setting="question-after", method=method, budget=budget,
                                 correct=score_contains(gen, sample.answer), output=gen.strip(),
                                 digits_kept=kept, answer=sample.answer, depth=sample.depth, tokens=n))
        del cap
        done = pd.DataFrame(rows)
        acc = done[done.method == "full"].correct.mean()
        print(f"[{i + 1}/{args.samples} {time.time() - t0:.0f}s] prompt {n} tokens, full cache so far {acc:.2f}",
              flush=True)

    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    write_markdown(df, out, args)
    print(f"wrote {out}")


def write_markdown(df, out: Path, args) -> None:
    import transformers

    tokens = int(statistics.median(df.tokens))
    lines = [
        "# Needle retrieval on SmolLM2-135M-Instruct", "",
        f"Generated by `python benchmarks/needle.py {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')} "
        f"(torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s)). "
        f"{df['sample'].nunique()} needles: a 4-digit code at a seeded depth (10-90 %) in ~{tokens} tokens of "
        "offline Wikipedia summaries, the question last, chat template, greedy decoding; a needle counts when the "
        "code appears in the answer (RULER's string match). Budget = share of the prompt each (layer, KV head) "
        "keeps.", "",
        "## Accuracy (question in the compressed prompt)", "",
    ]
    inw = df[df.setting == "question-in-window"]
    table = inw.pivot_table(index="method", columns="budget", values="correct", aggfunc="sum")
    count = inw.pivot_table(index="method", columns="budget", values="correct", aggfunc="count")
    budgets = sorted(c for c in table.columns)
    lines.append("| method | " + " | ".join(f"{b:g}" for b in budgets) + " |")
    lines.append("|---|" + "---:|" * len(budgets))
    order = ["full", *[m for m in args.methods]]
    for m in order:
        if m in table.index:
            cells = [("" if pd_isnan(table.loc[m, b]) else f"{int(table.loc[m, b])}/{int(count.loc[m, b])}")
                     for b in budgets]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## SnapKV's digits: question in the window vs appended after compression (kvpress's pipeline)", "",
              "Accuracy and the share of (layer, KV head) pairs that kept every digit token of the needle.", "",
              "| setting | method | budget | correct | digits kept (mean share of heads) |",
              "|---|---|---:|---:|---:|"]
    for (setting, method, budget), g in df[df.method.isin(args.after_methods)].groupby(["setting", "method", "budget"]):
        lines.append(f"| {setting} | {method} | {budget:g} | {int(g.correct.sum())}/{len(g)} | "
                     f"{g.digits_kept.mean():.2f} |")
    out.write_text("\n".join(lines) + "\n")


def pd_isnan(x) -> bool:
    try:
        return x != x
    except Exception:
        return False


if __name__ == "__main__":
    main()

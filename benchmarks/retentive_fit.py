"""RetentiveKV's gate fit on SmolLM2 (what ``RetentiveKV(gates="fit")`` runs): its cost, every candidate it tried, and
a check that its calibration text shares no Wikipedia summary with the held-out prompts of
``benchmarks/sweep_retentive_fit.toml``.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/retentive_fit.py [--seeds 2 3] [--out docs/results/retentive_fit_trace.csv]
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/retentive_fit.py --model modalkv-vlm --out docs/results/retentive_fit_trace_vlm.csv

Writes one row per evaluated candidate (parameter changed, value, objective) and prints the report. The objective is
the mean KL(full || RetentiveKV) over the calibration continuations (see ``modalkv.methods.retentive_fit``); the
objective of plain eviction (``state_readout="none"``) on the same prompts, same budget, is printed for reference.
"""

from __future__ import annotations

import argparse
import csv
import random
import time

import torch

from modalkv import load_model
from modalkv.data import wiki_summaries
from modalkv.methods import retentive_fit as rf
from modalkv.methods.retentivekv import RetentiveKV
from modalkv.methods.spherical.codebooks import calibration_ids
from modalkv.tasks import get_task


def calibration_titles(model, tok, n_tokens: int) -> set[str]:
    """The summaries whose text appears in the first ``n_tokens`` calibration tokens."""
    text = tok.decode(calibration_ids(model, n_tokens)[0])
    texts = wiki_summaries()
    return {t for t in sorted(texts)[5000:5200] if texts[t][:60] in text}


def held_out_overlap(tok, titles: set[str], seeds, length: int = 2048, continuation: int = 48) -> dict:
    """Calibration summaries found in each held-out prompt (niah tasks: in the haystack; fidelity: as the runner
    builds it)."""
    texts = wiki_summaries()
    out = {}
    for task in ("niah_single", "niah_multikey"):
        for seed in seeds:
            context = get_task(task).make(tok, length, seed).context
            out[(task, seed)] = sorted(t for t in titles if texts[t] in context)
    for seed in seeds:
        order = sorted(texts)
        random.Random(f"fidelity-{seed}").shuffle(order)
        n, used = 0, []
        for t in order:
            n += len(tok(texts[t] + "\n\n", add_special_tokens=False).input_ids)
            used.append(t)
            if n >= length + continuation:
                break
        out[("fidelity", seed)] = sorted(set(used) & titles)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 3], help="held-out text seeds to check (SmolLM2 only)")
    ap.add_argument("--out", default="docs/results/retentive_fit_trace.csv")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    settings = rf.FIT_SETTINGS
    if args.model == "smollm2-135m":
        titles = calibration_titles(model, tok, settings["prompts"] * (settings["tokens"] + settings["steps"]))
        print(f"calibration text: {len(titles)} summaries")
        for (task, seed), hit in held_out_overlap(tok, titles, args.seeds).items():
            print(f"  held-out {task} seed {seed}: {len(hit)} shared summaries {hit}")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = rf.fit_gates(model, RetentiveKV(), **settings)
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    t0 = time.perf_counter()
    objective = rf._Objective(model, rf.calibration_prompts(model, settings["prompts"], settings["tokens"],
                                                            settings["steps"]),
                              settings["budget"], RetentiveKV(state_readout="none"))
    plain = objective(rf.HAND)
    print(f"fit: {report.seconds:.1f} s, {report.forwards} forward passes, {report.candidates} candidates, "
          f"{report.prompts} prompts x {report.prompt_tokens} tokens + {report.steps} continuation tokens, "
          f"budget {report.budget}; backbone unchanged: {unchanged}")
    print(f"objective (mean KL): hand {report.objective_start:.6f} -> fitted {report.objective:.6f}; "
          f"plain eviction {plain:.6f} ({time.perf_counter() - t0:.1f} s)")
    print(f"fitted: {report.params}")
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["parameter", "value", "objective_kl"])
        for name, value, obj in report.trace:
            w.writerow([name, "" if value is None else value, f"{obj:.6f}"])
        w.writerow(["fitted", "", f"{report.objective:.6f}"])
        w.writerow(["plain_eviction", "", f"{plain:.6f}"])
        w.writerow(["fit_seconds", f"{report.seconds:.1f}", ""])
        w.writerow(["fit_forwards", report.forwards, ""])
        for name in rf.GATE_FIELDS:
            w.writerow([f"fitted_{name}", getattr(report.params, name), ""])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""How the bundled VLM's first layer attends to the image: the quantities HAE's Dual-Attention Pruning thresholds.

For easy-VQA test questions (image, then the question), prefill with HAE at the paper's thresholds and read DAP's
per-image-token global attention share g_j / sum g (printed relative to the uniform share 1/|V|) and peak attention
m_j from the instruction's text tokens (docs/results/seeds_hae_madakv.md, section 3).

    PYTHONPATH=src .venv/bin/python benchmarks/hae_attention.py --n 12
"""

from __future__ import annotations

import argparse

import torch

from modalkv import KVCache, cache_kwargs, vlm
from modalkv.measure import pin_threads
from modalkv.models import load_model


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    pin_threads(args.threads)
    model, proc = load_model("modalkv-vlm")
    q, _, paths = vlm.easy_vqa_split("test")
    qs = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    shares, peaks = [], []
    for i in range(args.n):
        ids = torch.tensor([vlm.prompt_ids(proc.tokenizer, q[i], model.config.image_seq_length)])
        cache = KVCache(model, "hae", 1.0)
        cache.set_modality((ids == model.config.image_token_id).long())
        model(input_ids=ids, pixel_values=vlm.load_images([paths[i]], proc), **cache_kwargs(model, cache))
        m = cache.method
        vis = ids[0] == model.config.image_token_id
        g, peak = m._g[0][vis], m._peak[0][vis]
        shares.append(g / g.sum() * vis.sum())
        peaks.append(peak)
        print(f"{ids.shape[1]:4d} tokens  {q[i][:42]:42s} share/uniform q0/.1/.5/.9/1: "
              f"{[round(float(x), 2) for x in shares[-1].quantile(qs)]}  peak: {[round(float(x), 4) for x in peak.quantile(qs)]}")
    s, p = torch.cat(shares), torch.cat(peaks)
    print(f"all {args.n} questions: share/uniform min {float(s.min()):.2f}, median {float(s.median()):.2f}, "
          f"max {float(s.max()):.2f}; peak min {float(p.min()):.4f}, max {float(p.max()):.4f}")


if __name__ == "__main__":
    main()

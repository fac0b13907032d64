"""How well Spherical KV's direction codebooks represent a real model's keys, per tier (group size : bits).

Codebooks are fitted exactly as ``SphericalKV(codebooks="calibrate")`` fits them (spherical k-means on post-RoPE keys
of the calibration text); they are then applied to the keys of a different prompt (a RULER needle haystack). For each
tier: the RMS chord error ``||u - C_code||`` of the unit group directions, the key bits per token and head, and the
error of the attention distribution of the prompt's last 8 queries (L1 distance between softmax over exact keys and
softmax over keys rebuilt from the codes with 8-bit page-scaled radii), averaged over all layers and heads.

    PYTHONPATH=src .venv/bin/python benchmarks/spherical_tiers.py --model smollm2-135m
"""

from __future__ import annotations

import argparse

import torch

SPECS = ["16:6", "16:4", "32:3", "8:8", "4:8", "4:6", "2:6", "2:4"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from modalkv.methods.spherical import calibrate, directions, encode_directions, parse_tiers
    from modalkv.models import load_model
    from modalkv.replay import capture_prefill
    from modalkv.tasks import make_needle

    model, tok = load_model(args.model)
    ids = tok(make_needle(tok, args.length, seed=0).prompt, return_tensors="pt").input_ids
    cap = capture_prefill(model, ids)
    print(f"{args.model}: codebooks fitted on the calibration text, applied to a {ids.shape[1]}-token needle prompt\n")
    print("| tier g:bits | key bits / token / head | chord error (RMS) | attention L1 error (last 8 queries) |")
    print("|---|---|---|---|")
    for spec in SPECS:
        tiers = parse_tiers(spec)
        g, bits = tiers[0]
        books = calibrate(model, tiers, 1024, 15, 42)
        chord, l1, d = [], [], None
        for idx, (query, keys, _, _, scaling) in cap.layers.items():
            k = keys[0].float()  # [H, n, d]
            H, n, d = k.shape
            r, u = directions(k, g)
            G = d // g
            q = query[0, :, -8:].float()  # [Hq, 8, d]
            Gq = q.shape[0] // H
            for h in range(H):
                book = books.books[idx][0][h]
                codes = encode_directions(u[h][None], book)[0]
                rec = book[torch.arange(G)[None, :], codes]
                chord.append(float((u[h] - rec).norm(dim=-1).pow(2).mean().sqrt()))
                scale = r[h].amax(0).clamp(min=1e-12)  # one page-wide scale per group (P = whole prompt)
                r_hat = torch.round(255 * r[h] / scale) / 255 * scale
                k_hat = (rec * r_hat[..., None]).reshape(n, d)
                qh = q[h * Gq : (h + 1) * Gq].reshape(-1, d) * scaling
                p = torch.softmax(qh @ k[h].T, -1)
                p_hat = torch.softmax(qh @ k_hat.T, -1)
                l1.append(float((p - p_hat).abs().sum(-1).mean()))
        print(f"| {g}:{bits} | {(d // g) * (8 + bits)} | {sum(chord) / len(chord):.3f} | {sum(l1) / len(l1):.3f} |")
    print(f"\n(dense key: {d * 16} bits in fp16, {d * 32} in fp32)")


if __name__ == "__main__":
    main()

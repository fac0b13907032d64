"""Spherical KV's direction codebooks: spherical k-means, fitting on keys, and the calibration on the model's own keys.

Paper: Chauhan et al., "Spherical KV: Angle-Domain Attention and Rate-Distortion Retention for KV Caches", arXiv
2605.18856 (v2). :func:`calibrate` is the explicit calibration step: it runs the model once over a fixed text and fits
one codebook per (layer, KV head, group, tier); the result is remembered per model, so a :class:`SphericalKV` cache
built after it (``codebooks="calibrate"``, the default) reuses it instead of calibrating in its ``setup``.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from ...cache import cache_kwargs
from ...data import wiki_summaries
from .codes import directions, encode_directions, rope_pairs


def spherical_kmeans(x: torch.Tensor, K: int, iters: int = 20, seed: int = 42) -> torch.Tensor:
    """Unit-norm centroids [NB, K, g] of unit vectors x [NB, N, g] (cosine k-means, one bucket per leading index).

    Initialisation: farthest points (a seeded first point, then the point least similar to all chosen so far); an
    empty cluster (duplicate points) is re-seeded with the point worst served by its centroid. CHOICE: flat k-means, one restart (the authors: hierarchical for K = 64
    and K = 16, 8 to 20 restarts).
    """
    NB, N, g = x.shape
    gen = torch.Generator().manual_seed(seed)
    if N == 0:
        c = torch.randn(NB, K, g, generator=gen)
        return (c / c.norm(dim=-1, keepdim=True)).to(x.device)
    # farthest-point initialisation: a seeded first point, then repeatedly the point least similar to those chosen
    first = torch.randint(0, N, (NB,), generator=gen).to(x.device)
    chosen = [first]
    best = torch.bmm(x, x.gather(1, first.view(NB, 1, 1).expand(-1, 1, g)).transpose(1, 2))[..., 0]  # [NB, N]
    for _ in range(1, K):
        nxt = best.argmin(-1)
        chosen.append(nxt)
        sim = torch.bmm(x, x.gather(1, nxt.view(NB, 1, 1).expand(-1, 1, g)).transpose(1, 2))[..., 0]
        best = torch.maximum(best, sim)
    c = x.gather(1, torch.stack(chosen, 1)[..., None].expand(-1, -1, g)).clone()
    for _ in range(iters):
        sim = torch.bmm(x, c.transpose(1, 2))  # [NB, N, K]
        best, assign = sim.max(-1)
        sums = torch.zeros_like(c).scatter_add_(1, assign[..., None].expand(-1, -1, g), x)
        counts = torch.zeros(NB, K, device=x.device).scatter_add_(1, assign, torch.ones_like(best))
        norms = sums.norm(dim=-1, keepdim=True)
        new = torch.where(norms > 1e-12, sums / norms.clamp(min=1e-12), c)
        empty = counts == 0
        if bool(empty.any()):
            worst = best.argsort(-1)[:, :K]  # the points farthest from their centroid, per bucket
            fill = x.gather(1, worst[..., None].expand(-1, -1, g))
            new = torch.where(empty[..., None], fill, new)
        c = new
    return c


@dataclass
class Codebooks:
    """Unit-norm direction codebooks per managed layer: ``books[layer_idx][t]`` is [H, G_t, K_t, g_t] for tier t,
    ``chord[layer_idx][t]`` the RMS chord error ``||u - C_code||`` [H, G_t] on the data they were fitted on."""

    tiers: tuple
    books: dict
    chord: dict

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for per in self.books.values() for t in per)

    def sha256(self) -> bytes:
        """SHA-256 of every codebook and chord error, layer by layer (a saved cache checks it on load)."""
        h = hashlib.sha256()
        for layer_idx in sorted(self.books):
            for t in (*self.books[layer_idx], *self.chord[layer_idx]):
                h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
        return h.digest()


def fit_codebooks(keys: dict, tiers, iters: int = 20, seed: int = 42, max_vectors: int = 100_000,
                  pairs: str = "contiguous") -> Codebooks:
    """Fit codebooks on post-RoPE keys: ``keys[layer_idx]`` = [H, N, d] (N tokens); with ``pairs="rope"`` the
    groups are taken in :func:`rope_pairs` order."""
    books, chord = {}, {}
    for layer_idx, k in keys.items():
        H, N, d = k.shape
        if pairs == "rope":
            k = k[..., rope_pairs(d).to(k.device)]
        per_b, per_c = [], []
        for g, bits in tiers:
            if d % g:
                raise ValueError(f"SphericalKV: head dim {d} is not divisible by the tier group size {g}")
            G = d // g
            _, u = directions(k, g)  # [H, N, G, g]
            if N > max_vectors:
                u = u[:, torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:max_vectors]]
            bucket = u.permute(0, 2, 1, 3).reshape(H * G, -1, g)
            c = spherical_kmeans(bucket, 1 << bits, iters, seed).view(H, G, 1 << bits, g)
            codes = torch.stack([encode_directions(u[h][None], c[h])[0] for h in range(H)])  # [H, N, G]
            rec = c.gather(2, codes.permute(0, 2, 1)[..., None].expand(-1, -1, -1, g))  # [H, G, N, g]
            err = (u.permute(0, 2, 1, 3) - rec).norm(dim=-1).pow(2).mean(-1).sqrt()  # [H, G]
            per_b.append(c.contiguous())
            per_c.append(err)
        books[layer_idx], chord[layer_idx] = per_b, per_c
    return Codebooks(tuple(tiers), books, chord)


#: model -> the codebooks calibrate() fitted for it, by arguments (held weakly: they go with the model)
CALIBRATED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def calibration_ids(model, tokens: int, seed: int = 42) -> torch.Tensor:
    """Deterministic calibration input: 200 Wikipedia summaries (titles sorted, from the 5000th on; not the demo
    articles, though the needle haystacks, which draw from all summaries, may include some) through the model's own
    tokenizer when both are available offline, else seeded random token ids (tiny test models)."""
    try:
        path = (getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
                or getattr(model.config.get_text_config(decoder=True), "_name_or_path", ""))  # a VLM's language model
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        texts = wiki_summaries()
        text = "\n\n".join(texts[t] for t in sorted(texts)[5000:5200])
        ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
        if ids.shape[1] >= min(tokens, 256):
            return ids
    except Exception:  # noqa: BLE001 - any missing piece means: fall back to random ids
        pass
    vocab = model.config.get_text_config(decoder=True).vocab_size
    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def calibrate(model, tiers, tokens: int = 2048, iters: int = 20, seed: int = 42, pairs: str = "contiguous",
              span: int = 0) -> Codebooks:
    """Codebooks fitted on the model's own post-RoPE keys over :func:`calibration_ids`, remembered per model and
    arguments. A :class:`~modalkv.methods.spherical.SphericalKV` cache calls it in ``setup`` with its ``tier_spec``,
    ``calib_tokens``, ``kmeans_iters``, ``seed``, ``pairs`` and ``calib_span``; calling it beforehand with the same
    arguments does the calibration once, ahead of the first cache (e.g. outside a timed region).

    ``span`` > ``tokens``: the calibration text is cut into ``ceil(span / tokens)`` chunks, each run as its own
    sequence at positions spread evenly over ``[0, span)``, so the keys' RoPE rotations cover the positions up to
    ``span`` at the cost of ``tokens`` tokens (CHOICE, ours; 0: one sequence at positions ``[0, tokens)``)."""
    key = (tuple(tiers), tokens, iters, seed, pairs, span)
    per_model = CALIBRATED.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    ids = calibration_ids(model, tokens, seed).to(model.device)
    n = ids.shape[1]
    chunks = max(1, -(-span // n)) if span > n else 1
    size = -(-n // chunks)
    keys: dict[int, list[torch.Tensor]] = {}
    for c in range(chunks):
        part = ids[:, c * size:(c + 1) * size]
        start = c * span // chunks if chunks > 1 else 0
        position_ids = torch.arange(start, start + part.shape[1], device=ids.device)[None]
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        model(input_ids=part, position_ids=position_ids, **cache_kwargs(model, cache))
        for i, layer in enumerate(cache.layers):
            if type(layer) is DynamicLayer:
                keys.setdefault(i, []).append(layer.keys[0].float())
    keys = {i: torch.cat(k, dim=1) for i, k in keys.items()}  # [H, tokens, d] per layer
    books = fit_codebooks(keys, tiers, iters, seed, pairs=pairs)
    per_model[key] = books
    return books

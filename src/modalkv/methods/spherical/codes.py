"""Spherical KV's codes: the precision tiers, how a key becomes a radius and a direction code, and the (re)encoding
of a store's entries into tiers.

Paper: Chauhan et al., "Spherical KV: Angle-Domain Attention and Rate-Distortion Retention for KV Caches", arXiv
2605.18856 (v2). A tier is (group size ``g``, direction bits ``b``): each key is split into groups of ``g`` dims,
each stored as a radius and the ``b``-bit code of its nearest unit codeword. The bit packing and the direction
encoding are those of the coded storage (:mod:`modalkv.storage.spherical`), re-exported here.
"""

from __future__ import annotations

import torch

from ...decoding import Extra
from ...storage.spherical import code_bytes, directions, encode_directions, pack_codes, unpack_codes

#: the per-entry values Spherical KV keeps (its method declares them)
TIER = Extra("tier", "the entry's tier, 1..T (the size of its key's code); follows the payload's layout")
OMEGA = Extra("omega", "the entry's attention weight: window attention at prefill, then a moving average of the "
              "attention of the decode steps")
PRESETS = {"paper": "16:6,16:4,32:3"}  # the authors' b1, b2, b3 (g = 16 / 16 / 32 dims, 6 / 4 / 3 bits)


def parse_tiers(spec: str) -> tuple[tuple[int, int], ...]:
    """``"16:6,16:4,32:3"`` -> ((group size, direction bits) of b1, b2, b3); ``"paper"`` is the authors' tiers."""
    spec = PRESETS.get(spec, spec)
    tiers = []
    for part in spec.split(","):
        g, colon, b = part.strip().partition(":")
        if not colon or not g.isdigit() or not b.isdigit():
            raise ValueError(f"SphericalKV.tiers {spec!r}: write group:bits per tier, e.g. '16:6,16:4,32:3'")
        g, b = int(g), int(b)
        if g < 1 or not 1 <= b <= 8:
            raise ValueError(f"SphericalKV.tiers {spec!r}: group size must be >= 1 and bits in 1..8")
        tiers.append((g, b))
    if not 1 <= len(tiers) <= 3:
        raise ValueError(f"SphericalKV.tiers {spec!r}: give 1 to 3 tiers (best first)")
    return tuple(tiers)


def rope_pairs(d: int) -> torch.Tensor:
    """The dimension order that puts each RoPE rotation pair side by side (transformers' rotate-half layout pairs
    dim i with dim i + d/2): ``[0, d/2, 1, d/2 + 1, ...]``."""
    half = torch.arange(d // 2)
    return torch.stack([half, half + d // 2], -1).flatten()


def encode_store(store, books: list, tiers: torch.Tensor) -> None:
    """(Re)lay out a store's entries: slot s gets tier ``tiers[:, s]`` (1..T; 0 = dropped) of its current key, each
    tier's tokens sorted by position (:meth:`~modalkv.storage.spherical.SphericalPayload.encode`)."""
    payload = store.payload
    payload.books = books
    order, ok = payload.encode(tiers, store.pos, store.valid, store.n)
    store.reorder(order, ok)
    if TIER.name in store.extras:
        store.extras[TIER.name][:, : store.n] = payload.tiers(store.n).float()


__all__ = ["OMEGA", "PRESETS", "TIER", "code_bytes", "directions", "encode_directions", "encode_store", "pack_codes", "parse_tiers",
           "rope_pairs", "unpack_codes"]

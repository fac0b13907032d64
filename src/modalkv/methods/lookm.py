"""LOOK-M: text-prior eviction at prefill, with the evicted entries merged into the kept ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..decoding import Extra
from ..modality import TEXT
from ..protocol import Selection
from ..scoring import accumulated_scores, group_reduce
from .base import Method, PrefillContext, check_range, last_real

MERGED = Extra("merged_weight", "total merge weight of the entries merged into this one (LOOK-M's running average)")


@dataclass
class LookM(Method):
    """LOOK-M (Look-Once KV merging).

    Paper: Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context
    Inference", Findings of EMNLP 2024 (arXiv 2406.18139). Once, at prefill: accumulated attention (as H2O) with every
    text token ranked above every visual token; keep a recent window plus the best; merge each evicted entry into the
    kept entry whose key is most similar (cosine). Merging changes kept entries, so LOOK-M equals a masked full cache
    only with ``merge="none"``.

    Parameters
    ----------
    recent_ratio : float
        Share of the budget given to the most recent tokens (paper: half).
    text_prior : bool
        Rank text above visual tokens (the paper's prior).
    merge : "average" | "pivotal" | "weighted" | "none"
        The paper's merging strategies, or none.
    merge_threshold : "mean" | "none"
        Merge only evicted entries whose best similarity is above the head's mean (the authors' code), or all.
    gqa_reduce : "mean" | "max"
        How the query heads of one KV group combine.

    CHOICE: see docs/methods/lookm.md (also: merging while decoding under ``decode_budget``; refused with quantized
    storage).
    """

    recent_ratio: float = 0.5
    text_prior: bool = True
    merge: Literal["average", "pivotal", "weighted", "none"] = "average"
    merge_threshold: Literal["mean", "none"] = "mean"
    gqa_reduce: Literal["mean", "max"] = "mean"
    chunk: int = 2048

    name = "lookm"
    extras = (MERGED,)  # kept only with decode_budget and merge "average" / "weighted"
    summary = "Text-prior eviction at prefill, evicted entries merged into the most similar kept ones (Wan et al., 2024)"

    def validate(self) -> None:
        check_range(type(self).__name__, "recent_ratio", self.recent_ratio, 0.0, 1.0)
        check_range(type(self).__name__, "chunk", self.chunk, 1)

    def setup(self, cache) -> None:
        super().setup(cache)
        if self._merges_while_decoding() and cache.quantizer is not None:
            raise ValueError("lookm merges the entries decode_budget evicts into kept entries, which needs dense "
                             "storage: use merge='none' with quantize, or no quantize")

    def _merges_while_decoding(self) -> bool:
        cache = self.cache
        return self.merge != "none" and cache is not None and cache.budget.decode is not None

    def _tracks_weight(self) -> bool:
        return self._merges_while_decoding() and self.merge in ("average", "weighted")

    def prefill(self, ctx: PrefillContext) -> Selection:
        acc = accumulated_scores(ctx.query, ctx.keys, ctx.scaling, ctx.real)
        acc = group_reduce(acc, ctx.num_kv_heads, self.gqa_reduce)
        if self.text_prior:  # shift text above the best visual score: an exact two-level ordering
            is_text = (ctx.modality == TEXT)[:, None, :]
            acc = acc + is_text * (acc.amax(-1, keepdim=True) + 1.0)
        k = ctx.budget_tokens
        recent = last_real(ctx.real, torch.ceil(k.double() * self.recent_ratio).long())
        idx = self.top(ctx, acc, k, force=recent)
        if self.merge == "none":
            return Selection(idx)
        keys, values, weight = self._merged(ctx, idx)
        extras = {MERGED.name: weight} if self._tracks_weight() else {}
        return Selection(idx, keys=keys, values=values, extras=extras)

    def _merged(self, ctx: PrefillContext, idx: torch.Tensor):
        """Keys and values [B, H, n, d] whose kept positions hold the merged entries, and the merge weight each kept
        position received [B, H, n] float32."""
        keys, values = ctx.keys.clone(), ctx.values.clone()
        B, H, n, d = keys.shape
        merged_weight = torch.zeros(B, H, n, device=keys.device)
        for h in range(H):
            sel = idx[:, h]  # [B, k], -1 unused
            ok = sel >= 0
            safe = sel.clamp(min=0)
            kept_k = keys[:, h].gather(1, safe[..., None].expand(-1, -1, d)).float()
            kept_v = values[:, h].gather(1, safe[..., None].expand(-1, -1, values.shape[-1])).float()
            rows = torch.arange(B, device=keys.device)[:, None].expand_as(safe)
            kept_mask = torch.zeros(B, n, dtype=torch.bool, device=keys.device)
            kept_mask[rows[ok], safe[ok]] = True
            evicted = ctx.real & ~kept_mask
            best, sim = self._best_match(keys[:, h].float(), kept_k, ok)
            use = evicted
            if self.merge_threshold == "mean":
                mean = (sim * evicted).sum(-1, keepdim=True) / evicted.sum(-1, keepdim=True).clamp(min=1)
                use = evicted & (sim > mean)
            weight = use.float() if self.merge != "weighted" else use.float() * sim.clamp(min=0)
            acc_k = torch.zeros_like(kept_k).scatter_add_(1, best[..., None].expand(-1, -1, d),
                                                          keys[:, h].float() * weight[..., None])
            acc_v = torch.zeros_like(kept_v).scatter_add_(1, best[..., None].expand(-1, -1, kept_v.shape[-1]),
                                                          values[:, h].float() * weight[..., None])
            mass = torch.zeros(B, sel.shape[1], device=keys.device).scatter_add_(1, best, weight)[..., None]
            if self.merge == "pivotal":
                new_k = torch.where(mass > 0, (kept_k + acc_k / mass.clamp(min=1e-12)) / 2, kept_k)
                new_v = torch.where(mass > 0, (kept_v + acc_v / mass.clamp(min=1e-12)) / 2, kept_v)
            else:  # average / weighted
                new_k, new_v = (kept_k + acc_k) / (1 + mass), (kept_v + acc_v) / (1 + mass)
            keys[rows[ok], h, safe[ok]] = new_k[ok].to(keys.dtype)
            values[rows[ok], h, safe[ok]] = new_v[ok].to(values.dtype)
            merged_weight[rows[ok], h, safe[ok]] = mass[..., 0][ok]
        return keys, values, merged_weight

    def _best_match(self, keys: torch.Tensor, kept: torch.Tensor, ok: torch.Tensor):
        """For every position: the kept slot with the most similar key (cosine) and that similarity. [B, n]."""
        B, n, _ = keys.shape
        kn = F.normalize(kept, dim=-1)
        best = torch.zeros(B, n, dtype=torch.long, device=keys.device)
        sim = torch.zeros(B, n, device=keys.device)
        for s in range(0, n, self.chunk):
            q = F.normalize(keys[:, s: s + self.chunk], dim=-1)
            c = torch.matmul(q, kn.transpose(1, 2)).masked_fill(~ok[:, None, :], float("-inf"))
            sim[:, s: s + self.chunk], best[:, s: s + self.chunk] = c.max(-1)
        return best, sim.nan_to_num(0.0, neginf=0.0)

    # -- decode_budget: the entries the cache evicts are merged too ------------------------------------------------
    def on_core_evict(self, group, victims: torch.Tensor, use: torch.Tensor | None) -> None:
        """Merge the entries ``victims`` [B, H', m] (``use`` marks the real ones) into the most similar entry that
        stays, by the rule of ``merge`` (see the class notes)."""
        if self.merge == "none":
            return
        K, V = group.keys_values()  # [B, H', n, d]: writable views of the stored entries (dense storage)
        B, H, n, d = K.shape
        m = victims.shape[-1]
        victims = victims.expand(B, H, m)
        use = torch.ones(B, H, m, dtype=torch.bool, device=K.device) if use is None else use.expand(B, H, m)
        gone = torch.zeros(B, H, n + 1, dtype=torch.bool, device=K.device)
        gone.scatter_(2, victims.masked_fill(~use, n), True)
        stays = group.valid & ~gone[..., :n]
        idx = victims[..., None]
        k_e = K.gather(2, idx.expand(-1, -1, -1, d)).float()  # [B, H', m, d]
        v_e = V.gather(2, idx.expand(-1, -1, -1, V.shape[-1])).float()
        sim = torch.matmul(F.normalize(k_e, dim=-1), F.normalize(K.float(), dim=-1).transpose(-1, -2))
        sim, best = sim.masked_fill(~stays[:, :, None, :], float("-inf")).max(-1)  # [B, H', m]
        use = use & torch.isfinite(sim)  # a row with nothing left to merge into
        if self.merge_threshold == "mean":
            count = use.sum(-1, keepdim=True).clamp(min=1)
            mean = (sim.nan_to_num(0.0, neginf=0.0) * use).sum(-1, keepdim=True) / count
            use = use & (sim >= mean)
        if not bool(use.any()):
            return
        a = use.float() if self.merge != "weighted" else use.float() * sim.clamp(min=0)
        tracked = self._tracks_weight()
        w_all = group.extra(MERGED.name) if tracked else None
        w_e = w_all.gather(2, victims) if tracked else torch.zeros_like(a)
        a = a * (1 + w_e)
        # entries mapped to the same target, summed in victim space ([B, H', m, m]); each victim then writes its
        # target's new value (the same for every victim of one target)
        same = (best[..., :, None] == best[..., None, :]) & use[..., None, :]
        k_t = K.gather(2, best[..., None].expand(-1, -1, -1, d)).float()
        v_t = V.gather(2, best[..., None].expand(-1, -1, -1, V.shape[-1])).float()
        if self.merge == "pivotal":
            share = same.float() / same.sum(-1, keepdim=True).clamp(min=1)
            new_k = (k_t + torch.matmul(share, k_e)) / 2
            new_v = (v_t + torch.matmul(share, v_e)) / 2
        else:
            add = same.float() * a[..., None, :]
            w_t = w_all.gather(2, best) if tracked else torch.zeros_like(a)
            total = (1 + w_t + add.sum(-1))[..., None]
            new_k = (k_t * (1 + w_t)[..., None] + torch.matmul(add, k_e)) / total
            new_v = (v_t * (1 + w_t)[..., None] + torch.matmul(add, v_e)) / total
            if tracked:
                w_new = torch.where(use, total[..., 0] - 1, w_e)
        # an unused victim writes its own entry back into its own slot (no change, no clash with a target)
        target = torch.where(use, best, victims)
        new_k = torch.where(use[..., None], new_k, k_e)
        new_v = torch.where(use[..., None], new_v, v_e)
        K.scatter_(2, target[..., None].expand(-1, -1, -1, d), new_k.to(K.dtype))
        V.scatter_(2, target[..., None].expand(-1, -1, -1, V.shape[-1]), new_v.to(V.dtype))
        if tracked:
            w_all.scatter_(2, target, w_new)

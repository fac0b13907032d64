"""LOOK-M: text-prior eviction at prefill, with the evicted entries merged into the kept ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..cache import Selection
from ..modality import TEXT
from ..scoring import accumulated_scores, group_reduce
from .base import Method, PrefillContext, check_range, last_real


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

    CHOICE: see docs/methods/lookm.md.
    """

    recent_ratio: float = 0.5
    text_prior: bool = True
    merge: Literal["average", "pivotal", "weighted", "none"] = "average"
    merge_threshold: Literal["mean", "none"] = "mean"
    gqa_reduce: Literal["mean", "max"] = "mean"
    chunk: int = 2048

    name = "lookm"
    summary = "Text-prior eviction at prefill, evicted entries merged into the most similar kept ones (Wan et al., 2024)"

    def validate(self) -> None:
        check_range(type(self).__name__, "recent_ratio", self.recent_ratio, 0.0, 1.0)
        check_range(type(self).__name__, "chunk", self.chunk, 1)

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
        keys, values = self._merged(ctx, idx)
        return Selection(idx, keys=keys, values=values)

    def _merged(self, ctx: PrefillContext, idx: torch.Tensor):
        """Keys and values [B, H, n, d] whose kept positions hold the merged entries."""
        keys, values = ctx.keys.clone(), ctx.values.clone()
        B, H, n, d = keys.shape
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
        return keys, values

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

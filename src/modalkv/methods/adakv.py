"""Ada-KV: budgets that differ per head inside a layer (over SnapKV scores), really freed per head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PrefillContext, check_range
from .snapkv import SnapKV
from ..protocol import Selection
from ..scoring import apply_caps, largest_remainder


@dataclass
class AdaKV(SnapKV):
    """Adaptive head-wise budget allocation on top of SnapKV's scores.

    Paper: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
    Inference", NeurIPS 2025 (arXiv 2407.11550). Within a layer: the global top ``H B`` of all heads' scores gives head
    h ``c_h`` entries; its budget is ``B_h = (1 - alpha) c_h + alpha B``, and it keeps its own top ``B_h`` plus the
    window. Each head's store holds exactly its own entries (the memory is released, not masked).

    Parameters
    ----------
    alpha : float
        Safeguard floor (paper's LongBench scripts: 0.2).
    window, kernel, pooling, gqa_reduce
        As in :class:`SnapKV`.

    CHOICE: see docs/methods/adakv.md (largest-remainder rounding to SnapKV's exact total).
    """

    alpha: float = 0.2

    name = "adakv"
    summary = "SnapKV scores with per-head budgets (global top-k across heads), per-head memory freed (Feng et al., 2025)"

    def validate(self) -> None:
        super().validate()
        check_range(type(self).__name__, "alpha", self.alpha, 0.0, 1.0)

    def head_budgets(self, ctx: PrefillContext, scores: torch.Tensor, free: torch.Tensor, window: torch.Tensor):
        """Window-free budgets per head [B, H] from the layer's scores (window entries excluded)."""
        B, H, n = scores.shape
        s = scores.float().masked_fill(window[:, None, :] | ~ctx.real[:, None, :], float("-inf"))
        s = apply_caps(s, ctx.modality, ctx.caps)
        flat = s.reshape(B, H * n)
        total = free * H
        order = flat.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(H * n, device=s.device).expand(B, -1).contiguous())
        won = (rank < total[:, None]) & (flat > float("-inf"))
        c = won.view(B, H, n).sum(-1)  # [B, H]
        weights = (1 - self.alpha) * c.double() + self.alpha * free.double()[:, None]
        budgets = largest_remainder(weights, total)
        # a head cannot keep more candidates than it has; give the surplus to heads with room (rare)
        room = (s > float("-inf")).sum(-1)
        for _ in range(H):
            surplus = (budgets - room).clamp(min=0)
            if not bool(surplus.any()):
                break
            budgets = budgets - surplus
            spare = (room - budgets).clamp(min=0)
            budgets = budgets + largest_remainder(spare.double() + 1e-9 * (spare > 0), surplus.sum(-1)).minimum(spare)
        return budgets

    def prefill(self, ctx: PrefillContext) -> Selection:
        k = ctx.budget_tokens
        window = self.window_mask(ctx, k)
        w = window.sum(-1)
        scores = self.scores(ctx)
        budgets = self.head_budgets(ctx, scores, k - w, window) + w[:, None]
        return Selection(self.top(ctx, scores, budgets, force=window))

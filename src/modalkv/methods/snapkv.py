"""SnapKV: keep what the last prompt tokens (the observation window) attend to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .base import Method, PrefillContext, check_range, last_real
from ..protocol import Selection
from ..scoring import group_reduce, pool1d, window_scores


@dataclass
class SnapKV(Method):
    """Observation-window selection, once at the end of prefill; generated tokens are appended.

    Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
    (arXiv 2404.14469). Score ``s(i) = sum_{j in W} softmax(q_j k^T)_i`` over the last ``window`` prompt queries,
    smoothed by a 1-D pooling, per KV head; keep the top ``B - w`` plus the window. Put the question at the end of the
    prompt: the window then *is* the question.

    Parameters
    ----------
    window : int
        Observation window ``w`` (paper: 32).
    kernel, pooling : int, "max" | "avg"
        Pooling of the scores (paper code: max, 7 for LongBench); kernel 1 disables it.
    gqa_reduce : "mean" | "max"
        How the query heads of a KV group combine.

    CHOICE: see docs/methods/snapkv.md.
    """

    window: int = 32
    kernel: int = 7
    pooling: Literal["max", "avg"] = "max"
    gqa_reduce: Literal["mean", "max"] = "mean"

    name = "snapkv"
    summary = "Observation-window attention + pooling, once after prefill (Li et al., 2024)"

    def validate(self) -> None:
        check_range(type(self).__name__, "window", self.window, 1)
        check_range(type(self).__name__, "kernel", self.kernel, 1)

    def scores(self, ctx: PrefillContext) -> torch.Tensor:
        """Pooled observation-window scores per KV head [B, H, n] (window entries are forced separately)."""
        s = window_scores(ctx.query, ctx.keys, ctx.scaling, self.window, ctx.real)
        s = group_reduce(s, ctx.num_kv_heads, self.gqa_reduce)
        return pool1d(s, self.kernel, self.pooling)

    def window_mask(self, ctx: PrefillContext, k: torch.Tensor) -> torch.Tensor:
        """[B, n] the observation window, clipped to the per-row budget k."""
        return last_real(ctx.real, torch.minimum(k, torch.full_like(k, self.window)))

    def prefill(self, ctx: PrefillContext) -> Selection:
        k = ctx.budget_tokens
        return Selection(self.top(ctx, self.scores(ctx), k, force=self.window_mask(ctx, k)))

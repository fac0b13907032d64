"""PyramidKV: SnapKV selection with per-layer budgets shrinking from the bottom layer to the top."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PrefillContext, check_range
from .snapkv import SnapKV
from ..protocol import Selection
from ..scoring import largest_remainder


def pyramid_budgets(avg: torch.Tensor, limit: torch.Tensor, num_layers: int, beta: float) -> torch.Tensor:
    """Per-layer budgets [B, L] (window excluded) decreasing arithmetically, summing exactly to L * avg.

    avg : LongTensor [B], the average per-layer budget; limit : LongTensor [B], the most one layer can keep
    (n - w). Follows the paper's schedule k_min = avg / beta, k_max = 2 avg - k_min, with k_max capped at the
    limit (k_min then rises to keep the mean).
    """
    a = avg.double()
    k_min = a / beta
    k_max = 2 * a - k_min
    over = k_max > limit.double()
    k_max = torch.where(over, limit.double(), k_max)
    k_min = torch.where(over, 2 * a - k_max, k_min)
    if num_layers == 1:
        return avg[:, None].clone()
    steps = torch.arange(num_layers, dtype=torch.float64, device=avg.device)[None, :]
    weights = k_max[:, None] - steps * (k_max - k_min)[:, None] / (num_layers - 1)
    shares = largest_remainder(weights, avg * num_layers)
    return torch.minimum(shares, limit[:, None])


@dataclass
class PyramidKV(SnapKV):
    """Pyramidal information funnelling: lower layers keep more, upper layers less, same average as SnapKV.

    Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
    (arXiv 2406.02069). Selection inside a layer is SnapKV's. The window-free budget ``B - w`` is spread over the L
    managed layers arithmetically from ``k_max`` (bottom) to ``k_min = (B - w) / beta`` (top).

    Parameters
    ----------
    beta : float
        Ratio of the average to the top layer's budget (paper code: 20).
    window, kernel, pooling, gqa_reduce
        As in :class:`SnapKV`.

    CHOICE: see docs/methods/pyramidkv.md (largest-remainder rounding to SnapKV's exact total).
    """

    beta: float = 20.0

    name = "pyramidkv"
    summary = "SnapKV with layer budgets decreasing bottom to top, same total (Cai et al., 2024)"

    def validate(self) -> None:
        super().validate()
        check_range(type(self).__name__, "beta", self.beta, 1.0)

    def layer_budget(self, ctx: PrefillContext) -> torch.Tensor:
        k = ctx.budget_tokens
        w = torch.minimum(k, torch.full_like(k, self.window))
        budgets = pyramid_budgets(k - w, ctx.n_real - w, ctx.num_layers, self.beta)
        return budgets[:, ctx.layer_rank] + w

    def prefill(self, ctx: PrefillContext) -> Selection:
        k = self.layer_budget(ctx)
        return Selection(self.top(ctx, self.scores(ctx), k, force=self.window_mask(ctx, k)))

"""MadaKV: per-head modality preference and hierarchical compression compensation across layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .base import Method, PrefillContext, check_range, first_real, last_real
from ..modality import TEXT
from ..protocol import Selection
from ..scoring import group_reduce, largest_remainder, pool1d, window_scores


@dataclass
class MadaKV(Method):
    """Modality-adaptive eviction, once after prefill: per-head visual/text quotas and layer budgets compensated to an
    exact total.

    Paper: Li et al., "MadaKV: Adaptive Modality-Perception KV Cache Eviction for Efficient Multimodal Long-Context
    Inference", ACL 2025 (arXiv 2506.15724). Each head splits its budget between visual and text tokens by the
    attention the proxy tokens (the last ``window``) give each (MPA); it keeps what covers ``theta`` of each modality's
    attention, within ``[c_lo, c_hi]`` times its quota, and the layer's surplus or deficit moves the next layers'
    budget (HCC), so the total over all layers and heads is exact. Each head's store holds only its own entries.

    Parameters
    ----------
    window, n_sink : int
        Proxy tokens (always kept) and first tokens always kept.
    theta, c_lo, c_hi : float
        Attention coverage defining a head's demand, and the bounds of its keep count relative to its quota.
    combine : "clip" | "demand" | "quota"
        CHOICE: how a head's demand and quota combine into its keep count (clip to [c_lo, c_hi] x quota; the demand
        alone; the quota alone); see docs/methods/madakv.md.
    phi_min, phi_min_ratio : int, float
        Floor on a layer's per-head budget.
    kernel, pooling, gqa_reduce
        Pooling of the proxy attention (off) and the GQA reduction.

    CHOICE and the compensation formula (the paper's drops a factor H): see docs/methods/madakv.md.
    """

    window: int = 32
    theta: float = 0.9
    combine: Literal["clip", "demand", "quota"] = "clip"
    c_lo: float = 0.5
    c_hi: float = 2.0
    phi_min: int = 8
    phi_min_ratio: float = 0.1
    n_sink: int = 4
    kernel: int = 1
    pooling: Literal["max", "avg"] = "max"
    gqa_reduce: Literal["mean", "max"] = "mean"
    _state: dict = field(default_factory=dict, init=False, repr=False)

    name = "madakv"
    summary = "Per-head visual/text budget split + layer budgets compensated to an exact total (Li et al., ACL 2025)"

    def validate(self) -> None:
        cls = type(self).__name__
        check_range(cls, "window", self.window, 1)
        check_range(cls, "theta", self.theta, 0.0, 1.0, low_open=True)
        check_range(cls, "c_lo", self.c_lo, 0.0, 1.0)
        check_range(cls, "c_hi", self.c_hi, 1.0)
        check_range(cls, "phi_min", self.phi_min, 0)
        check_range(cls, "phi_min_ratio", self.phi_min_ratio, 0.0, 1.0)
        check_range(cls, "n_sink", self.n_sink, 0)
        check_range(cls, "kernel", self.kernel, 1)

    def prefill(self, ctx: PrefillContext) -> Selection:
        B, H, n = ctx.keys.shape[0], ctx.num_kv_heads, ctx.n
        L, l = ctx.num_layers, ctx.layer_rank
        k = ctx.budget_tokens
        window = last_real(ctx.real, torch.minimum(k, torch.full_like(k, self.window)))
        sinks = first_real(ctx.real, (k - window.sum(-1)).clamp(min=0).clamp(max=self.n_sink)) & ~window
        fixed = window | sinks
        cand = ctx.real & ~fixed
        visual = cand & (ctx.modality != TEXT)
        text = cand & (ctx.modality == TEXT)
        counts = torch.stack([visual.sum(-1), text.sum(-1)], -1)  # [B, 2]
        psi = group_reduce(window_scores(ctx.query, ctx.keys, ctx.scaling, self.window, ctx.real), H,
                           self.gqa_reduce)
        psi = pool1d(psi, self.kernel, self.pooling).float().masked_fill(~cand[:, None, :], 0.0)
        if torch.isnan(psi).any():
            raise FloatingPointError("madakv: attention scores contain NaN (check the model's dtype and inputs)")

        if l == 0:  # the global budget, fixed at the first layer
            phi1 = (k - fixed.sum(-1)).clamp(min=0)
            floor = torch.clamp(torch.ceil(phi1.double() * self.phi_min_ratio).long().clamp(min=self.phi_min),
                                max=phi1).minimum(counts.sum(-1))
            self._state = {"total": L * H * phi1, "spent": torch.zeros_like(phi1), "floor": floor}
        budget_state = self._state
        remaining = budget_state["total"] - budget_state["spent"]
        phi = torch.maximum(remaining.double() / (H * (L - l)), budget_state["floor"].double())  # this layer's per-head budget

        mass = torch.stack([(psi * visual[:, None]).sum(-1), (psi * text[:, None]).sum(-1)], -1)  # [B, H, 2]
        quota = modality_quotas(mass, phi, counts)
        if l == L - 1:
            want = largest_remainder(quota.reshape(B, 2 * H), remaining).view(B, H, 2)
        else:
            demand = torch.stack([coverage_demand(psi, visual, self.theta), coverage_demand(psi, text, self.theta)], -1)
            low_factor, high_factor = {"clip": (self.c_lo, self.c_hi), "quota": (1.0, 1.0),
                                       "demand": (0.0, math.inf)}[self.combine]
            lo = torch.floor(quota * low_factor).long()
            hi = torch.ceil(quota * high_factor).long() if math.isfinite(high_factor) else demand
            want = torch.minimum(torch.maximum(demand, lo), hi)
        room = counts[:, None, :].expand(B, H, 2)
        later = L - l - 1  # layers after this one must stay reachable: between their floors and keeping everything
        low = (remaining - later * H * counts.sum(-1)).clamp(min=0)
        high = remaining - later * H * budget_state["floor"]
        target = want.minimum(room).sum((1, 2)).clamp(min=0)
        target = torch.minimum(torch.maximum(target, low), high.clamp(min=0))
        keep_n = fit_total(want.minimum(room).reshape(B, 2 * H), room.reshape(B, 2 * H), target).view(B, H, 2)
        budget_state["spent"] = budget_state["spent"] + keep_n.sum((1, 2))

        keep = fixed[:, None, :].expand(B, H, n).clone()
        for m, mask in enumerate((visual, text)):
            s = psi.masked_fill(~mask[:, None, :], float("-inf"))
            order = s.argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=s.device).expand(B, H, n)
                                                    .contiguous())
            keep |= mask[:, None, :] & (rank < keep_n[..., m : m + 1])
        return Selection(self.top(ctx, psi, keep.sum(-1), force=keep))


def modality_quotas(mass: torch.Tensor, phi: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """MPA: per-head (visual, text) quotas [B, H, 2] (float) splitting ``phi`` [B] by attention ``mass`` [B, H, 2];
    a quota above the modality's token count (``counts`` [B, 2]) gives the surplus to the other modality.
    A head with no attention to either splits by token counts (CHOICE)."""
    total = mass.sum(-1, keepdim=True)
    share = torch.where(total > 0, mass / total.clamp(min=1e-30), counts[:, None, :].double() /
                        counts.sum(-1).clamp(min=1)[:, None, None].double())
    phi = phi.double()[:, None, None]
    q = share.double() * phi
    cap = counts[:, None, :].double()
    over = (q - cap).clamp(min=0)
    q = torch.minimum(q, cap) + over.flip(-1)  # surplus to the other modality
    return torch.minimum(q, cap)


def coverage_demand(psi: torch.Tensor, mask: torch.Tensor, theta: float) -> torch.Tensor:
    """HCC demand [B, H]: the fewest tokens of ``mask`` [B, n] whose ``psi`` [B, H, n] reach ``theta`` of its mass."""
    s = psi.masked_fill(~mask[:, None, :], 0.0).clamp(min=0)
    total = s.sum(-1, keepdim=True)
    csum = s.sort(dim=-1, descending=True).values.cumsum(-1)
    need = (csum < theta * total - 1e-12 * total).sum(-1) + 1
    return torch.where(total[..., 0] > 0, need, torch.zeros_like(need)).minimum(mask.sum(-1)[:, None])


def fit_total(counts: torch.Tensor, room: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Adjust integer ``counts`` [B, M] (each within ``room`` [B, M]) so each row sums exactly to ``target`` [B]:
    shortfalls are added in proportion to the spare room, excesses removed in proportion to the counts."""
    counts = counts.clone()
    for _ in range(counts.shape[-1] + 1):
        diff = target - counts.sum(-1)
        if not bool(diff.any()):
            break
        add, sub = diff.clamp(min=0), (-diff).clamp(min=0)
        spare = (room - counts).clamp(min=0)
        counts = counts + largest_remainder(spare.double() + 1e-9 * (spare > 0), add).minimum(spare)
        counts = counts - largest_remainder(counts.double(), sub).minimum(counts)
    if bool((counts.sum(-1) != target).any()):  # only when the target exceeds all the room (cannot happen here)
        raise RuntimeError("madakv: could not meet the layer's budget exactly")
    return counts


"""Spherical KV's rate-distortion retention beyond one layer: the authors' distortion proxy and the global allocation.

Paper: Chauhan et al., "Spherical KV: Angle-Domain Attention and Rate-Distortion Retention for KV Caches", arXiv
2605.18856 (v2). The paper's RDR gives every (token, KV head) of *all* layers a tier under one bit budget; the
authors' code estimates the distortion of a tier from head-level statistics at prefill and from each token's EMA
attention while decoding, with a constant penalty for dropping. This module holds those pieces as plain functions so
that :class:`~modalkv.methods.spherical.SphericalKV` only has to call them:

* :func:`head_proxies` -- the reuse and stability proxies of every KV head (prefill),
* :func:`paper_prefill_distortion` / :func:`paper_decode_distortion` -- the authors' distortion of each tier,
* :func:`allocate_jointly` -- one greedy over many (layer) problems under the sum of their byte budgets.
"""

from __future__ import annotations

import math

import torch

ETA = 10.0  # the authors' distortion of a dropped token (the same for every token)
LAMBDA_THETA = (0.05, 0.10, 0.30)  # the authors' direction weight of tier b1, b2, b3 (decode proxy)
LAMBDA_R = 0.01  # the authors' radius weight, every tier (decode proxy)
RADIUS_BITS = 8  # radius code bits of every tier


def greedy_allocate(D: torch.Tensor, C: torch.Tensor, start: torch.Tensor, movable: torch.Tensor,
                    budget: float, chain: tuple[int, ...]) -> torch.Tensor:
    """The rate-distortion greedy (the authors' Algorithm 1), vectorised.

    D, C [N, T] distortion and cost of tier 0..T-1 (0 = dropped) per token; ``start`` [N] current tier (a position in
    ``chain``); ``movable`` [N] bool (protected tokens stay); ``chain`` the downgrade order (e.g. 1, 2, 3, 0).
    Repeatedly applies the downgrade with the smallest distortion increase per byte saved until the total cost is
    within ``budget``. Equivalent to the heap version: a token's later step whose ratio is smaller than an earlier
    one's is taken right after it (ratios are made non-decreasing along each chain, ties by chain order).
    Returns the new tier per token [N]; if even dropping every movable token does not fit, all are dropped.
    """
    N = D.shape[0]
    chain_t = torch.tensor(chain, device=D.device)
    at = torch.zeros(N, dtype=torch.long, device=D.device)
    for i, t in enumerate(chain):
        at = torch.where(start == t, torch.full_like(at, i), at)
    total = float(C.gather(1, start[:, None]).sum())
    if total <= budget or N == 0:
        return start.clone()
    S = len(chain) - 1
    frm, to = chain_t[:-1], chain_t[1:]
    dD = D[:, to] - D[:, frm]  # [N, S]
    dC = C[:, frm] - C[:, to]
    steps = torch.arange(S, device=D.device)[None, :]
    live = (steps >= at[:, None]) & movable[:, None]
    ratio = torch.where(dC > 0, dD / dC.clamp(min=1e-12), torch.full_like(dD, float("-inf")))  # free steps first
    ratio = torch.where(live, ratio, torch.full_like(ratio, float("inf")))
    ratio = torch.cummax(ratio, dim=1).values
    flat = ratio.reshape(-1)
    order = torch.argsort(flat, stable=True)
    saving = torch.where(live, dC, torch.zeros_like(dC)).reshape(-1)[order]
    need = total - budget
    cum = torch.cumsum(saving.double(), 0)
    k = int(torch.searchsorted(cum, torch.tensor(need, dtype=cum.dtype, device=cum.device)))
    taken = torch.zeros(N * S, dtype=torch.bool, device=D.device)
    taken[order[: k + 1]] = True
    taken = taken.view(N, S) & live
    final = at + taken.sum(1)
    return chain_t[final]


def head_proxies(probs: torch.Tensor, values: torch.Tensor, controllable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' head-level prefill proxies, per KV head, each divided by its largest value over the layer's heads.

    probs [B, H, G, w, n]: attention of the observation window's queries (G query heads per KV head), the last row
    being the prompt's last query; values [B, H, n, dv]; controllable [B, n] bool (tokens the allocator may move).

    * reuse ``u_hat``: the attention mass the window puts on the controllable tokens, mean over its queries. CHOICE:
      the authors' "mean prefill attention mass of the head" leaves open which mass; the protected sinks and recent
      window are excluded here because their tier is fixed.
    * stability ``s_hat``: ``||o||^2 / (top-1 minus top-2 attention logit)`` of the last query, ``o`` its attention
      output (mean over the group's query heads). CHOICE: the margin is taken on the attention logits (their
      difference is the difference of log-probabilities), floored at 1e-3.

    Returns (u_hat, s_hat), each [B, H] in [0, 1].
    """
    mass = (probs * controllable[:, None, None, None, :]).sum(-1).mean((2, 3))  # [B, H]
    last = probs[:, :, :, -1].float()  # [B, H, G, n]
    out = torch.einsum("bhgn,bhnd->bhgd", last, values.float())
    energy = out.pow(2).sum(-1).mean(-1)  # [B, H]
    top = last.clamp(min=1e-30).log().topk(min(2, last.shape[-1]), dim=-1).values
    margin = (top[..., 0] - top[..., -1]).mean(-1).clamp(min=1e-3) if top.shape[-1] > 1 else \
        torch.ones_like(energy)
    stability = energy / margin

    def by_max(x):
        return x / x.amax(-1, keepdim=True).clamp(min=1e-30)

    return by_max(mass), by_max(stability)


def paper_prefill_distortion(radius_sum: torch.Tensor, bits: list[int], u_hat: torch.Tensor, s_hat: torch.Tensor,
                             eta: float = ETA) -> torch.Tensor:
    """The authors' prefill distortion of tier 0 (dropped) .. T: [..., n, T+1].

    ``D_i(b) = u_hat pi / 2^b_theta + (1 - s_hat) sum_j r_ij / 2^8`` for a kept tier (direction error of ``b_theta``
    bits plus 8-bit radius error, each weighted by a head proxy), ``D_i(b0) = eta``. radius_sum [..., n] is
    ``sum_j r_ij`` over the token's key groups; u_hat, s_hat broadcast against [..., 1] (one value per KV head).
    """
    u, s = u_hat[..., None], s_hat[..., None]
    radius = (1 - s) * radius_sum / (1 << RADIUS_BITS)
    out = [torch.full_like(radius_sum, eta)]
    out += [u * math.pi / (1 << b) + radius for b in bits]
    return torch.stack(out, -1)


def paper_decode_distortion(omega: torch.Tensor, radius_sums: list[torch.Tensor], d: int, eta: float = ETA,
                            floor: float = 0.1) -> torch.Tensor:
    """The authors' decode distortion of tier 0 (dropped) .. T: [..., n, T+1].

    ``D_i(b) = max(omega_i, floor) (1/sqrt(d)) sum_j r_ij^(b) (lambda_r + lambda_theta(b))`` with ``r^(b)`` the radii
    of tier b's groups (``radius_sums[t]`` [..., n]) and ``omega`` the token's EMA attention; ``D_i(b0) = eta``.
    """
    w = omega.float().clamp(min=floor) / math.sqrt(d)
    out = [torch.full_like(w, eta)]
    for t, rs in enumerate(radius_sums):
        out.append(w * rs * (LAMBDA_R + LAMBDA_THETA[min(t, len(LAMBDA_THETA) - 1)]))
    return torch.stack(out, -1)


def allocate_jointly(problems: list, chain: tuple[int, ...]) -> list[torch.Tensor]:
    """One rate-distortion greedy over several problems (one per layer) under the sum of their budgets.

    Each problem is ``(D [H, m, T+1], C [T+1], start [H, m], protected [H, m], budget)`` as one layer's allocation
    sees it; the slots of every layer compete for the same bytes, so a layer whose tokens matter more keeps more
    than its share. Returns the new tiers [H, m] of each problem.
    """

    D = torch.cat([p[0].reshape(-1, p[0].shape[-1]) for p in problems])
    C = torch.cat([p[1].expand(p[0].shape[0] * p[0].shape[1], -1) for p in problems])
    start = torch.cat([p[2].reshape(-1) for p in problems])
    movable = torch.cat([~p[3].reshape(-1) for p in problems]) & (start > 0)
    budget = sum(float(p[4]) for p in problems)
    tiers = greedy_allocate(D, C, start, movable, budget, chain)
    out, at = [], 0
    for p in problems:
        size = p[2].numel()
        out.append(tiers[at : at + size].view_as(p[2]))
        at += size
    return out

"""Shared scorers for eviction methods, computed in query chunks (never the n x n attention matrix at once).

Shapes: ``query`` [B, Hq, n, d] (RoPE applied), ``keys`` [B, H, n, d] with Hq = G * H (grouped-query attention
is handled by grouping query heads, never by repeating keys), ``real`` [B, n] bool (False = padding).
Scores are float32 [B, Hq, n] per query head; :func:`group_reduce` turns them into [B, H, n] per KV head.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 256

#: An optional memo for :func:`accumulated_scores`, set by a caller that scores the same captured prompt many times
#: (the benchmark replays one prefill per budget: :class:`modalkv.bench.memo.ScoreMemo`). It is called as
#: ``memo(compute, query, keys, scaling, real, chunk)`` and returns the scores; the scorer itself keeps no state.
accumulated_memo: ContextVar = ContextVar("accumulated_memo", default=None)


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float, rows: torch.Tensor, real: torch.Tensor):
    """Causal softmax attention of the query rows ``rows`` (LongTensor [r]) over all keys: [B, Hq, r, n] float32."""
    B, Hq, n, d = query.shape
    H = keys.shape[1]
    G = Hq // H
    q = query[:, :, rows].float().reshape(B, H, G * rows.numel(), d)
    logits = torch.matmul(q * scaling, keys.float().transpose(-1, -2)).view(B, Hq, rows.numel(), n)
    cols = torch.arange(n, device=query.device)
    visible = (cols[None, :] <= rows[:, None])[None, None] & real[:, None, None, :]
    # in place on the fresh logits tensor: each full-size copy costs as much as the matmul at long prompts
    logits.masked_fill_(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # rows that see nothing (a padding query before any real token) carry no information, nor do padding queries:
    # zero them. NaN coming from the data itself is left in place so that check_finite refuses it.
    useless = ~visible.any(-1, keepdim=True) | ~real[:, None, rows, None]  # [B, 1, r, 1]
    if bool(useless.any()):
        probs.masked_fill_(useless, 0.0)
    return probs


def window_scores(query, keys, scaling: float, window: int, real, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """SnapKV observation-window score: attention from the last ``window`` prompt tokens, summed over rows."""
    n = query.shape[2]
    start = max(0, n - window)
    out = torch.zeros(query.shape[0], query.shape[1], n, device=query.device, dtype=torch.float32)
    for s in range(start, n, chunk):
        rows = torch.arange(s, min(n, s + chunk), device=query.device)
        out += attention_probs(query, keys, scaling, rows, real).sum(2)
    return out


def accumulated_scores(query, keys, scaling: float, real, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """H2O accumulated attention: column sums of the causal attention over every prompt query.

    A chunk of query rows ending at ``e`` only sees the first ``e`` keys, so each chunk is computed over those
    (half the work of the full square). When a memo is set in :data:`accumulated_memo` it is asked first.
    """
    memo = accumulated_memo.get()
    if memo is not None:
        return memo(causal_column_sums, query, keys, scaling, real, chunk)
    return causal_column_sums(query, keys, scaling, real, chunk)


def causal_column_sums(query, keys, scaling: float, real, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """:func:`accumulated_scores` computed afresh (no memo): [B, Hq, n] float32."""
    n = query.shape[2]
    out = torch.zeros(query.shape[0], query.shape[1], n, device=query.device, dtype=torch.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        rows = torch.arange(s, e, device=query.device)
        out[..., :e] += attention_probs(query[:, :, :e], keys[:, :, :e], scaling, rows, real[:, :e]).sum(2)
    return out


def key_norm_scores(keys: torch.Tensor) -> torch.Tensor:
    """Negative L2 norm of each key (Devoto et al., 2024: low-norm keys draw high attention). [B, H, n]."""
    return -keys.float().norm(dim=-1)


def group_reduce(scores: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """Reduce per-query-head scores [B, Hq, n] to per-KV-head scores [B, H, n] (GQA groups are contiguous)."""
    B, Hq, n = scores.shape
    grouped = scores.view(B, num_kv_heads, Hq // num_kv_heads, n)
    if how == "mean":
        return grouped.mean(2)
    if how == "max":
        return grouped.amax(2)
    raise ValueError(f"unknown GQA reduction {how!r}; use 'mean' or 'max'")


def pool1d(scores: torch.Tensor, kernel: int, how: str = "max") -> torch.Tensor:
    """Smooth scores [B, H, n] along the token axis with a stride-1 window (SnapKV's clustering step)."""
    if kernel <= 1:
        return scores
    B, H, n = scores.shape
    x = scores.reshape(B * H, 1, n)
    pad = kernel // 2
    if how == "max":
        y = F.max_pool1d(x, kernel, stride=1, padding=pad)
    elif how == "avg":
        y = F.avg_pool1d(x, kernel, stride=1, padding=pad, count_include_pad=False)
    else:
        raise ValueError(f"unknown pooling {how!r}; use 'max' or 'avg'")
    return y[..., :n].reshape(B, H, n)


def check_finite(scores: torch.Tensor, method: str) -> None:
    """Refuse NaN scores: a NaN would silently turn top-k into an arbitrary choice."""
    if torch.isnan(scores).any():
        raise FloatingPointError(f"{method}: eviction scores contain NaN (check the model's dtype and inputs)")


def apply_caps(scores: torch.Tensor, modality, caps) -> torch.Tensor:
    """Set to -inf the scores of entries beyond a modality's cap (per row and head, best-scored kept).

    scores [B, H, n]; modality [B, n]; caps {modality id: LongTensor [B]}.
    """
    if not caps:
        return scores
    B, H, n = scores.shape
    s = scores
    for mid, cap in caps.items():
        is_m = (modality == mid)[:, None, :].expand(B, H, n)
        ranked = torch.where(is_m, s, torch.full_like(s, float("-inf")))
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(n, device=s.device).expand(B, H, n).contiguous())
        over = is_m & (rank >= cap.view(B, 1, 1))
        s = s.masked_fill(over, float("-inf"))
    return s


def select_topk(
    scores: torch.Tensor,
    k: torch.Tensor,
    real: torch.Tensor,
    force: torch.Tensor | None = None,
    modality: torch.Tensor | None = None,
    caps: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Indices of the entries to keep: [B, H, kmax] sorted ascending, -1 where a row keeps fewer.

    scores [B, H, n]; k LongTensor [B] or [B, H] (entries per row / per head); real [B, n]; force [B, n] or
    [B, H, n] entries always kept (they count toward k); modality [B, n] with caps {modality id: LongTensor [B]}
    limiting how many entries of that modality may be kept (forced entries excepted).
    Padding is never kept. Ties are broken by position (earlier first), so results are deterministic.
    """
    B, H, n = scores.shape
    s = scores.float().masked_fill(~real[:, None, :], float("-inf"))
    s = apply_caps(s, modality, caps)
    if force is not None:
        f = force if force.dim() == 3 else force[:, None, :]
        s = s.masked_fill(f & real[:, None, :], float("inf"))
    k = k.view(B, -1).expand(B, H) if k.dim() == 1 or k.shape[1] == 1 else k
    kmax = int(k.max()) if k.numel() else 0
    # a stable descending sort breaks ties by position (earlier first), on every device
    idx = s.argsort(dim=-1, descending=True, stable=True)[..., :kmax]
    ok = (torch.arange(kmax, device=s.device)[None, None, :] < k[..., None]) & (s.gather(-1, idx) > float("-inf"))
    return mask_to_sorted(idx, ok, n)


def mask_to_sorted(idx: torch.Tensor, ok: torch.Tensor, n: int) -> torch.Tensor:
    """Sort kept indices ascending, put the unused ones (ok False) last as -1."""
    idx = torch.where(ok, idx, torch.full_like(idx, n))  # n sorts after every real index
    idx = idx.sort(dim=-1).values
    return torch.where(idx == n, torch.full_like(idx, -1), idx)


def largest_remainder(weights: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Integer shares of ``total`` (LongTensor [B]) proportional to ``weights`` [B, m] that sum exactly to total."""
    w = weights.double().clamp(min=0)
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-300)
    exact = w * total.double()[:, None]
    base = exact.floor().long()
    short = total - base.sum(-1)
    frac = exact - base
    order = frac.argsort(dim=-1, descending=True, stable=True)
    bonus = (torch.arange(w.shape[-1], device=w.device)[None, :] < short[:, None]).long()
    return base + torch.zeros_like(base).scatter(-1, order, bonus)

"""HAE: Dual-Attention Pruning of visual tokens at prefill, index broadcast, and a recycle bin while decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .. import pruning
from ..decoding import DecodeStep, Extra
from ..modality import TEXT
from ..protocol import Selection
from ..scoring import accumulated_scores, attention_probs, check_finite, mask_to_sorted
from .base import Method, PrefillContext, check_range, first_real, last_real

ACC = Extra("accumulated_attention", "head-averaged attention from the prompt's text queries and every decode step "
            "(first head of each layer)")
BIN = Extra("in_recycle_bin", "1 while the entry is in the recycle bin (first head of each layer)")
HIDDEN = Extra("hidden_from_attention", "1 while the entry is in the bin and bin_attend=False: kept and scored, not "
               "read", hides_entry=True)
# priority offset that puts evictable visual tokens below every text token (z-scores are far smaller)
VISUAL_FIRST_OFFSET = 1e6


@dataclass
class HAE(Method):
    """Hierarchical Adaptive Eviction.

    Paper: Ma, Lu, Zhang, Zhang, "HAE: Hierarchical Adaptive Eviction for KV cache of multimodal LLMs",
    arXiv 2602.02197 (ICLR 2026 submission). (1) Dual-Attention Pruning at prefill: in the first layer, a visual token
    whose summed and peak attention from the instruction are both below ``tau_g`` / ``tau_i`` is evicted, and the kept
    set is broadcast to every layer and head (``mode="prune"``: later layers compute over the kept tokens only).
    (2) While decoding, per-modality normalised accumulated attention moves the weakest entries to a recycle bin
    (still attended; they may swap back), emptied in batches of ``bin_size``.

    Parameters
    ----------
    thresholds : "relative" (default: ``tau_g``/``tau_i`` are multiples of the visual tokens' mean global and mean
        peak attention, defaults 1.0/1.0) | "absolute" (the paper's: a share of the summed attention and a peak
        probability, defaults 0.0015/0.001, which evict nothing on modalkv's VLM).
    tau_g, tau_i, max_evict, query_rows, variance_gate : DAP thresholds (None: the form's defaults), cap,
        instruction rows, gate.
    mode : "prune" | "kv_only"; dap, ddes : bool (switch a stage off).
    capacity : "budget" | "prefill"; bin_size, recent, n_sink, v_floor : int; bin_attend, ddes_broadcast : bool.

    CHOICE (the paper gives no code for DDES; every mechanic is configurable): see docs/methods/hae.md.
    """

    thresholds: Literal["relative", "absolute"] = "relative"
    tau_g: float | None = None
    tau_i: float | None = None
    max_evict: int | None = None
    mode: Literal["prune", "kv_only"] = "prune"
    query_rows: Literal["after_last_image", "after_first_image", "all_text"] = "after_last_image"
    variance_gate: bool = False
    dap: bool = True
    ddes: bool = True
    capacity: Literal["budget", "prefill"] = "budget"
    bin_size: int = 16
    recent: int = 32
    n_sink: int = 4
    v_floor: int = 0
    bin_attend: bool = True
    ddes_broadcast: bool = False

    name = "hae"
    summary = "Dual-attention visual pruning broadcast across layers + recycle-bin eviction while decoding (Ma et al., 2026)"
    needs_decode_probs = True
    extras = (ACC, BIN, HIDDEN)

    @property
    def decodes(self) -> bool:  # type: ignore[override]
        return self.ddes

    @property
    def evicts_while_decoding(self) -> bool:  # type: ignore[override]
        return self.ddes

    @property
    def replayable(self) -> bool:
        """False when the prompt forward itself changes (pruned later layers): a captured prefill cannot stand in."""
        return not (self.dap and self.mode == "prune")

    # DAP thresholds when not given: "absolute" are the paper's (tau_g 0.0015 of the summed global attention,
    # tau_i 0.001 peak attention); "relative" are multiples of the visual tokens' mean global and mean peak attention
    DEFAULT_THRESHOLDS = {"absolute": (0.0015, 0.001), "relative": (1.0, 1.0)}

    def validate(self) -> None:
        cls = type(self).__name__
        g, i = self.DEFAULT_THRESHOLDS[self.thresholds]
        self.tau_g = g if self.tau_g is None else self.tau_g
        self.tau_i = i if self.tau_i is None else self.tau_i
        high = 1.0 if self.thresholds == "absolute" else None  # a relative threshold may exceed the mean
        check_range(cls, "tau_g", self.tau_g, 0.0, high)
        check_range(cls, "tau_i", self.tau_i, 0.0, high)
        for name in ("bin_size", "recent", "n_sink", "v_floor"):
            check_range(cls, name, getattr(self, name), 0)
        if self.max_evict is not None:
            check_range(cls, "max_evict", self.max_evict, 0)

    def setup(self, cache) -> None:
        super().setup(cache)
        # pruning hidden states needs every decoder layer to be one modalkv manages (not sliding windows); checked
        # when there is something to prune, so text-only prompts work on any model
        self._can_prune = cache.num_managed == len(cache.layers)
        if self.dap and self.mode == "prune" and self._can_prune:
            pruning.install(cache.model_ref())

    # -- prefill ----------------------------------------------------------------------------------------------
    def prefill(self, ctx: PrefillContext) -> Selection:
        B, n = ctx.real.shape
        if ctx.layer_rank == 0:
            self._full_n = n
            self._first_layer_removed = None
            self._first_layer_bin = None
            self._sink_limit = _first_position(ctx) + self.n_sink
            evict = self._dap(ctx)
            self.dap_visual = ((ctx.modality != TEXT) & ctx.real).sum(-1)
            if self.mode == "prune" and bool(evict.any()):
                if not self._can_prune:
                    raise ValueError(
                        "HAE mode='prune' needs every decoder layer to be a full-attention layer modalkv manages; "
                        "this model has other layer kinds (e.g. sliding windows): use mode='kv_only'"
                    )
                evict = _equalise(evict, self._g)
                keep = (~evict).nonzero()[:, 1].view(B, -1)  # rows evict equally many: a rectangle
                pruning.start(self.cache, keep, n, ctx.n_real)
            self.dap_evicted = evict.sum(-1)
            self._dap_keep = ~evict
            cand = ~evict & ctx.real
        elif n == self._full_n:  # kv_only (or a replayed prefill): the broadcast set
            cand = self._dap_keep & ctx.real
        else:  # a pruned layer: it only holds the kept tokens
            cand = ctx.real.clone()
        if self.ddes_broadcast and ctx.layer_rank > 0:
            keep = _rows_isin(_pos_rows(ctx), self._kept_pos) & cand
            idx = mask_to_sorted(torch.arange(n, device=keep.device).expand(B, n), keep, n)[:, : int(keep.sum(-1).max())]
            return Selection(idx[:, None].expand(-1, ctx.num_kv_heads, -1))
        scores = self._prefill_scores(ctx)
        k = torch.minimum(ctx.budget_tokens, cand.sum(-1))
        sinks, recent = _protected_counts(k, self.n_sink, self.recent)
        # CHOICE: at prefill the sinks and the recent window protect text only, so that no text token is evicted
        # in favour of a visual one (visual tokens compete among themselves by DAP's scores)
        protected = (first_real(ctx.real, sinks) | last_real(ctx.real, recent)) & cand & (ctx.modality == TEXT)
        prio = self._priority(scores, ctx.modality, cand, protected).masked_fill(~cand, float("-inf"))
        H = ctx.num_kv_heads
        idx = self.top(ctx, prio[:, None].expand(B, H, n), k, force=protected)
        if self.ddes_broadcast and ctx.layer_rank == 0:
            first = idx[:, 0]
            self._kept_pos = torch.where(first >= 0, _pos_rows(ctx).gather(1, first.clamp(min=0)), -1)
        return Selection(idx, extras={ACC.name: scores[:, None].expand(B, H, n)})

    def after_prefill(self, layer) -> None:
        for h, store in enumerate(layer.heads):
            if h > 0 or (self.ddes_broadcast and layer.rank > 0):
                store.extras.pop(ACC.name, None)  # the layer's decisions are made on its first head
            if not self.bin_attend:
                store.add_extra(HIDDEN.name, 0.0)
        if self.ddes and not (self.ddes_broadcast and layer.rank > 0):
            layer.heads[0].add_extra(BIN.name, 0.0)

    def state_dict(self, layer=None) -> dict[str, torch.Tensor]:
        """For ``layer=None``: each row's sink limit and the DAP counts. (The recycle bin is a per-entry extra of the
        stores, saved with them.)"""
        if layer is None:
            names = {"sink_limit": "_sink_limit", "dap_visual": "dap_visual", "dap_evicted": "dap_evicted"}
            return {key: getattr(self, attr) for key, attr in names.items() if getattr(self, attr, None) is not None}
        return {}

    def select_batch(self, index: torch.Tensor) -> None:
        for name in ("_sink_limit", "dap_visual", "dap_evicted", "_first_layer_removed", "_first_layer_bin"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))

    def load_state_dict(self, layer, state: dict[str, torch.Tensor]) -> None:
        if layer is None:
            self._first_layer_removed, self._first_layer_bin = None, None
            self._sink_limit = state.get("sink_limit")
            self.dap_visual, self.dap_evicted = state.get("dap_visual"), state.get("dap_evicted")

    def _dap(self, ctx: PrefillContext) -> torch.Tensor:
        """[B, n] bool: the visual tokens Dual-Attention Pruning evicts (decided on this, the first, layer)."""
        B, n = ctx.real.shape
        visual = (ctx.modality != TEXT) & ctx.real
        text = (ctx.modality == TEXT) & ctx.real
        none = torch.zeros(B, n, dtype=torch.bool, device=ctx.real.device)
        self._g = torch.zeros(B, n, device=ctx.real.device)
        if not self.dap or not bool(visual.any()):
            return none
        rows_mask = _instruction_rows(visual, text, self.query_rows)
        rows = rows_mask.any(0).nonzero().flatten()
        if rows.numel() == 0:
            return none
        g = torch.zeros(B, n, device=ctx.real.device)
        peak = torch.zeros(B, n, device=ctx.real.device)
        for s in range(0, rows.numel(), 256):
            r = rows[s: s + 256]
            w = rows_mask[:, r].float()  # [B, r]: which rows are instruction rows of each batch row
            a = attention_probs(ctx.query, ctx.keys, ctx.scaling, r, ctx.real).mean(1) * w[..., None]  # [B, r, n]
            g += a.sum(1)
            peak = torch.maximum(peak, a.amax(1))
        check_finite(g, self.name)
        self._g, self._peak = g, peak  # kept for inspection (benchmarks/hae_attention.py)
        total = (g * visual).sum(-1, keepdim=True)
        if self.thresholds == "absolute":  # the paper's: a share of the summed attention, a peak probability
            g_cut, peak_cut = self.tau_g * total, self.tau_i
        else:  # multiples of the visual tokens' mean global attention (the uniform share) and mean peak
            count = visual.sum(-1, keepdim=True).clamp(min=1)
            g_cut = self.tau_g * total / count
            peak_cut = self.tau_i * (peak * visual).sum(-1, keepdim=True) / count
        evict = visual & (g < g_cut) & (peak < peak_cut)
        if self.variance_gate:
            evict &= (_cv(g, visual) > _cv(g, text))[:, None]
        if self.max_evict is not None:
            over = evict.sum(-1) > self.max_evict
            if bool(over.any()):
                lowest = _lowest(g, evict, self.max_evict)
                evict = torch.where(over[:, None], lowest, evict)
        return evict

    def _prefill_scores(self, ctx: PrefillContext) -> torch.Tensor:
        """[B, n] head-averaged attention column sums over the prompt's text query rows (DDES's initial scores)."""
        text = (ctx.modality == TEXT) & ctx.real
        if bool((text == ctx.real).all()):  # every real query is text: H2O's (memoised) accumulated attention
            return accumulated_scores(ctx.query, ctx.keys, ctx.scaling, ctx.real).mean(1)
        n = ctx.n
        out = torch.zeros(ctx.real.shape[0], n, device=ctx.keys.device)
        for s in range(0, n, 256):
            e = min(n, s + 256)
            rows = torch.arange(s, e, device=ctx.keys.device)
            a = attention_probs(ctx.query[:, :, :e], ctx.keys[:, :, :e], ctx.scaling, rows, ctx.real[:, :e]).mean(1)
            out[:, :e] += (a * text[:, s:e, None]).sum(1)
        check_finite(out, self.name)
        return out

    def _priority(self, scores, modality, active, protected, z=None) -> torch.Tensor:
        """Keep-priority [B, n]: per-modality z-score of ``scores`` over ``active`` (or the given ``z``); the
        unprotected visual tokens beyond ``v_floor`` (lowest first) sit a tier below everything else (evicted first)."""
        z = _zscores(scores, modality, active) if z is None else z
        visual = (modality != TEXT) & active
        excess = visual.sum(-1) - self.v_floor
        if bool((excess > 0).any()):
            z = z - VISUAL_FIRST_OFFSET * _lowest(z, visual & ~protected, excess.clamp(min=0)).float()
        return z

    # -- decode -----------------------------------------------------------------------------------------------
    def decode(self, step: DecodeStep) -> None:
        layer = step.layer
        if self.ddes_broadcast and layer.rank > 0:
            self._copy_first_layer(step)
            return
        heads = layer.heads
        store = heads[0]  # the layer's decisions are made on its first head and applied to every head
        n = store.n
        acc = store.extras[ACC.name]
        acc[:, :n] += step.group().received("mean").mean(1)  # head-averaged attention of this step
        in_bin = store.extras[BIN.name][:, :n] > 0
        valid = store.valid[:, :n]
        active = valid & ~in_bin
        if self.capacity == "prefill":
            target = layer.prefill_kept[0]
            if self.cache.budget.decode is not None:
                target = target.clamp(max=self.cache.budget.decode)
        else:
            target = layer.decode_targets(0)
        over = active.sum(-1) - target
        has_bin = in_bin.any(-1)
        if not bool((over > 0).any() or has_bin.any()):
            self._apply_bin(layer, None, in_bin)
            return
        pos = store.pos[:, :n]
        sinks, recent = _protected_counts(target, self.n_sink, self.recent)
        protected = (pos < (self._sink_limit - self.n_sink + sinks)[:, None]) | (pos > layer.seen - 1 - recent[:, None])
        mod = store.mod[:, :n]
        z = _zscores(acc[:, :n], mod, active)
        prio = self._priority(acc[:, :n], mod, active, protected, z)
        # bin entries: z-scored on the active entries' statistics, visual ones a tier down while visual tokens are
        # still evicted first (comparable with the active entries' priorities)
        excess = ((mod != TEXT) & active).sum(-1, keepdim=True) > self.v_floor
        bin_prio = z - VISUAL_FIRST_OFFSET * ((mod != TEXT) & in_bin & excess).float()
        in_bin = in_bin.clone()
        for b in range(store.batch):
            cand = active[b] & ~protected[b]
            k = min(int(over[b]), int(cand.sum()))
            if k > 0:
                victims = prio[b].masked_fill(~cand, float("inf")).topk(k, largest=False).indices
                in_bin[b, victims] = True
                cand[victims] = False
                bin_prio[b, victims] = prio[b, victims]
            for _ in range(self.bin_size + 1):  # restore: a bin entry scoring above the next victim swaps back
                row_in_bin = in_bin[b] & valid[b]
                if not bool(row_in_bin.any()) or not bool(cand.any()):
                    break
                j = int(bin_prio[b].masked_fill(~row_in_bin, float("-inf")).argmax())
                v = int(prio[b].masked_fill(~cand, float("inf")).argmin())
                if not bin_prio[b, j] > prio[b, v]:
                    break
                in_bin[b, j], in_bin[b, v] = False, True
                cand[j], cand[v] = True, False
                prio[b, j], bin_prio[b, v] = bin_prio[b, j], prio[b, v]
        store.extras[BIN.name][:, :n] = in_bin.float()
        full_bin = (in_bin & valid).sum(-1) > self.bin_size
        removed = None
        if bool(full_bin.any()):  # empty the bin in one go (rows whose bin is not full keep theirs), in every head
            drop = in_bin & valid & full_bin[:, None]
            removed = torch.where(drop, pos, -1)
            step.group().keep((valid & ~drop)[:, None])
            in_bin = store.extras[BIN.name][:, : store.n] > 0
        self._apply_bin(layer, removed, in_bin)

    def _apply_bin(self, layer, removed, in_bin) -> None:
        """After this layer's decision (``in_bin`` [B, >= n]: the entries now in the bin; ``removed``: positions of the
        entries the bin emptied, or None): hide the bin from attention unless ``bin_attend``, and, with
        ``ddes_broadcast``, record the first layer's decision for the later layers (:meth:`_copy_first_layer`)."""
        if not self.bin_attend:
            for store in layer.heads:
                store.extras[HIDDEN.name][:, : store.n] = in_bin[:, : store.n].float()
        if self.ddes_broadcast and layer.rank == 0:
            store = layer.heads[0]
            self._first_layer_removed = removed
            self._first_layer_bin = torch.where(in_bin, store.pos[:, : store.n], -1)

    def _copy_first_layer(self, step: DecodeStep) -> None:
        """ddes_broadcast: apply the first layer's decision of this step (by position) to this layer."""
        layer = step.layer
        removed = self._first_layer_removed
        if removed is not None:
            store = layer.heads[0]
            pos = store.pos[:, : store.n]
            step.group().keep((store.valid[:, : store.n] & ~_rows_isin(pos, removed))[:, None])
        if not self.bin_attend and self._first_layer_bin is not None:
            for store in layer.heads:
                store.extras[HIDDEN.name][:, : store.n] = _rows_isin(store.pos[:, : store.n], self._first_layer_bin).float()


# -- helpers ----------------------------------------------------------------------------------------------------
def _protected_counts(capacity, n_sink: int, recent: int):
    """(sinks, recent window) protected under a capacity (LongTensor [B]): never more than the capacity holds —
    the sinks first, then the most recent tokens (CHOICE)."""
    sinks = capacity.clamp(max=n_sink)
    return sinks, torch.minimum(capacity - sinks, torch.full_like(capacity, recent)).clamp(min=0)


def _zscores(scores, modality, active) -> torch.Tensor:
    """[B, n] ``(s - mu_m) / sigma_m`` with each modality's mean and deviation over the ``active`` entries."""
    z = torch.zeros_like(scores)
    for mid in modality.unique().tolist():
        of_m = modality == mid
        sel = (of_m & active).float()
        cnt = sel.sum(-1, keepdim=True).clamp(min=1)
        mu = (scores * sel).sum(-1, keepdim=True) / cnt
        sd = (((scores - mu) ** 2 * sel).sum(-1, keepdim=True) / cnt).sqrt().clamp(min=1e-12)
        z = torch.where(of_m, (scores - mu) / sd, z)
    return z


def _first_position(ctx: PrefillContext) -> torch.Tensor:
    """[B] original position of each row's first real token."""
    first = ctx.real.float().argmax(-1)
    return _pos_rows(ctx).gather(1, first[:, None]).squeeze(1)


def _pos_rows(ctx: PrefillContext) -> torch.Tensor:
    p = ctx.positions
    return p.expand(ctx.real.shape[0], -1) if p.dim() == 1 else p


def _rows_isin(values: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: values[b, i] in sets[b] (sets padded with -1, values never negative)."""
    return (values[:, :, None] == sets[:, None, :]).any(-1)


def _instruction_rows(visual, text, how: str) -> torch.Tensor:
    """[B, n] bool: the text query rows whose attention judges the visual tokens."""
    if how == "all_text":
        return text
    n = visual.shape[1]
    idx = torch.arange(n, device=visual.device)[None, :]
    last = torch.where(visual, idx, -1).amax(-1, keepdim=True)
    first = torch.where(visual, idx, n).amin(-1, keepdim=True)
    after_first = text & (idx > first)
    if how == "after_first_image":
        return after_first
    after_last = text & (idx > last)
    return torch.where(after_last.any(-1, keepdim=True), after_last, after_first)


def _cv(x, mask) -> torch.Tensor:
    """[B] coefficient of variation of x over mask."""
    m = mask.float()
    cnt = m.sum(-1).clamp(min=1)
    mu = (x * m).sum(-1) / cnt
    sd = (((x - mu[:, None]) ** 2) * m).sum(-1).div(cnt).sqrt()
    return sd / mu.abs().clamp(min=1e-12)


def _lowest(x, mask, count) -> torch.Tensor:
    """[B, n] bool: per row the ``count`` (int or LongTensor [B]) entries of ``mask`` with the lowest x."""
    B, n = x.shape
    order = x.masked_fill(~mask, float("inf")).argsort(dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=x.device).expand(B, n).contiguous())
    count = torch.as_tensor(count, device=x.device).view(-1, 1)
    return mask & (rank < count)


def _equalise(evict, g) -> torch.Tensor:
    """Rows of a pruned batch must keep equally many tokens: rows that evict more give back their highest-g
    candidates (CHOICE: the whole batch is pruned as little as its least-pruned row)."""
    counts = evict.sum(-1)
    least = int(counts.min())
    if int(counts.max()) == least:
        return evict
    return _lowest(g, evict, least)

"""RetentiveKV: entropy-guided eviction whose evicted tokens live on in fixed-size state-space memories."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .base import Method, PrefillContext, check_range, first_real, last_real
from ..cache import Selection
from ..decoding import DecodeStep, Extra
from ..modality import IMAGE, TEXT, VIDEO, ModalityLayout, _place_square, _runs
from ..scoring import group_reduce, pool1d, window_scores

_TINY = 1e-30
ACC = Extra("accumulated_attention", "window attention at prefill, plus the attention of every decode step")
SPATIAL = Extra("spatial_weight", "a visual entry's absorption weight: gamma_s ** distance to its image's root patch")


def normalised_entropy_score(alpha: torch.Tensor, group: torch.Tensor, lam: float) -> torch.Tensor:
    """Retention score ``R = lam * alpha_hat + (1 - lam) * H_hat`` per entry.

    alpha [..., n] attention received (>= 0, 0 for absent entries); group [..., n] bool: the entries of one
    modality (visual or text). Within the group ``p = alpha / sum(alpha)``, ``H = -p log p``, and both ``alpha``
    and ``H`` are divided by their maximum over the group. Entries outside the group get 0.
    """
    a = alpha.float() * group
    p = a / a.sum(-1, keepdim=True).clamp(min=_TINY)
    ent = -(p * torch.log(p.clamp(min=_TINY)))
    a_hat = a / a.amax(-1, keepdim=True).clamp(min=_TINY)
    h_hat = ent / ent.amax(-1, keepdim=True).clamp(min=_TINY)
    return (lam * a_hat + (1 - lam) * h_hat) * group


@dataclass
class RetentiveKV(Method):
    """Entropy-guided KV retention with dual state-space memories that absorb the evicted tokens.

    Paper: Liu, Xiong, Jiang, Wang, Lv, Zhang, "RetentiveKV: State-Space Memory for Uncertainty-Aware Multimodal
    KV Cache Eviction", ACL 2026 Findings (arXiv 2605.04075). Tokens are kept by ``R = lam * attention + (1 - lam) *
    cross-modal entropy`` (each normalised within its modality); evicted visual tokens enter a visual state weighted by
    their grid distance to the image's root patch, evicted text tokens with ``R >= tau`` a recall state. While
    decoding, the least-attended entry outside sinks and window is evicted and absorbed; states decay with the
    entropy of the current query's attention. Memory per state is independent of sequence length.

    Parameters
    ----------
    window, kernel, n_sink, lam, tau, gate_visual : retention and absorption.
    gamma_s, h_min, beta, decay : spatial weight and state decay.
    state_readout ("softmax" | "linear" | "none"), states ("dual" | "single"), gated, gate_w, gate_b, mix,
    absorb_by_attention, second_order : how the states are kept and read.

    CHOICE (most constants; the training-free softmax readout and its derivation): see docs/methods/retentivekv.md.
    """

    window: int = 32
    kernel: int = 1
    n_sink: int = 4
    lam: float = 0.5
    tau: float = 0.1
    gate_visual: bool = False
    gamma_s: float = 0.9
    h_min: float = 0.9
    beta: float = 10.0
    decay: bool = True
    state_readout: Literal["softmax", "linear", "none"] = "softmax"
    states: Literal["dual", "single"] = "dual"
    gated: bool = False
    gate_w: float = 8.0
    gate_b: float = -4.0
    mix: Literal["add", "convex"] = "add"
    absorb_by_attention: bool = False
    second_order: bool = False

    name = "retentivekv"
    summary = "Entropy-guided eviction; evicted tokens absorbed into visual/recall state-space memories (Liu et al., 2026)"
    needs_decode_probs = True
    decodes = True
    evicts_while_decoding = True
    extras = (ACC, SPATIAL)

    @property
    def has_readout(self) -> bool:  # type: ignore[override]
        return self.state_readout != "none"

    def validate(self) -> None:
        cls = type(self).__name__
        check_range(cls, "window", self.window, 1)
        check_range(cls, "kernel", self.kernel, 1)
        check_range(cls, "n_sink", self.n_sink, 0)
        check_range(cls, "lam", self.lam, 0.0, 1.0)
        check_range(cls, "tau", self.tau, 0.0)
        check_range(cls, "gamma_s", self.gamma_s, 0.0, 1.0, low_open=True)
        check_range(cls, "h_min", self.h_min, 0.0, 1.0)
        check_range(cls, "beta", self.beta, 0.0)

    def setup(self, cache) -> None:
        super().setup(cache)
        self._states: dict[int, dict[str, torch.Tensor]] = {}
        self._sink_end: torch.Tensor | None = None  # [B] first position after each row's sinks
        self._derived: dict = {}  # per-step working terms of the first-order readout (one layer at a time)

    # -- state storage ----------------------------------------------------------------------------------------
    @property
    def num_states(self) -> int:
        return 2 if self.states == "dual" else 1

    def _empty_states(self, B: int, H: int, d: int, dv: int, device) -> dict[str, torch.Tensor]:
        S = self.num_states
        z = lambda *shape: torch.zeros(B, H, S, *shape, dtype=torch.float32, device=device)  # noqa: E731
        if self.state_readout == "linear":
            st = {"S": z(d, dv), "z": z(d)}
        else:
            st = {"m": z(), "s": z(d), "u": z(dv), "M": z(d, dv)}
            if self.second_order:
                st["C"] = z(d, d)
        st["scale"] = torch.ones(B, H, S, dtype=torch.float32, device=device)
        return st

    def _absorb(self, st: dict, g: int, w: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                heads: slice = slice(None)) -> None:
        """Add tokens to state ``g``: w [B, H', m] weights, keys [B, H', m, d], values [B, H', m, dv]
        (H' = the KV heads ``heads``)."""
        st["_version"] = st.get("_version", 0) + 1
        sl = (slice(None), heads, g)
        w = w.float() / st["scale"][sl][..., None]  # sums are stored divided by the lazy decay scale
        k, v = keys.float(), values.float()
        if self.state_readout == "linear":
            phi = F.elu(k) + 1
            st["S"][sl] += torch.einsum("bhm,bhmd,bhme->bhde", w, phi, v)
            st["z"][sl] += torch.einsum("bhm,bhmd->bhd", w, phi)
            return
        st["m"][sl] += w.sum(-1)
        st["s"][sl] += torch.einsum("bhm,bhmd->bhd", w, k)
        st["u"][sl] += torch.einsum("bhm,bhme->bhe", w, v)
        st["M"][sl] += torch.einsum("bhm,bhmd,bhme->bhde", w, k, v)
        if "C" in st:
            st["C"][sl] += torch.einsum("bhm,bhmd,bhme->bhde", w, k, k)

    def state_bytes(self, layer) -> int:
        st = self._states.get(layer.rank, {})
        return sum(t.numel() * t.element_size() for name, t in st.items() if not name.startswith("_"))

    def state_dict(self, layer=None) -> dict[str, torch.Tensor]:
        """The layer's state memories (the sums and their lazy decay scale); for ``layer=None`` the sinks' end."""
        if layer is None:
            return {} if self._sink_end is None else {"sink_end": self._sink_end}
        st = self._states.get(layer.rank, {})
        return {name: t for name, t in st.items() if not name.startswith("_")}

    def load_state_dict(self, layer, state: dict[str, torch.Tensor]) -> None:
        if layer is None:
            self._sink_end = state.get("sink_end")
        elif state:
            self._states[layer.rank] = dict(state)

    # -- prefill ----------------------------------------------------------------------------------------------
    def _grid(self, ctx: PrefillContext):
        """(item, row, col) [B, n] of the context's tokens: the cache's ModalityLayout when given, else each run
        of visual tokens is one image laid out as a square (a 1-D strip when its length is not a square)."""
        B, n = ctx.modality.shape
        dev = ctx.modality.device
        pos = ctx.positions.expand(B, n) if ctx.positions.dim() == 1 else ctx.positions
        layout = getattr(self.cache, "layout", None)
        if layout is not None and layout.ids.shape[0] == B and int(pos.max()) < layout.ids.shape[1]:
            p = pos.long().cpu()
            return tuple(getattr(layout, f).gather(1, p).to(dev) for f in ("item", "row", "col"))
        ids = ctx.modality.cpu()
        layout = ModalityLayout(ids, *(torch.full((B, n), -1, dtype=torch.int32) for _ in range(4)))
        for b in range(B):
            for mid in (IMAGE, VIDEO):  # each run of visual tokens is one item, a square when its length is one
                runs = _runs(ids[b] == mid)
                if runs:
                    _place_square(layout, b, runs, None, mid)
        item = layout.item.long() + n * (ids == VIDEO)  # videos numbered apart from images
        return item.to(dev), layout.row.long().clamp(min=0).to(dev), layout.col.long().clamp(min=0).to(dev)

    def _spatial_weights(self, ctx: PrefillContext, R: torch.Tensor) -> torch.Tensor:
        """[B, H, n] spatial weight of every visual token (0 for text): gamma_s ** Manhattan distance to its image's
        root patch (the token with the largest R of that image, per head)."""
        item, row, col = self._grid(ctx)
        B, H, n = R.shape
        out = torch.zeros(B, H, n, device=R.device)
        n_items = int(item.max()) + 1 if item.numel() else 0
        for i in range(n_items):
            in_i = (item == i)[:, None, :]  # [B, 1, n]
            if not bool(in_i.any()):
                continue
            root = R.masked_fill(~in_i, float("-inf")).argmax(-1)  # [B, H]
            r_row = row[:, None, :].expand(B, H, n).gather(2, root[..., None])
            r_col = col[:, None, :].expand(B, H, n).gather(2, root[..., None])
            dist = (row[:, None, :] - r_row).abs() + (col[:, None, :] - r_col).abs()
            out = torch.where(in_i, self.gamma_s ** dist.float(), out)
        return out

    def prefill(self, ctx: PrefillContext) -> Selection:
        B, H, n = ctx.real.shape[0], ctx.num_kv_heads, ctx.n
        k = ctx.budget_tokens
        rows = min(self.window, n)
        alpha = group_reduce(window_scores(ctx.query, ctx.keys, ctx.scaling, self.window, ctx.real), H, "mean") / rows
        if self.kernel > 1:
            alpha = pool1d(alpha, self.kernel, "max")
        visual = ((ctx.modality != TEXT) & ctx.real)[:, None, :]
        text = ((ctx.modality == TEXT) & ctx.real)[:, None, :]
        R = normalised_entropy_score(alpha, visual, self.lam) + normalised_entropy_score(alpha, text, self.lam)
        protect = first_real(ctx.real, self.n_sink) | last_real(ctx.real, torch.clamp(k, max=self.window))
        keep = self.top(ctx, R, k, force=protect)
        kept = torch.zeros(B, H, n + 1, dtype=torch.bool, device=R.device)
        kept.scatter_(2, keep.masked_fill(keep < 0, n), True)
        evicted = ctx.real[:, None, :] & ~kept[..., :n]
        spatial = self._spatial_weights(ctx, R) if bool(visual.any()) else torch.zeros_like(R)
        if self.cache is not None and ctx.layer_rank == 0:
            pos = ctx.positions.expand(B, n) if ctx.positions.dim() == 1 else ctx.positions
            sinks = first_real(ctx.real, self.n_sink)
            self._sink_end = torch.where(sinks, pos.long() + 1, torch.zeros_like(pos, dtype=torch.long)).amax(-1)
        if self.has_readout:
            st = self._empty_states(B, H, ctx.keys.shape[-1], ctx.values.shape[-1], ctx.keys.device)
            w_vis = spatial * (evicted & visual)
            if self.gate_visual:
                w_vis = w_vis * (R >= self.tau)
            w_txt = (evicted & text & (R >= self.tau)).float()
            if self.absorb_by_attention:
                rel = alpha / alpha.masked_fill(~ctx.real[:, None, :], 0).sum(-1, keepdim=True).clamp(min=_TINY)
                rel = rel * ctx.n_real.view(B, 1, 1)
                w_vis, w_txt = w_vis * rel, w_txt * rel
            weights = [w_vis, w_txt] if self.num_states == 2 else [w_vis + w_txt]
            for g, w in enumerate(weights):
                if bool((w > 0).any()):
                    self._absorb(st, g, w, ctx.keys, ctx.values)
            self._states[ctx.layer_rank] = st
        return Selection(keep, extras={ACC.name: alpha, SPATIAL.name: spatial})

    # -- decode -----------------------------------------------------------------------------------------------
    def _row_entropy(self, p: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
        """Normalised entropy (in [0, 1]) of attention rows p [..., n] restricted to ``among`` [..., n]."""
        x = p.float() * among
        x = x / x.sum(-1, keepdim=True).clamp(min=_TINY)
        ent = -(x * torch.log(x.clamp(min=_TINY))).sum(-1)
        count = among.sum(-1).float()
        return torch.where(count > 1, ent / torch.log(count.clamp(min=2)), torch.zeros_like(ent))

    def decode(self, step: DecodeStep) -> None:
        st = self._states.get(step.layer.rank)
        for g in step.groups():
            p = g.probs().mean(2)  # [B, H', q, n] over the group's query heads
            acc = g.extra(ACC.name)
            acc += p.sum(2).float()
            last = p[:, :, -1].float()  # the current query's attention
            valid = g.valid
            visual = (g.mod != TEXT) & valid
            if st is not None and self.decay:  # the decay of this step, from the attention before any eviction
                among = torch.where(visual.sum(-1, keepdim=True) > 1, visual, valid)
                h_t = self.h_min + (1 - self.h_min) * torch.sigmoid(self.beta * (self._row_entropy(last, among) - 0.5))
            over = g.over()
            if not (isinstance(over, int) and over <= 0):
                # the window and the sinks shrink to fit a target smaller than them (as at prefill)
                kept = g.kept_after(over)
                if isinstance(kept, int):
                    recent, with_sinks = max(1, min(self.window, kept - self.n_sink)), kept > self.n_sink
                else:
                    recent, with_sinks = (kept - self.n_sink).clamp(1, self.window), (kept > self.n_sink)[..., None]
                protected = g.newer_than(recent)
                if self._sink_end is not None:
                    protected |= (g.pos < self._sink_end.to(g.pos.device).view(-1, 1, 1)) & with_sinks
                absorb = None
                if st is not None:
                    def absorb(g, victims, use, st=st, last=last, valid=valid, visual=visual):
                        self._absorb_victims(st, g, last, valid, visual, victims, use)
                g.evict(acc.masked_fill(protected, float("inf")), over, keep_protected=True, on_evict=absorb)
            if st is not None and self.decay:
                scale = st["scale"][:, g.index]  # [B, H', S]
                scale *= h_t[..., None]
                if bool((scale < 1e-20).any()):  # fold the lazy scale back into the sums before it underflows
                    self._fold_scale(st)

    def _fold_scale(self, st) -> None:
        """Multiply the lazy decay scale into the sums (before it underflows) and reset it to 1."""
        scale = st["scale"]
        for name, t in st.items():
            if name != "scale" and not name.startswith("_"):
                t *= scale.view(*scale.shape, *([1] * (t.dim() - 3)))
        scale.fill_(1.0)
        st["_version"] = st.get("_version", 0) + 1

    def _victim_weights(self, att, visual, text, sw, victims, use, count) -> list[torch.Tensor]:
        """Absorption weights of the victims [..., m] per state, from the current attention rows att [..., n]: visual
        victims by their spatial weight ``sw`` (gated by tau with ``gate_visual``), text victims 1 when their R >= tau;
        ``count`` entries the attention is spread over (for ``absorb_by_attention``)."""
        R = normalised_entropy_score(att, visual, self.lam) + normalised_entropy_score(att, text, self.lam)
        r_v, is_vis = R.gather(-1, victims), visual.gather(-1, victims)
        w_vis = sw.gather(-1, victims) * is_vis * use
        if self.gate_visual:
            w_vis = w_vis * (r_v >= self.tau)
        w_txt = (~is_vis & use & (r_v >= self.tau)).float()
        if self.absorb_by_attention:
            rel = att.gather(-1, victims) * count
            w_vis, w_txt = w_vis * rel, w_txt * rel
        return [w_vis, w_txt] if self.num_states == 2 else [w_vis + w_txt]

    def _absorb_victims(self, st, g, last, valid, visual, victims, use) -> None:
        """The eviction routine's hook: fold the victims [B, H', m] (``use`` marks real ones, None = all) of the
        group ``g`` into the states before they are removed."""
        use = torch.ones_like(victims, dtype=torch.bool) if use is None else use
        text = (g.mod == TEXT) & valid
        weights = self._victim_weights(last, visual, text, g.extra(SPATIAL.name), victims, use,
                                       valid.sum(-1, keepdim=True))
        k, v = g.keys_values(victims)
        for i, w in enumerate(weights):
            if bool((w > 0).any()):
                self._absorb(st, i, w, k, v, heads=g.index)

    # -- attention readout ------------------------------------------------------------------------------------
    def readout(self, layer, h, query, logits, values):
        st = self._states[layer.rank]
        q = query.float()
        scale = st["scale"][:, h]  # [B, S]
        if self.state_readout == "linear":
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            local = torch.matmul(probs.to(values.dtype), values).float()
            phi = F.elu(q) + 1
            num = torch.einsum("brd,bsde,bs->bre", phi, st["S"][:, h], scale)
            den = torch.einsum("brd,bsd,bs->br", phi, st["z"][:, h], scale)
            o_s = num / (den[..., None] + 1e-6)
            gamma = torch.sigmoid(self.gate_w * self._row_entropy(probs, torch.isfinite(logits)) + self.gate_b)
            gamma = gamma * (den > 0)  # an empty state contributes nothing
            out = (1 - gamma[..., None]) * local + gamma[..., None] * o_s if self.mix == "convex" else local + gamma[..., None] * o_s
            return out.to(values.dtype), probs.to(values.dtype)
        if not self.gated and "C" not in st:
            return self._readout_first_order(layer, h, q, logits, values, st)
        m = st["m"][:, h]  # [B, S]
        kbar = st["s"][:, h] / m.clamp(min=_TINY)[..., None]
        z = torch.einsum("brd,bsd->brs", q, kbar)
        u = st["u"][:, h]
        num = u[:, None] + torch.einsum("brd,bsde->brse", q, st["M"][:, h]) - z[..., None] * u[:, None]
        den = m[:, None].expand_as(z)
        if "C" in st:
            qcq = torch.einsum("brd,bsde,bre->brs", q, st["C"][:, h], q)
            den = den + 0.5 * (qcq - m[:, None] * z * z).clamp(min=0)
        weight = den * scale[:, None]
        if self.gated:
            local_probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            gamma = torch.sigmoid(self.gate_w * self._row_entropy(local_probs, torch.isfinite(logits)) + self.gate_b)
            weight = weight * gamma[..., None]
        state_logits = torch.where(weight > 0, z + torch.log(weight.clamp(min=_TINY)), torch.full_like(z, float("-inf")))
        value = num / den.clamp(min=_TINY)[..., None]  # [B, r, S, dv]
        all_logits = torch.cat([logits.float(), state_logits], -1)
        p = torch.softmax(all_logits, dim=-1)
        n = logits.shape[-1]
        out = torch.matmul(p[..., :n].to(values.dtype), values).float()
        out = out + (p[..., n:, None] * torch.nan_to_num(value)).sum(-2)
        local = p[..., :n]
        local = local / local.sum(-1, keepdim=True).clamp(min=_TINY)  # attention over the cached entries, for scoring
        return out.to(values.dtype), local.to(values.dtype)

    def _readout_first_order(self, layer, h, q, logits, values, st):
        """The first-order softmax readout as one pseudo-entry per state with a query-affine value: logit
        ``q.k_bar + log(m scale)``, value ``u/m + q^T (M - k_bar u^T) / m``. The per-state terms are derived once per
        layer and step for all heads (working memory, dropped after the layer's last head)."""
        if h == 0 or self._derived.get("rank") != layer.rank:
            m = st["m"]  # [B, H, S]
            safe = m.clamp(min=_TINY)[..., None]
            kbar = st["s"] / safe
            b = st["u"] / safe
            A = (st["M"] - kbar[..., :, None] * st["u"][..., None, :]) / safe[..., None]
            logm = torch.where(m > 0, torch.log(safe[..., 0] * st["scale"]), torch.full_like(m, float("-inf")))
            self._derived = {"rank": layer.rank, "kbar": kbar, "b": b, "A": A, "logm": logm}
        d = self._derived
        z = torch.matmul(q, d["kbar"][:, h].transpose(1, 2)) + d["logm"][:, h, None, :]  # [B, r, S]
        value = d["b"][:, h, None] + torch.einsum("brd,bsde->brse", q, d["A"][:, h])  # [B, r, S, dv]
        n = logits.shape[-1]
        p = torch.softmax(torch.cat([logits.float(), z], -1), dim=-1)
        out = torch.matmul(p[..., :n].to(values.dtype), values).float() + (p[..., n:, None] * value).sum(-2)
        if h == len(layer.heads) - 1:
            self._derived = {}
        local = p[..., :n]
        local = local / local.sum(-1, keepdim=True).clamp(min=_TINY)
        return out.to(values.dtype), local.to(values.dtype)

"""Spherical KV, the method: Angle-Domain Attention over coded keys and Rate-Distortion Retention (per token and KV
head: drop or a precision tier, under one byte budget).

Paper: Chauhan, Marthi Krishna Kumar, Das, Dhanda, Jain, Chadha, Das, "Spherical KV: Angle-Domain Attention and
Rate-Distortion Retention for KV Caches", arXiv 2605.18856 (v2). The tiers and codes are in
:mod:`~modalkv.methods.spherical.codes`, the codebooks and their calibration in
:mod:`~modalkv.methods.spherical.codebooks`, the distortion proxies and allocators in
:mod:`~modalkv.methods.spherical.rdr`; coded entries are :class:`modalkv.storage.spherical.SphericalPayload`. Every
choice the paper leaves open: docs/methods/spherical.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ...decoding import adopted_extras
from ...protocol import Selection
from ...scoring import attention_probs, check_finite, mask_to_sorted, pool1d
from ...storage.spherical import SORTS_LAST, SphericalStorage
from ..base import Method, PrefillContext, check_range, first_real, last_real
from .codebooks import Codebooks, calibrate, fit_codebooks
from .codes import OMEGA, TIER, code_bytes, encode_store, parse_tiers, rope_pairs
from .rdr import allocate_jointly, greedy_allocate, head_proxies, paper_decode_distortion, paper_prefill_distortion

PAPER_PRESET = {"tiers": "paper", "proxy": "paper", "allocation": "global"}  # SphericalKV(preset="paper")
DEFAULTS = {"tiers": "2:6,2:4,4:6", "proxy": "rms", "allocation": "global"}  # the fields a preset sets, without one


@dataclass
class SphericalKV(Method):
    """Angle-Domain Attention + Rate-Distortion Retention.

    Paper: Chauhan et al., "Spherical KV", arXiv 2605.18856 (v2). Each key is split into groups of ``g`` dims, stored
    as an 8-bit radius code and a ``b``-bit direction code (nearest unit codeword); decode logits come from the codes
    through per-query lookup tables. Per layer, every (token, KV head) gets a precision tier or is dropped, greedily
    by distortion per byte under ``budget`` times the dense bytes; while decoding the layer is re-allocated every
    ``refresh`` steps so the budget holds at every step. Values stay dense.

    Parameters
    ----------
    tiers, mode, codebooks, pairs, calib_tokens, kmeans_iters, seed : codes and codebooks.
    calib_span : int — 0, or the positions the calibration covers by running its text in chunks spread over them
        (CHOICE, ours: see :func:`.codebooks.calibrate`; a prompt past max(calib_tokens, calib_span) warns).
    price, proxy, window, kernel, n_sink, recent : the allocator.
    page_size, refresh, ema, reference : storage pages, decode re-allocation, dense-reconstruction oracle.
    allocation : "global" | "layer"; proxy : "rms" | "bound" | "paper" (the authors' distortion proxy).
    preset : "" | "paper" — the paper's regime (``tiers="paper"``, ``proxy="paper"``, ``allocation="global"``)
        for those of the three fields not given explicitly (default: ``"2:6,2:4,4:6"``, ``"rms"``, ``"global"``).

    CHOICE (tiers, codebook calibration, allocation, pricing, distortion proxy, no upgrades) and the
    measurements behind the defaults: see docs/methods/spherical.md.
    """

    tiers: str | None = None  # None: "2:6,2:4,4:6", or the preset's
    mode: Literal["rd", "top", "quant_only", "keep_drop"] = "rd"
    codebooks: Literal["calibrate", "prompt"] = "calibrate"
    pairs: Literal["contiguous", "rope"] = "contiguous"
    calib_tokens: int = 2048
    calib_span: int = 0
    kmeans_iters: int = 20
    seed: int = 42
    price: Literal["kv", "keys"] = "kv"
    proxy: Literal["rms", "bound", "paper"] | None = None  # None: "rms", or the preset's
    allocation: Literal["layer", "global"] | None = None  # None: "global", or the preset's
    preset: Literal["", "paper"] = ""
    window: int = 32
    kernel: int = 7
    n_sink: int = 4
    recent: int = 32
    page_size: int = 128
    refresh: int = 16
    ema: float = 0.9
    reference: bool = False

    name = "sphericalkv"
    summary = "Radius + direction-code keys with lookup-table logits, rate-distortion tiers under a byte budget (Chauhan et al., 2026)"
    needs_decode_probs = True
    decodes = True
    evicts_while_decoding = True
    lossy: ClassVar[bool] = True
    extras = (TIER, OMEGA)

    def validate(self) -> None:
        cls = type(self).__name__
        preset = PAPER_PRESET if self.preset == "paper" else DEFAULTS
        for field, value in preset.items():  # a parameter the caller gave explicitly wins over the preset
            if getattr(self, field) is None:
                setattr(self, field, value)
        self.tier_spec = parse_tiers(self.tiers)
        for field in ("window", "kernel", "page_size", "refresh", "calib_tokens"):
            check_range(cls, field, getattr(self, field), 1)
        for field in ("n_sink", "recent", "kmeans_iters", "calib_span"):
            check_range(cls, field, getattr(self, field), 0)
        check_range(cls, "ema", self.ema, 0.0, 1.0)

    def setup(self, cache) -> None:
        super().setup(cache)
        self._books: Codebooks | None = None
        self._warned_positions = False
        self._prompt_books: dict = {}
        self._prompt_chord: dict = {}
        self._query_group_norms: dict = {}
        self._pending: dict = {}  # allocation="global": per layer, the prefill's problems until the last layer
        self._every: dict = {}  # per layer: decode steps between re-allocations (<= refresh for small budgets)
        cfg = cache.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._pair_order = rope_pairs(d) if self.pairs == "rope" else None
        self._pair_order_inverse = self._pair_order.argsort() if self._pair_order is not None else None
        # CHOICE: a group larger than the head is the whole head (tiny test models)
        self.tier_spec = tuple((min(g, d), b) for g, b in parse_tiers(self.tiers))
        for g, bits in self.tier_spec:
            if d % g:
                raise ValueError(f"SphericalKV: tier {g}:{bits} does not fit head dim {d} of {cfg.model_type} "
                                 f"(need head_dim % group == 0)")
        if self.codebooks == "calibrate":
            model = cache.model_ref()
            self._books = calibrate(model, self.tier_spec, self.calib_tokens, self.kmeans_iters, self.seed, self.pairs,
                                    self.calib_span)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] in the order its groups are taken (RoPE pairs side by side with ``pairs="rope"``)."""
        return x if self._pair_order is None else x[..., self._pair_order.to(x.device)]

    def ungrouped(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._pair_order_inverse is None else x[..., self._pair_order_inverse.to(x.device)]

    def storage(self):
        return SphericalStorage(self)

    def shared_bytes(self) -> int:
        return self._books.nbytes() if self._books is not None else 0

    def state_bytes(self, layer) -> int:
        books = self._prompt_books.get(layer.layer_idx)
        return sum(t.numel() * t.element_size() for t in books) if books is not None else 0

    def state_dict(self, layer=None) -> dict[str, torch.Tensor]:
        """Per layer: the window query norms, the refresh interval and prompt-fitted codebooks; for ``layer=None``
        the SHA-256 of the calibrated codebooks (not saved: re-derived from the model when the cache is rebuilt)."""
        if layer is None:
            if self._books is None:
                return {}
            return {"codebooks_sha256": torch.tensor(list(self._books.sha256()), dtype=torch.uint8)}
        i = layer.layer_idx
        out = {f"qbar{t}": q for t, q in enumerate(self._query_group_norms.get(i, []))}
        if i in self._every:
            out["every"] = torch.tensor(self._every[i])
        for t, (book, chord) in enumerate(zip(self._prompt_books.get(i, []), self._prompt_chord.get(i, []))):
            out[f"book{t}"], out[f"chord{t}"] = book, chord
        return out

    def select_batch(self, index: torch.Tensor) -> None:
        """The window query norms (the distortion proxy's weights) are per row."""
        self._query_group_norms = {i: [q.index_select(0, index.to(q.device)) for q in qs]
                                   for i, qs in self._query_group_norms.items()}

    def load_state_dict(self, layer, state: dict[str, torch.Tensor]) -> None:
        if layer is None:
            saved = state.get("codebooks_sha256")
            if (saved is None) != (self._books is None) or (
                    saved is not None and bytes(saved.tolist()) != self._books.sha256()):
                raise ValueError("SphericalKV: the codebooks calibrated on this model differ from those the cache was "
                                 "saved with (another model, or other calibration settings)")
            return
        i = layer.layer_idx
        T = len(self.tier_spec)
        self._query_group_norms[i] = [state[f"qbar{t}"] for t in range(T) if f"qbar{t}" in state]
        if "every" in state:
            self._every[i] = int(state["every"])
        if self.codebooks == "prompt":
            self._prompt_books[i] = [state[f"book{t}"] for t in range(T)]
            self._prompt_chord[i] = [state[f"chord{t}"] for t in range(T)]
        books = self._prompt_books[i] if self.codebooks == "prompt" else self._books.books[i]
        for h, store in enumerate(layer.heads):
            store.payload.books = [b[h] for b in books]

    # -- costs ----------------------------------------------------------------------------------------------
    def _costs(self, d: int, dv: int, elsize: int, meta: int) -> list[float]:
        """Bytes of one (token, head) at tier 0..T (0 = dropped), page header and scales amortised."""
        out = [0.0]
        for g, bits in self.tier_spec:
            G = d // g
            key = code_bytes(G, bits) + G + (8 + 4 * G) / self.page_size
            out.append(key + (dv * elsize + meta if self.price == "kv" else 0.0))
        return out

    def _page_reserve(self, d: int, H: int, B: int = 1) -> float:
        """Worst-case bytes of the last, partly filled page of every (head, tier) beyond the amortised share."""
        return H * sum(8 + 4 * (d // g) for g, _ in self.tier_spec) * B

    def _layer_budget(self, seen: float, d: int, dv: int, elsize: int, meta: int, H: int) -> float:
        """Bytes one row of a layer may hold after ``seen`` real tokens, less the last-page reserve and the room the
        dense entries of the next ``refresh`` steps need (so that the budget also holds between refreshes).

        A ratio budget is ``ratio * seen`` dense entries (exact, not rounded up); an absolute one a fixed count."""
        per = (d + dv) * elsize if self.price == "kv" else d * elsize  # what one dense entry is priced at
        dense_cost = ((d + dv) * elsize + meta) if self.price == "kv" else d * elsize  # what an appended one holds
        budget_obj = self.cache.budget
        if budget_obj.is_ratio:
            tokens, growth = seen * budget_obj.value, budget_obj.value * per
        else:
            tokens, growth = float(budget_obj.value), 0.0
        if budget_obj.decode is not None and tokens + self.refresh * growth / max(per, 1e-12) >= budget_obj.decode:
            tokens, growth = float(min(tokens, budget_obj.decode)), 0.0  # decode_budget: a fixed byte ceiling
        base = tokens * per * H - self._page_reserve(d, H)
        if self.codebooks == "prompt":
            base -= sum(t.numel() * t.element_size() for t in self._prompt_books.get(self._layer_idx, []))
        per_step = H * max(0.0, dense_cost - growth)  # what one more dense step costs beyond the budget's growth
        # refresh sooner when the room for `refresh` dense steps would take more than half of a small budget
        every = self.refresh if per_step == 0 else min(self.refresh, max(1, int(0.5 * base // per_step)))
        self._every[self._layer_idx] = every
        return base - every * per_step

    # -- prefill --------------------------------------------------------------------------------------------
    def prefill(self, ctx: PrefillContext) -> Selection:
        B, H, n, d = ctx.keys.shape
        reach = max(self.calib_tokens, self.calib_span)
        if self.codebooks == "calibrate" and ctx.layer.seen > reach and not self._warned_positions:
            self._warned_positions = True
            warnings.warn(
                f"SphericalKV: the codebooks were calibrated on keys at positions below {reach} (calib_tokens="
                f"{self.calib_tokens}, calib_span={self.calib_span}), but this prompt reaches position "
                f"{ctx.layer.seen}; the keys are coded after "
                "RoPE, so later positions rotate slowly turning channel pairs to directions the codebooks never saw "
                "and the coded keys lose accuracy (SmolLM2 at 8k tokens, budget 0.2: KL to the full cache 0.35 with "
                "calib_tokens=2048, 0.003 with 8192). Set calib_tokens or calib_span to at least the longest context.",
                stacklevel=2)
        if self.codebooks == "prompt":
            keys = {ctx.layer.layer_idx: ctx.keys[0][:, ctx.real[0]]}
            fitted = fit_codebooks(keys, self.tier_spec, self.kmeans_iters, self.seed, pairs=self.pairs)
            self._prompt_books[ctx.layer.layer_idx] = fitted.books[ctx.layer.layer_idx]
            chord = self._prompt_chord[ctx.layer.layer_idx] = fitted.chord[ctx.layer.layer_idx]
        else:
            chord = self._chords(ctx.layer.layer_idx)
        rows_idx = torch.arange(max(0, n - self.window), n, device=ctx.keys.device)
        probs = attention_probs(ctx.query, ctx.keys, ctx.scaling, rows_idx, ctx.real)  # [B, Hq, w, n]
        G_q = ctx.query.shape[1] // H
        p = probs.view(B, H, G_q * rows_idx.numel(), n).mean(2)  # mean attention per window query
        p = pool1d(p, self.kernel, "max") if self.kernel > 1 else p  # SnapKV's smoothing (CHOICE)
        check_finite(p, self.name)
        wq = self.grouped((ctx.query[:, :, rows_idx].float() * ctx.scaling).reshape(B, H, -1, d))
        self._query_group_norms[ctx.layer.layer_idx] = [
            wq.unflatten(-1, (d // g, g)).norm(dim=-1).pow(2).mean(2).sqrt() for g, _ in self.tier_spec]  # [B, H, G]
        heads = None
        if self.proxy == "paper":  # the authors' head-level reuse and stability proxies
            fixed = first_real(ctx.real, self.n_sink) | last_real(ctx.real, self.recent)
            heads = head_proxies(probs.view(B, H, G_q, rows_idx.numel(), n), ctx.values, ctx.real & ~fixed)
        tiers = self._allocate_prefill(ctx, p, chord, heads)
        keep = tiers > 0
        idx = mask_to_sorted(torch.arange(n, device=keep.device).expand(B, H, n), keep, n)
        if self.allocation == "global":  # tiers come once every layer is prefilled (after_prefill of the last one)
            self._pending[ctx.layer.layer_idx]["idx"] = idx
        return Selection(idx[..., : int(keep.sum(-1).max())], extras={TIER.name: tiers.float(), OMEGA.name: p})

    def _distortion(self, p, values, keys, qbar, chord, obar, heads=None) -> torch.Tensor:
        """[..., n, T+1] distortion of tier 0..T (proxy (b)); p [..., n], values/keys [..., n, d], qbar [per tier:
        [..., G]], chord [per tier: [..., G]], obar [..., d]; ``heads`` the prefill's (u_hat, s_hat) for
        ``proxy="paper"`` (None while decoding)."""
        if self.proxy == "paper":
            k = self.grouped(keys.float())
            d = k.shape[-1]
            sums = [k.unflatten(-1, (d // g, g)).norm(dim=-1).sum(-1) for g, _ in self.tier_spec]
            if heads is not None:
                return paper_prefill_distortion(sums[0], [b for _, b in self.tier_spec], *heads)
            return paper_decode_distortion(p, sums, d)
        util = p * (values.float() - obar[..., None, :]).norm(dim=-1)
        out = [util]
        for t, (g, _) in enumerate(self.tier_spec):
            r = self.grouped(keys.float()).unflatten(-1, (keys.shape[-1] // g, g)).norm(dim=-1)  # [..., n, G]
            qr = r * qbar[t][..., None, :]  # ||q_bar_j|| r_ij
            e = chord[t][..., None, :]
            if self.proxy == "bound":  # the paper's bound: every group's error aligned with the query
                dl = (qr * (e + 1 / 255)).sum(-1)
            else:  # expected size: independent errors, a chord error meets the query at a random angle
                dl = (qr.pow(2) * (e.pow(2) / g + 1 / (12 * 255**2))).sum(-1).sqrt()
            out.append(util * dl.clamp(max=1.0))
        return torch.stack(out, -1)

    def _chain(self) -> tuple[int, ...]:
        T = len(self.tier_spec)
        if self.mode == "keep_drop":
            return (1, 0)
        if self.mode == "quant_only":
            return tuple(range(1, T + 1))
        return (*range(1, T + 1), 0)

    def _allocate(self, D, C, start, protected, budget):
        """One row: D [H, n, T+1], C [T+1], start/protected [H, n] -> tiers [H, n] (0 for absent)."""
        if self.mode == "top":
            return start
        Cm = C.expand(*D.shape)
        out = greedy_allocate(D.reshape(-1, D.shape[-1]), Cm.reshape(-1, D.shape[-1]), start.reshape(-1),
                              ~protected.reshape(-1) & (start.reshape(-1) > 0), budget, self._chain())
        return out.view_as(start)

    def _protect(self, budget: float, C1: float, H: int) -> tuple[int, int]:
        """(sinks, recent) protected per head, shrunk to what ``budget`` can hold at tier 1."""
        allowed = int(budget // (C1 * H)) if C1 > 0 else self.n_sink + self.recent
        if allowed < 1:
            raise ValueError(f"SphericalKV: the byte budget ({budget:.0f} bytes for this layer) cannot hold one "
                             f"top-tier entry per KV head ({C1 * H:.0f} bytes) once its page headers are paid: "
                             "raise the budget, or compress a longer prompt (on a prompt of a few tokens even "
                             "budget 1.0 cannot pay for the headers)")
        sinks = min(self.n_sink, allowed)
        recent = min(self.recent, allowed - sinks)
        return sinks, recent

    def _allocate_prefill(self, ctx, p, chord, heads=None) -> torch.Tensor:
        B, H, n, d = ctx.keys.shape
        self._layer_idx = ctx.layer.layer_idx
        dv = ctx.values.shape[-1]
        elsize = ctx.values.element_size()
        meta = 4 + 1 + 1 + 4 * 2  # pos, mod, valid, tier and omega extras
        C = torch.tensor(self._costs(d, dv, elsize, meta), device=ctx.keys.device)
        obar = (p[..., None] * ctx.values.float()).sum(-2) / p.sum(-1, keepdim=True).clamp(min=1e-12)
        tiers = torch.zeros(B, H, n, dtype=torch.long, device=ctx.keys.device)
        problems = []
        for b in range(B):
            real = ctx.real[b]
            budget = self._layer_budget(float(ctx.n_real[b]), d, dv, elsize, meta, H)
            if self.mode != "top":
                sinks, recent = self._protect(budget, float(C[1]), H)
            else:
                sinks, recent = self.n_sink, self.recent
            prot = first_real(real[None], sinks)[0] | last_real(real[None], recent)[0]
            start = torch.where(real, 1, 0).expand(H, n)
            norms = [q[b] for q in self._query_group_norms[ctx.layer.layer_idx]]
            D = self._distortion(p[b], ctx.values[b], ctx.keys[b], norms, chord, obar[b],
                                 None if heads is None else (heads[0][b], heads[1][b]))
            if self.allocation == "global":  # keep every real token until the joint allocation
                problems.append((D, C, start, prot.expand(H, n), budget))
                tiers[b] = start
            else:
                tiers[b] = self._allocate(D, C, start, prot.expand(H, n), budget)
        if self.allocation == "global":
            self._pending[ctx.layer.layer_idx] = {"problems": problems}
        return tiers

    def after_prefill(self, layer) -> None:
        if self.allocation == "global":  # the layers stay dense until the last one is prefilled
            if layer.rank == self.cache.num_managed - 1:
                self._prefill_global()
            return
        books = self._prompt_books.get(layer.layer_idx) if self.codebooks == "prompt" else \
            self._books.books[layer.layer_idx]
        for h, store in enumerate(layer.heads):
            tiers = store.extras[TIER.name][:, : store.n].long()
            encode_store(store, [b[h] for b in books], tiers)

    # -- decode ---------------------------------------------------------------------------------------------
    def decode(self, step) -> None:
        layer = step.layer
        omega = adopted_extras(layer).get(OMEGA.name) if isinstance(step.probs, torch.Tensor) else None
        if omega is not None:  # every head's omega is a view of one layer buffer: one update for all heads
            # [B, H, n] max over the group's query heads, current query; heads holding fewer entries than the
            # largest get 0 (masked) in their unused slots, which are zeroed again when an entry is appended there
            att = step.probs.amax(2)[:, :, -1].float()
            omega[:, :, : att.shape[-1]].mul_(self.ema).add_((1 - self.ema) * att)
        else:
            for h, store in enumerate(layer.heads):
                att = step.probs_of(h).amax(1)[:, -1].float()  # [B, n] max over the query heads, current query
                om = store.extras[OMEGA.name][:, : store.n]
                om.mul_(self.ema).add_((1 - self.ema) * att)
        tail = layer.heads[0].n - layer.heads[0].payload.tail_start
        if self.allocation == "global":  # every layer holds the same tail: re-allocate them all after the last one
            if layer.rank == self.cache.num_managed - 1 and tail >= min(self._every.values(), default=self.refresh):
                self._refresh_global()
        elif tail >= self._every.get(layer.layer_idx, self.refresh):
            self._refresh(layer)

    def _prefill_global(self) -> None:
        """One allocation over every (layer, KV head, token) of the prompt under the sum of the layers' budgets."""
        layers = self.cache.managed_layers
        pending = [self._pending.pop(layer.layer_idx) for layer in layers]
        B = len(pending[0]["problems"])
        rows = [self._allocate_rows([p["problems"][b] for p in pending]) for b in range(B)]
        for i, layer in enumerate(layers):
            idx = pending[i]["idx"]
            books = self._prompt_books.get(layer.layer_idx) if self.codebooks == "prompt" else \
                self._books.books[layer.layer_idx]
            for h, store in enumerate(layer.heads):
                slots = idx[:, h, : store.n]
                tiers = torch.stack([rows[b][i][h] for b in range(B)]).gather(1, slots.clamp(min=0))
                encode_store(store, [bk[h] for bk in books], torch.where(slots >= 0, tiers, 0))

    def _allocate_rows(self, problems: list) -> list:
        """Tiers of several layers' problems of one batch row, allocated jointly (``mode="top"``: unchanged)."""
        if self.mode == "top":
            return [p[2] for p in problems]
        return allocate_jointly(problems, self._chain())

    def _refresh_global(self) -> None:
        layers = self.cache.managed_layers
        per_layer = [self._refresh_problems(layer) for layer in layers]
        rows = [self._allocate_rows([pl[b] for pl in per_layer]) for b in range(len(per_layer[0]))]
        for i, layer in enumerate(layers):
            self._encode_rows(layer, [row[i] for row in rows])

    def _refresh(self, layer) -> None:
        """Re-allocate the layer under the budget of the tokens seen so far (see the class docstring)."""
        self._encode_rows(layer, [self._allocate(*problem) for problem in self._refresh_problems(layer)])

    def _encode_rows(self, layer, rows: list) -> None:
        """Re-encode every head of ``layer`` with the tiers [H, width] of each batch row."""
        for store in layer.heads:
            store._new_tiers = torch.zeros(store.batch, store.n, dtype=torch.long, device=store.pos.device)
        for b, tiers in enumerate(rows):
            for h, store in enumerate(layer.heads):
                store._new_tiers[b] = tiers[h, : store.n]
        for store in layer.heads:
            encode_store(store, store.payload.books, store._new_tiers)
            del store._new_tiers

    def _refresh_problems(self, layer) -> list:
        """Per batch row, the allocation problem of ``layer`` now: (D, C, start, protected, budget)."""
        self._layer_idx = layer.layer_idx
        store0 = layer.heads[0]
        B, H = store0.batch, len(layer.heads)
        d, dv = store0.d, store0.dv
        elsize = store0.values.element_size()
        meta = store0.meta_bytes_per_entry()
        C = torch.tensor(self._costs(d, dv, elsize, meta), device=store0.pos.device)
        seen_real = layer.prompt_real + (layer.seen - layer.prompt_len)
        qbar = self._query_group_norms[layer.layer_idx]
        chord = self._chords(layer.layer_idx)
        newest = layer.seen - 1
        per_head = []
        for h, store in enumerate(layer.heads):
            K, V = store.kv()
            per_head.append((K, V, store.payload.tiers(store.n), store.extras[OMEGA.name][:, : store.n], store.pos[:, : store.n].long(),
                             store.valid[:, : store.n]))
        width = max(x[0].shape[1] for x in per_head)
        problems = []
        for b in range(B):
            budget = self._layer_budget(float(seen_real[b]), d, dv, elsize, meta, H)
            sinks, recent = (self.n_sink, self.recent) if self.mode == "top" else \
                self._protect(budget, float(C[1]), H)
            D = torch.zeros(H, width, len(C), device=C.device)
            start = torch.zeros(H, width, dtype=torch.long, device=C.device)
            prot = torch.zeros(H, width, dtype=torch.bool, device=C.device)
            for h, (K, V, tier, om, pos, valid) in enumerate(per_head):
                m = K.shape[1]
                obar = (om[b, :, None] * V[b].float()).sum(0) / om[b].sum().clamp(min=1e-12)
                D[h, :m] = self._distortion(om[b], V[b], K[b], [q[b, h] for q in qbar], [c[h] for c in chord], obar)
                start[h, :m] = torch.where(valid[b], torch.where(tier[b] == 0, 1, tier[b]), 0)
                rank_first = pos[b].masked_fill(~valid[b], SORTS_LAST).argsort().argsort()
                prot[h, :m] = valid[b] & ((pos[b] > newest - recent) | (rank_first < sinks))
            problems.append((D, C, start, prot, budget))
        return problems

    def _chords(self, layer_idx: int) -> list:
        return self._prompt_chord[layer_idx] if self.codebooks == "prompt" else self._books.chord[layer_idx]

"""RetentiveKV: entropy-guided eviction whose evicted tokens live on in fixed-size state-space memories."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from . import retentive_memory as mem
from .base import Method, PrefillContext, check_range, first_real, last_real
from . import retentive_fit
from .retentive_fit import GATE_FIELDS, GateParams, fit_gates
from ..decoding import DecodeStep, Extra
from ..modality import TEXT
from ..protocol import Selection
from ..scoring import group_reduce, pool1d, window_scores

_TINY = 1e-30
ACC = Extra("accumulated_attention", "window attention at prefill, plus the attention of every decode step")
SPATIAL = Extra("spatial_weight", "a visual entry's absorption weight into the (horizontal) visual state")
SPATIAL_V = Extra("spatial_weight_vertical", "a visual entry's absorption weight into the vertical visual sub-state")


@dataclass
class RetentiveKV(Method):
    """Entropy-guided KV retention with state-space memories that absorb the evicted tokens.

    Paper: Liu, Xiong, Jiang, Wang, Lv, Zhang, "RetentiveKV: State-Space Memory for Uncertainty-Aware Multimodal
    KV Cache Eviction", ACL 2026 Findings (arXiv 2605.04075). The mechanism, its formulas and every CHOICE are in
    ``docs/methods/retentivekv.md``; values the paper leaves open are marked CHOICE below and are parameters.

    Parameters
    ----------
    window, n_sink : int
        Observation / protected recent window (CHOICE: 32) and protected first tokens (CHOICE: 4).
    kernel : int
        CHOICE (not in the paper, default off): max-pool the window attention over neighbouring tokens.
    lam : float
        ``lambda`` of the retention score ``R = lam alpha_hat + (1 - lam) H_hat`` (CHOICE: 0.5).
    tau : float
        Text tokens are absorbed only when ``R >= tau`` (CHOICE: 0.1; ``tau > 1`` absorbs no text).
    gate_visual : bool
        CHOICE: apply ``tau`` to visual tokens too (default off).
    state_readout : "scan" | "moments" | "softmax" | "linear" | "none"
        ``"scan"`` (default, the paper's memory): the visual memory is a 2-D scan over each image's token grid with a
        horizontal and a vertical sub-state, the recall state a 1-D scan; per-token decay and input gates from each
        token's entropy; each state read inside the softmax as one pseudo-entry, weighted by a query-conditioned
        gate. ``"moments"`` (alias ``"softmax"``): issue 6's memory (one visual moment state with a Manhattan weight
        around the root patch, absorption by the ``tau`` rule, no gates). ``"linear"``: the paper's literal
        linear-attention readout (``phi = elu + 1``). ``"none"``: plain entropy-guided eviction.
    gamma_h, gamma_v : float
        Decay per grid step of the horizontal and vertical sub-states (CHOICE: 0.9 each).
    gamma_s : float
        Spatial (Manhattan) decay of the ``moments`` visual state (CHOICE: 0.9).
    h_min, beta, gate_centre : float
        Gates ``decay = h_min + (1 - h_min) sigmoid(beta (H - gate_centre))``, ``input = sigmoid(beta (H -
        gate_centre))`` (CHOICE: 0.9, 10, 0.0; the paper: "a sigmoid of the entropy"). ``decay=False`` switches off
        the per-step decay of all states.
    states : "dual" | "single"
        Separate visual and recall states, or one unified state (the paper's ablation).
    query_centre : float
        Centre of the per-step decay of every state by the current query, ``h_min + (1 - h_min) sigmoid(beta (H_t -
        query_centre))`` (CHOICE: 0.5).
    gated : bool | None
        The query-conditioned readout gate ``sigmoid(gate_w H_t + gate_b)`` (CHOICE: (8, -4)); None: on for
        ``scan``, off for ``moments``.
    gates : "hand" | "fit"
        Where the gate constants (``h_min``, ``beta``, ``gate_centre``, ``query_centre``, ``gate_w``, ``gate_b``) come
        from: ``"hand"`` (default) the fields; ``"fit"`` :func:`~.retentive_fit.fit_gates` on the model's own
        calibration text (backbone frozen, KL to the full cache; remembered per model and process; the fields are
        then ignored). A saved cache carries the fitted values.
    mix : "add" | "convex"
        How the linear readout joins local attention.
    absorb_by_attention : bool
        CHOICE (``moments``): multiply absorption weights by the token's relative attention.
    second_order : bool
        Keep ``sum k k^T`` for a second-order denominator (d^2 more floats per state).
    states_in_budget : bool
        CHOICE (default on): the budget is a byte budget (``budget x`` the full cache's K+V bytes) that holds the
        states first and then as many entries (K, V and metadata) as fit; when fewer than ``n_sink + window`` entries
        would fit beside the states, the memory is switched off for the cache (plain eviction). Off: issue 6's
        accounting (the budget counts entries; states on top).
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
    state_readout: Literal["scan", "moments", "softmax", "linear", "none"] = "scan"
    gamma_h: float = 0.9
    gamma_v: float = 0.9
    gate_centre: float = 0.0
    states_in_budget: bool = True
    states: Literal["dual", "single"] = "dual"
    gated: bool | None = None
    gate_w: float = 8.0
    gate_b: float = -4.0
    query_centre: float = 0.5
    gates: str = "hand"  # "hand" | "fit" (checked in validate: a ValueError naming the choices)
    mix: Literal["add", "convex"] = "add"
    absorb_by_attention: bool = False
    second_order: bool = False

    name = "retentivekv"
    summary = "Entropy-guided eviction; evicted tokens absorbed into visual/recall state-space memories (Liu et al., 2026)"
    needs_decode_probs = True
    decodes = True
    evicts_while_decoding = True
    extras = (ACC, SPATIAL, SPATIAL_V)

    @property
    def has_readout(self) -> bool:  # type: ignore[override]
        return self.state_readout != "none" and getattr(self, "_memory", True)

    @property
    def _scan(self) -> bool:
        return self.state_readout == "scan"

    def validate(self) -> None:
        cls = type(self).__name__
        check_range(cls, "window", self.window, 1)
        check_range(cls, "kernel", self.kernel, 1)
        check_range(cls, "n_sink", self.n_sink, 0)
        check_range(cls, "lam", self.lam, 0.0, 1.0)
        check_range(cls, "tau", self.tau, 0.0)
        check_range(cls, "gamma_s", self.gamma_s, 0.0, 1.0, low_open=True)
        check_range(cls, "gamma_h", self.gamma_h, 0.0, 1.0, low_open=True)
        check_range(cls, "gamma_v", self.gamma_v, 0.0, 1.0, low_open=True)
        check_range(cls, "h_min", self.h_min, 0.0, 1.0)
        check_range(cls, "beta", self.beta, 0.0)
        if self.gates not in ("hand", "fit"):
            raise ValueError(f"{cls}.gates must be 'hand' (the fields h_min, beta, gate_centre, query_centre, gate_w, "
                             f"gate_b) or 'fit' (fitted on the model's calibration text), got {self.gates!r}")
        if self.gates == "fit" and self.state_readout == "none":
            raise ValueError(f"{cls}: gates='fit' needs a memory; state_readout='none' has no gate to fit")

    def setup(self, cache) -> None:
        super().setup(cache)
        self._states: dict[int, dict[str, torch.Tensor]] = {}
        self._sink_end: torch.Tensor | None = None  # [B] first position after each row's sinks
        self._derived: dict = {}  # per-step working terms of the first-order readout (one layer at a time)
        self._groups: list[str] | None = None  # the states kept, in order: "h", "v" (visual scan), "v", "t", "all"
        self._memory = True  # False when the states do not fit in the byte budget (plain eviction)
        self._byte_accounting: dict | None = None  # byte accounting of the entries and states (states_in_budget)
        self.fit_report = None  # gates="fit": the retentive_fit.FitReport the gate values come from
        self._gate_params = GateParams.of(self)
        if self.gates == "fit":
            model = cache.model_ref() if cache is not None else None
            if model is None:
                raise ValueError("RetentiveKV(gates='fit') fits its gates on the cache's model: build it in a KVCache")
            self.fit_report = fit_gates(model, self, **retentive_fit.FIT_SETTINGS)
            self._gate_params = self.fit_report.params

    @property
    def gate_params(self) -> GateParams:
        """The gate constants in use: the fields (``gates="hand"``) or the fitted values (``gates="fit"``)."""
        gp = self.__dict__.get("_gate_params")
        return gp if gp is not None else GateParams.of(self)

    def fit_base(self) -> dict:
        """This method's parameters other than the gates: the configuration the gates are fitted for."""
        skip = {"gates", *GATE_FIELDS}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init and f.name not in skip}

    # -- state storage ----------------------------------------------------------------------------------------
    @property
    def num_states(self) -> int:
        if getattr(self, "_groups", None) is not None:
            return len(self._groups)
        return 2 if self.states == "dual" else 1

    def _choose_groups(self, any_visual: bool) -> list[str]:
        """The states of this cache: the recall state, and the visual ones only when the prompt has visual tokens."""
        if self.states == "single":
            return ["all"]
        if not any_visual:
            return ["t"]
        return ["h", "v", "t"] if self._scan else ["v", "t"]

    def _state_floats(self, d: int, dv: int) -> int:
        if self.state_readout == "linear":
            return d * dv + d + 1
        return mem.moment_state_floats(d, dv, self.second_order)

    def _empty_states(self, B: int, H: int, d: int, dv: int, device) -> dict[str, torch.Tensor]:
        return mem.empty_states(B, H, self.num_states, d, dv, device, self.state_readout == "linear", self.second_order)

    def _absorb(self, states: dict, g: int, w: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                heads: slice = slice(None), decay: torch.Tensor | None = None) -> None:
        """Add tokens to state ``g`` (:func:`~.retentive_memory.absorb`)."""
        mem.absorb(states, g, w, keys, values, self.state_readout == "linear", heads, decay)

    def state_bytes(self, layer) -> int:
        states = self._states.get(layer.rank, {})
        return sum(t.numel() * t.element_size() for name, t in states.items() if not name.startswith("_"))

    def state_dict(self, layer=None) -> dict[str, torch.Tensor]:
        """The layer's state memories (the sums and their lazy decay scale); for ``layer=None`` the sinks' end."""
        if layer is None:
            out = {} if self._sink_end is None else {"sink_end": self._sink_end}
            if self._groups is not None:
                out["groups"] = torch.tensor([ord(g[0]) for g in self._groups], dtype=torch.int32)
                out["memory"] = torch.tensor(self._memory)
            if self.gates == "fit":  # the fitted numbers travel with a saved cache
                out["gates"] = self.gate_params.as_tensor()
            accounting = self._byte_accounting
            if accounting is not None:
                out["acct"] = torch.tensor([accounting["payload"], accounting["entry"], accounting["state"]],
                                           dtype=torch.float64)
            return out
        states = self._states.get(layer.rank, {})
        return {name: t for name, t in states.items() if not name.startswith("_")}

    def select_batch(self, index: torch.Tensor) -> None:
        """The sinks' end and every layer's state memories are per row."""
        if self._sink_end is not None:
            self._sink_end = self._sink_end.index_select(0, index.to(self._sink_end.device))
        for states in self._states.values():
            for name, t in list(states.items()):
                if torch.is_tensor(t):
                    states[name] = t.index_select(0, index.to(t.device))
            states["_version"] = states.get("_version", 0) + 1
        self._derived = {}

    def load_state_dict(self, layer, state: dict[str, torch.Tensor]) -> None:
        if layer is None:
            self._sink_end = state.get("sink_end")
            if "groups" in state:
                names = {"h": "h", "v": "v", "t": "t", "a": "all"}
                self._groups = [names[chr(int(c))] for c in state["groups"]]
                self._memory = bool(state["memory"])
            if "gates" in state:
                self._gate_params = GateParams.from_tensor(state["gates"])
            if "acct" in state:
                payload, entry, state_bytes = (float(x) for x in state["acct"])
                self._byte_accounting = {"payload": payload, "entry": entry, "state": state_bytes}
        elif state:
            self._states[layer.rank] = dict(state)

    # -- prefill ----------------------------------------------------------------------------------------------
    def _grid(self, ctx: PrefillContext):
        """(item, row, col) [B, n] of the context's tokens: the cache's ModalityLayout when given, else each run
        of visual tokens is one image laid out as a square (:func:`~.retentive_memory.square_grid`)."""
        B, n = ctx.modality.shape
        dev = ctx.modality.device
        pos = ctx.positions.expand(B, n) if ctx.positions.dim() == 1 else ctx.positions
        layout = getattr(self.cache, "layout", None)
        if layout is not None and layout.ids.shape[0] == B and int(pos.max()) < layout.ids.shape[1]:
            p = pos.long().cpu()
            return tuple(getattr(layout, f).gather(1, p).to(dev) for f in ("item", "row", "col"))
        return tuple(t.to(dev) for t in mem.square_grid(ctx.modality.cpu()))

    def _spatial_weights(self, ctx: PrefillContext, R: torch.Tensor) -> torch.Tensor:
        """[B, H, n] spatial weight of every visual token (:func:`~.retentive_memory.manhattan_weights`)."""
        return mem.manhattan_weights(*self._grid(ctx), R, self.gamma_s)

    def _spatial_scan(self, ctx: PrefillContext, R: torch.Tensor, gate: torch.Tensor):
        """[B, H, n] weights in the horizontal and vertical sub-states (:func:`~.retentive_memory.scan_weights`)."""
        return mem.scan_weights(*self._grid(ctx), R, gate, self.gamma_h, self.gamma_v)

    def _account(self, ctx: PrefillContext, extras: int) -> torch.Tensor:
        """Entries each (row, head) keeps when the states count inside the budget (``states_in_budget``), decided at the
        first layer: the byte budget ``budget x n x (K+V bytes of one token)`` holds the states first and then as
        many entries (K, V and their metadata) as fit; when fewer than ``n_sink + window`` entries would fit, the
        memory is switched off for this cache and the entries take the whole budget (CHOICE)."""
        k = ctx.budget_tokens
        cache = self.cache
        budget = getattr(cache, "budget", None)
        if not self.states_in_budget or budget is None or budget.is_full:
            self._byte_accounting = None
            return k
        if ctx.layer_rank == 0 or self._byte_accounting is None:
            d, dv = ctx.keys.shape[-1], ctx.values.shape[-1]
            payload = d * ctx.keys.element_size() + dv * ctx.values.element_size()
            entry = payload + 4 + 1 + 1 + 4 * extras  # as HeadStore counts: pos, modality, validity, float32 extras
            self._memory = self.state_readout != "none"
            state = 4 * self.num_states * self._state_floats(d, dv) if self._memory else 0
            self._byte_accounting = {"payload": payload, "entry": entry, "state": state}
            fits = mem.entries_within(self._bytes_budget(budget, ctx.n_real, k), state, entry)
            if self._memory and bool((fits < torch.clamp(k, max=self.n_sink + self.window)).any()):
                self._memory = False
                self._byte_accounting["state"] = 0
        accounting = self._byte_accounting
        return torch.minimum(k, mem.entries_within(self._bytes_budget(budget, ctx.n_real, k), accounting["state"],
                                                   accounting["entry"]))

    def _bytes_budget(self, budget, seen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Bytes one (row, head) may hold after ``seen`` tokens: the ratio (or the absolute budget ``tokens``, capped by
        ``decode_budget``) of the full cache's K+V bytes."""
        t = seen.double() * budget.value if budget.is_ratio else tokens.double()
        if budget.decode is not None:
            t = t.clamp(max=budget.decode)
        return t * self._byte_accounting["payload"]

    def _byte_target(self, layer) -> torch.Tensor:
        """[B] entries one (row, head) of ``layer`` may hold beside the states in this step's byte budget (the same
        for every head; each head's prefill selection is its floor, see :meth:`_over_byte_budget`)."""
        budget = layer.cache.budget
        seen = layer.prompt_real + (layer.seen - layer.prompt_len)
        tokens = seen.clamp(max=budget.value) if not budget.is_ratio else seen
        accounting = self._byte_accounting
        return mem.entries_within(self._bytes_budget(budget, seen, tokens), accounting["state"], accounting["entry"])

    def _over_byte_budget(self, layer, h: int, byte_target: torch.Tensor):
        """:meth:`CompressedLayer.over_budget` with the states inside the budget: entries head ``h`` holds beyond what
        fits beside the states in this step's byte budget (``byte_target``, :meth:`_byte_target`): an int for one
        sequence without holes, else [B]."""
        store = layer.heads[h]
        target = torch.maximum(byte_target, layer.prefill_kept[h].to(byte_target.device))
        if store.batch == 1 and store.all_valid:
            return store.n - int(target[0])
        return (store.valid[:, : store.n].sum(-1) - target.to(store.valid.device)).clamp(min=0)

    def _group_over(self, g):
        """:meth:`~modalkv.decoding.Group.over` with the states inside the budget (:meth:`_over_byte_budget` per head,
        the byte target computed once per layer and step)."""
        if self._byte_accounting is None:
            return g.over()
        byte_target = self._byte_target(g.layer)
        over = [self._over_byte_budget(g.layer, h, byte_target) for h in g.heads]
        if all(isinstance(o, int) for o in over):
            if all(o == over[0] for o in over):
                return max(0, over[0])
            return torch.tensor(over, device=g.pos.device).clamp(min=0)[None]
        B = g.pos.shape[0]
        return torch.stack([torch.as_tensor(o, device=g.pos.device).expand(B) for o in over], 1).clamp(min=0)

    def prefill(self, ctx: PrefillContext) -> Selection:
        B, H, n = ctx.real.shape[0], ctx.num_kv_heads, ctx.n
        rows = min(self.window, n)
        alpha = group_reduce(window_scores(ctx.query, ctx.keys, ctx.scaling, self.window, ctx.real), H, "mean") / rows
        if self.kernel > 1:
            alpha = pool1d(alpha, self.kernel, "max")
        visual = ((ctx.modality != TEXT) & ctx.real)[:, None, :]
        text = ((ctx.modality == TEXT) & ctx.real)[:, None, :]
        R = mem.retention_score(alpha, visual, self.lam) + mem.retention_score(alpha, text, self.lam)
        if ctx.layer_rank == 0 or self._groups is None:
            self._groups = self._choose_groups(bool(visual.any()))
        k = self._account(ctx, 3 if self._scan else 2)
        protect = first_real(ctx.real, self.n_sink) | last_real(ctx.real, torch.clamp(k, max=self.window))
        keep = self.top(ctx, R, k, force=protect)
        kept = torch.zeros(B, H, n + 1, dtype=torch.bool, device=R.device)
        kept.scatter_(2, keep.masked_fill(keep < 0, n), True)
        evicted = ctx.real[:, None, :] & ~kept[..., :n]
        h_hat = mem.token_entropy(alpha, visual) + mem.token_entropy(alpha, text)
        extras = {ACC.name: alpha}
        gp = self.gate_params
        if self._scan:
            gate = mem.decay_gate(h_hat, gp.h_min, gp.beta, gp.gate_centre)
            zero = torch.zeros_like(R)
            extras[SPATIAL.name], extras[SPATIAL_V.name] = self._spatial_scan(ctx, R, gate) if bool(visual.any()) else (zero, zero)
        else:
            extras[SPATIAL.name] = self._spatial_weights(ctx, R) if bool(visual.any()) else torch.zeros_like(R)
        if self.cache is not None and ctx.layer_rank == 0:
            pos = ctx.positions.expand(B, n) if ctx.positions.dim() == 1 else ctx.positions
            sinks = first_real(ctx.real, self.n_sink)
            self._sink_end = torch.where(sinks, pos.long() + 1, torch.zeros_like(pos, dtype=torch.long)).amax(-1)
        if self.has_readout:
            states = self._empty_states(B, H, ctx.keys.shape[-1], ctx.values.shape[-1], ctx.keys.device)
            vis_ev = evicted & visual
            if self.gate_visual:
                vis_ev = vis_ev & (R >= self.tau)
            txt_ev = evicted & text & (R >= self.tau)
            if self._scan:
                a = mem.input_gate(h_hat, gp.beta, gp.gate_centre)
                # the recall state scans the absorbed text tokens in order; each one's decay gate acts on what came before
                w_txt, _ = mem.scan1d(a, mem.decay_gate(h_hat, gp.h_min, gp.beta, gp.gate_centre), txt_ev)
                by_group = {"h": a * extras[SPATIAL.name] * vis_ev, "v": a * extras[SPATIAL_V.name] * vis_ev, "t": w_txt}
            else:
                w_vis, w_txt = extras[SPATIAL.name] * vis_ev, txt_ev.float()
                if self.absorb_by_attention:
                    rel = alpha / alpha.masked_fill(~ctx.real[:, None, :], 0).sum(-1, keepdim=True).clamp(min=_TINY)
                    rel = rel * ctx.n_real.view(B, 1, 1)
                    w_vis, w_txt = w_vis * rel, w_txt * rel
                by_group = {"v": w_vis, "t": w_txt}
            by_group["all"] = sum(w for g, w in by_group.items() if g != "v" or not self._scan)
            for g, name in enumerate(self._groups):
                w = by_group[name]
                if bool((w > 0).any()):
                    self._absorb(states, g, w, ctx.keys, ctx.values)
            self._states[ctx.layer_rank] = states
        return Selection(keep, extras=extras)

    # -- decode -----------------------------------------------------------------------------------------------
    def decode(self, step: DecodeStep) -> None:
        states = self._states.get(step.layer.rank)
        for g in step.groups():
            p = g.probs().mean(2)  # [B, H', q, n] over the group's query heads
            acc = g.extra(ACC.name)
            acc += p.sum(2).float()
            last = p[:, :, -1].float()  # the current query's attention
            valid = g.valid
            visual = (g.mod != TEXT) & valid
            if states is not None and self.decay:  # the decay of this step, from the attention before any eviction
                among = torch.where(visual.sum(-1, keepdim=True) > 1, visual, valid)
                gp = self.gate_params
                h_t = gp.h_min + (1 - gp.h_min) * torch.sigmoid(gp.beta * (mem.row_entropy(last, among) - gp.query_centre))
            over = self._group_over(g)
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
                if states is not None:
                    def absorb(g, victims, use, states=states, last=last, valid=valid, visual=visual):
                        self._absorb_victims(states, g, last, valid, visual, victims, use)
                g.evict(acc.masked_fill(protected, float("inf")), over, keep_protected=True, on_evict=absorb)
            if states is not None and self.decay:
                scale = states["scale"][:, g.index]  # [B, H', S]
                scale *= h_t[..., None]
                if bool((scale < 1e-20).any()):  # fold the lazy scale back into the sums before it underflows
                    mem.fold_scale(states)

    def _victim_weights(self, att, visual, text, spatial, victims, use, count) -> list[tuple]:
        """(weights [..., m], decay [...] or None) of the victims per state, from the current attention rows att [..., n]:
        visual victims by their spatial weights ``spatial`` (extra name -> [..., n]: SPATIAL, and SPATIAL_V with the
        scan memory; gated by tau with ``gate_visual``),
        text victims when their R >= tau; ``count`` entries the attention is spread over (``absorb_by_attention``).
        With the scan memory each victim enters through its input gate and, one after the other, decays the state it
        enters by its decay gate (both from its entropy in the current attention)."""
        R = mem.retention_score(att, visual, self.lam) + mem.retention_score(att, text, self.lam)
        r_v, is_vis = R.gather(-1, victims), visual.gather(-1, victims)
        vis = is_vis & use
        if self.gate_visual:
            vis = vis & (r_v >= self.tau)
        txt = ~is_vis & use & (r_v >= self.tau)
        if self._scan:
            h_hat = (mem.token_entropy(att, visual) + mem.token_entropy(att, text)).gather(-1, victims)
            gp = self.gate_params
            a, dec = mem.input_gate(h_hat, gp.beta, gp.gate_centre), mem.decay_gate(h_hat, gp.h_min, gp.beta, gp.gate_centre)
            sw, sv = spatial[SPATIAL.name].gather(-1, victims), spatial[SPATIAL_V.name].gather(-1, victims)
            inputs = {"h": (a * sw, vis), "v": (a * sv, vis), "t": (a, txt),
                      "all": (torch.where(vis, a * sw, a), vis | txt)}
            return [mem.scan1d(inputs[g][0], dec, inputs[g][1]) for g in self._groups]
        w_vis = spatial[SPATIAL.name].gather(-1, victims) * vis
        w_txt = txt.float()
        if self.absorb_by_attention:
            rel = att.gather(-1, victims) * count
            w_vis, w_txt = w_vis * rel, w_txt * rel
        by_group = {"v": w_vis, "t": w_txt, "all": w_vis + w_txt}
        groups = self._groups or (["v", "t"] if self.num_states == 2 else ["all"])
        return [(by_group[g], None) for g in groups]

    def _absorb_victims(self, states, g, last, valid, visual, victims, use) -> None:
        """The eviction routine's hook: fold the victims [B, H', m] (``use`` marks real ones, None = all) of the
        group ``g`` into the states before they are removed."""
        use = torch.ones_like(victims, dtype=torch.bool) if use is None else use
        text = (g.mod == TEXT) & valid
        spatial = {SPATIAL.name: g.extra(SPATIAL.name)}
        if self._scan:  # (reading an extra adds it: only the scan memory has the vertical weights)
            spatial[SPATIAL_V.name] = g.extra(SPATIAL_V.name)
        weights = self._victim_weights(last, visual, text, spatial, victims, use, valid.sum(-1, keepdim=True))
        k, v = g.keys_values(victims)
        for i, (w, dec) in enumerate(weights):
            if bool((w > 0).any()):
                self._absorb(states, i, w, k, v, heads=g.index, decay=dec)

    # -- attention readout ------------------------------------------------------------------------------------
    @property
    def _gated(self) -> bool:
        return self._scan if self.gated is None else self.gated  # the scan memory's gate is query-conditioned

    def readout(self, layer, h, query, logits, values):
        states = self._states[layer.rank]
        q = query.float()
        gp = self.gate_params
        if self.state_readout == "linear":
            return mem.linear_readout(states, h, q, logits, values, gp.gate_w, gp.gate_b, self.mix == "convex")
        if not self._gated and "C" not in states:
            return self._readout_first_order(layer, h, q, logits, values, states)
        return mem.moment_readout(states, h, q, logits, values, self._gated, gp.gate_w, gp.gate_b)

    def readout_layer(self, layer, query, logits, values):
        """Every KV head's readout in one set of tensor ops (:func:`~.retentive_memory.moment_readout_layer`,
        :func:`~.retentive_memory.first_order_readout_layer`); the linear readout keeps the head-by-head loop."""
        if self.state_readout == "linear":
            return super().readout_layer(layer, query, logits, values)
        states = self._states[layer.rank]
        q = query.float()
        gp = self.gate_params
        if not self._gated and "C" not in states:
            return mem.first_order_readout_layer(mem.first_order_terms(states), q, logits, values)
        return mem.moment_readout_layer(states, q, logits, values, self._gated, gp.gate_w, gp.gate_b)

    def _readout_first_order(self, layer, h, q, logits, values, states):
        """The first-order softmax readout (:func:`~.retentive_memory.first_order_readout`); its per-state terms are
        derived once per layer and step for all heads (working memory, dropped after the layer's last head)."""
        if h == 0 or self._derived.get("rank") != layer.rank:
            self._derived = {"rank": layer.rank, **mem.first_order_terms(states)}
        out = mem.first_order_readout(self._derived, h, q, logits, values)
        if h == len(layer.heads) - 1:
            self._derived = {}
        return out

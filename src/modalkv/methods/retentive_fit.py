"""RetentiveKV's gate parameters fitted on the model's own calibration text, the backbone frozen.

Paper: Liu et al., "RetentiveKV: State-Space Memory for Uncertainty-Aware Multimodal KV Cache Eviction", ACL 2026
Findings (arXiv 2605.04075). The paper gives its gates as sigmoids of the token entropy and a query-conditioned
readout gate, not their constants; :class:`~.retentivekv.RetentiveKV` sets them by hand (``gates="hand"``) or, with
``gates="fit"``, takes them from :func:`fit_gates`.

The fit (CHOICE: objective, data and optimiser are ours, see ``docs/methods/retentivekv.md``):

* data: ``prompts`` calibration prompts of ``tokens`` tokens, each followed by ``steps`` continuation tokens, cut in
  order from :func:`~.spherical.codebooks.calibration_ids` (the Wikipedia summaries Spherical KV calibrates on, through
  the model's own tokenizer; seeded random ids for a model without one, e.g. the tiny test models);
* objective: the mean KL(full cache || RetentiveKV) of the next-token distribution over the teacher-forced
  continuation, RetentiveKV compressing the prompt at ``budget`` with the states inside the budget;
* optimiser: coordinate search over a small grid per parameter (:data:`GRID`), starting from the hand values
  (:data:`HAND`), ``rounds`` passes; a move is taken only when it lowers the objective (ties keep the current value,
  so the result is deterministic). Each prompt is prefilled once (its layers' prefill tensors kept, as :mod:`modalkv.replay` does); a
  candidate re-runs only the compression and the ``steps`` decode steps.

The result is remembered per model (weakly) and per fit settings and the method's other parameters, as Spherical KV's
codebooks are: a second cache with the same configuration does no work.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass, field

import torch

from ..cache import KVCache, cache_kwargs
from ..layer import CompressedLayer
from ..protocol import Selection
from .full import Full

GATE_FIELDS = ("h_min", "beta", "gate_centre", "query_centre", "gate_w", "gate_b")


@dataclass(frozen=True)
class GateParams:
    """RetentiveKV's gate constants: the token gates ``decay = h_min + (1 - h_min) sigmoid(beta (H - gate_centre))``
    and ``input = sigmoid(beta (H - gate_centre))``, the per-step decay of the states by the current query
    ``h_min + (1 - h_min) sigmoid(beta (H_t - query_centre))``, and the readout gate ``sigmoid(gate_w H_t + gate_b)``."""

    h_min: float
    beta: float
    gate_centre: float
    query_centre: float
    gate_w: float
    gate_b: float

    def replace(self, **changes) -> "GateParams":
        return dataclasses.replace(self, **changes)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, f) for f in GATE_FIELDS], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "GateParams":
        if t.numel() != len(GATE_FIELDS):
            raise ValueError(f"gate parameters: expected {len(GATE_FIELDS)} numbers, got {t.numel()}")
        return cls(*(float(x) for x in t.flatten()))

    @classmethod
    def of(cls, method) -> "GateParams":
        """The hand-set values of a RetentiveKV instance (its fields)."""
        return cls(*(float(getattr(method, f)) for f in GATE_FIELDS))


#: the hand-set defaults of RetentiveKV (the fit's starting point)
HAND = GateParams(h_min=0.9, beta=10.0, gate_centre=0.0, query_centre=0.5, gate_w=8.0, gate_b=-4.0)

#: CHOICE: the values the coordinate search tries per parameter (each list holds the hand value)
GRID = {
    "gate_centre": (0.0, 0.05, 0.1, 0.25, 0.5),
    "beta": (2.0, 5.0, 10.0, 20.0),
    "h_min": (0.5, 0.8, 0.9, 0.97, 1.0),
    "query_centre": (0.0, 0.25, 0.5, 0.75, 1.0),
    "gate_w": (0.0, 4.0, 8.0, 16.0),
    "gate_b": (-8.0, -4.0, -2.0, 0.0, 2.0),
}


@dataclass
class FitReport:
    """What :func:`fit_gates` found and what it cost."""

    params: GateParams
    start: GateParams
    objective: float  # mean KL(full || fitted) on the calibration continuations
    objective_start: float  # the same at the starting point
    seconds: float
    forwards: int  # model forward passes (prefills and decode steps, the full-cache reference included)
    prompts: int
    prompt_tokens: int  # per prompt
    steps: int  # teacher-forced continuation tokens per prompt
    budget: float
    candidates: int  # distinct parameter settings evaluated
    trace: list = field(default_factory=list)  # (parameter, value, objective) of every evaluation, in order


#: the fit settings RetentiveKV(gates="fit") uses (keyword arguments of :func:`fit_gates`)
FIT_SETTINGS = {"prompts": 2, "tokens": 1024, "steps": 16, "budget": 0.2, "rounds": 1}

#: model -> {fit key: FitReport} (held weakly: the fits go with the model)
FITTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _base_key(base: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in base.items()))


def calibration_prompts(model, prompts: int, tokens: int, steps: int) -> list[tuple[torch.Tensor, list[int]]]:
    """(prompt ids [1, tokens], continuation ids) of each calibration prompt, cut in order from the calibration text."""
    from .spherical.codebooks import calibration_ids

    span = tokens + steps
    ids = calibration_ids(model, prompts * span)
    if ids.shape[1] < prompts * span:
        raise ValueError(f"the calibration text has {ids.shape[1]} tokens, fewer than {prompts} prompts of {span}")
    return [(ids[:, i * span: i * span + tokens], ids[0, i * span + tokens: (i + 1) * span].tolist())
            for i in range(prompts)]


class _Capture(Full):
    """Keeps nothing and records each managed layer's prefill tensors, so that every candidate compresses the same
    prefill (what :mod:`modalkv.replay` does for the benchmarks; a method module may not import it)."""

    name = "capture"

    def prefill(self, ctx):
        self.captured[ctx.layer.layer_idx] = (ctx.query, ctx.keys, ctx.values, ctx.real, ctx.scaling)
        B, H = ctx.keys.shape[:2]
        return Selection(torch.empty(B, H, 0, dtype=torch.long, device=ctx.keys.device))


class _Prefill:
    """One text prompt's forward, kept to build the cache of any method and budget from it."""

    def __init__(self, model, ids: torch.Tensor):
        cache = KVCache(model, _Capture())
        cache.method.captured = {}
        with torch.no_grad():
            model(input_ids=ids, **cache_kwargs(model, cache))
        self.layers = cache.method.captured
        self.others = {i: layer for i, layer in enumerate(cache.layers) if not isinstance(layer, CompressedLayer)}
        self.seen = max(layer.seen for layer in cache.managed_layers)

    def build_cache(self, model, method, budget: float = 1.0) -> KVCache:
        cache = KVCache(model, method, budget)
        cache.load_prefill(self.layers, self.others, self.seen)
        return cache


class _Objective:
    """Mean KL(full || RetentiveKV with given gates) over the calibration continuations; one prefill per prompt."""

    def __init__(self, model, data, budget: float, method):
        self.model, self.budget = model, budget
        self.cls, self.base = type(method), method.fit_base()
        self.forwards = 0
        self.caps, self.conts, self.refs = [], [], []
        for ids, cont in data:
            cap = _Prefill(model, ids)
            self.forwards += 1
            self.caps.append(cap)
            self.conts.append(cont)
            self.refs.append(self._decode(cap.build_cache(model, "full"), ids.shape[1], cont))

    @torch.no_grad()
    def _decode(self, cache, length: int, cont: list[int]) -> torch.Tensor:
        """[steps, V] log-probabilities of the next token after each teacher-forced continuation token."""
        kw = cache_kwargs(self.model, cache)
        out = []
        for i, t in enumerate(cont):
            logits = self.model(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[length + i]]), **kw).logits
            self.forwards += 1
            out.append(torch.log_softmax(logits[0, -1].float(), -1))
        return torch.stack(out)

    def __call__(self, params: GateParams) -> float:
        kls = []
        for cap, cont, ref in zip(self.caps, self.conts, self.refs):
            method = self.cls(**self.base, gates="hand", **dataclasses.asdict(params))
            cache = cap.build_cache(self.model, method, self.budget)
            logp = self._decode(cache, cap.seen, cont)
            kls.append((ref.exp() * (ref - logp)).sum(-1))
        return float(torch.cat(kls).mean())


def fit_gates(model, method, *, prompts: int = 2, tokens: int = 1024, steps: int = 16,
              budget: float = 0.2, rounds: int = 1, start: GateParams = HAND, grid: dict | None = None) -> FitReport:
    """Fit RetentiveKV's gate parameters (:class:`GateParams`) on ``model``'s calibration text; the model is not
    changed. ``method``: a :class:`~.retentivekv.RetentiveKV` whose other parameters (all but ``gates`` and the gate
    fields) the gates are fitted for. Remembered per model and arguments (:data:`FITTED`); see the module docstring for
    the objective and the search."""
    if not callable(getattr(method, "fit_base", None)):
        raise TypeError(f"fit_gates: method must be a RetentiveKV instance, got {type(method).__name__}")
    base = method.fit_base()
    if base.get("state_readout") == "none":
        raise ValueError("fit_gates: state_readout='none' has no memory, so no gate to fit")
    if not 0 < budget < 1:
        raise ValueError(f"fit_gates: budget must be in (0, 1), got {budget}")
    if prompts < 1 or tokens < 1 or steps < 1 or rounds < 0:
        raise ValueError(f"fit_gates: prompts, tokens, steps must be >= 1 and rounds >= 0, got "
                         f"{prompts}, {tokens}, {steps}, {rounds}")
    grid = GRID if grid is None else grid
    unknown = sorted(set(grid) - set(GATE_FIELDS))
    if unknown:
        raise ValueError(f"fit_gates: unknown gate parameters in grid: {', '.join(unknown)} (known: {GATE_FIELDS})")
    key = (prompts, tokens, steps, float(budget), rounds, start, tuple((k, tuple(v)) for k, v in grid.items()),
           type(method).__name__, _base_key(base))
    per_model = FITTED.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    t0 = time.perf_counter()
    with torch.no_grad():
        objective = _Objective(model, calibration_prompts(model, prompts, tokens, steps), budget, method)
        seen: dict[GateParams, float] = {}
        trace = []

        def evaluate(p: GateParams, name: str, value) -> float:
            if p not in seen:
                seen[p] = objective(p)
                trace.append((name, value, seen[p]))
            return seen[p]

        best = start
        best_f = evaluate(start, "start", None)
        start_f = best_f
        for _ in range(rounds):
            moved = False
            for name, values in grid.items():
                for value in values:
                    cand = best.replace(**{name: float(value)})
                    f = evaluate(cand, name, float(value))
                    if f < best_f:
                        best, best_f, moved = cand, f, True
            if not moved:
                break
    report = FitReport(best, start, best_f, start_f, time.perf_counter() - t0, objective.forwards, prompts, tokens,
                       steps, float(budget), len(seen), trace)
    per_model[key] = report
    return report

"""InduceKV — fixed-footprint continual adaptation of a frozen model through induced KV memories.

Paper: Chen, Feng, Xiao, Tang, "InduceKV: Fixed-Footprint Continual Adaptation of Multimodal LLMs via Inducing KV
Memories", arXiv 2607.02010 (NeurIPS 2026).

InduceKV is not a cache-compression method: it is continual learning in which every task update lives in a memory
bank of key/value payloads that are placed before the live prompt in every layer. The backbone is never updated,
no raw training data is kept, and the bank never exceeds one byte budget, whatever the number of tasks.

* **Entry.** One selected training prefix (input + answer) becomes ``e = (κ, P)``: a frozen retrieval key κ (the
  mean of one layer's hidden states over the instruction tokens, unit norm) and, per layer and KV head, ``ell``
  key/value pairs chosen from the prefix by SnapKV scoring with the answer tokens as observation window (the
  answer tokens are always kept). Keys are stored *before* RoPE (un-rotated after capture) and re-rotated at
  placement, so each entry gets its own positions wherever it lands (CHOICE of the spec's two options).
* **Retrieval.** ``score_m(x) = cos(W (q(x) - mu), W (κ_m - mu)) / tau + b_task(m)``: the calibration φ = (W, mu,
  b) starts at the identity and is refitted on every task by the retrieval likelihood (the inner problem). The
  top ``top_k`` entries are placed before the prompt (CHOICE: cosine after W, and the centring mu).
* **Consolidation.** When a task arrives, its candidates join the bank's entries in one pool and the bank is
  re-selected under the same byte budget, so old tasks' memories shrink instead of the bank growing. Selection:
  ``bilevel`` (the paper's: projected gradient on capped-simplex weights w through the frozen model, with the
  retrieval weights as an attention bias, anchor retention and coverage terms), ``greedy`` (the spec's cheap
  fallback: marginal gain of NLL reduction + anchor facility location + coverage facility location; default on
  the CPU), ``random`` (an ablation) and ``all`` (no budget: the unbounded upper bound).
* **Fixed footprint.** Everything deployed is counted: payloads, keys, task ids, gains, W, mu, the task biases
  (``max_tasks`` slots) and the anchors (``max_anchors`` slots, per-task shares shrink by k-centre as tasks
  arrive). :attr:`MemoryBank.nbytes` is the byte size of exactly what :meth:`MemoryBank.save` writes.
* **Refinement (optional).** ``refine_steps`` > 0 tunes each new entry's payload by gradient descent on its own
  answer's NLL through the frozen model (the backbone gets no gradient).

Further CHOICEs (configurable): payloads stored in float16 (``dtype``), entries ordered best-first before the prompt
(``order``), no attention bias at inference (``soft_bias``), ``ell`` = 32 and ``top_k`` = 4 (CPU scale; the paper
uses 256 and 8), the greedy's per-token NLL gain, the normalised gradient step of the bilevel solver, and the
k-centre prefilter to ``prefilter`` x capacity candidates. Only full-attention RoPE models are supported (a memory must
be read by every layer; sliding-window layers such as Gemma-3's would forget it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from . import scoring
from .cache import cache_kwargs

FORMAT = "modalkv-inducekv/1"
SELECTIONS = ("greedy", "bilevel", "random", "all")


# ---------------------------------------------------------------------------------------------------------------
# Examples and the model's geometry
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training example of a task.

    ``prefix`` is the input followed by its answer (the payload's source); ``key_span`` the prefix tokens pooled into
    the retrieval key; ``answer_span`` the answer tokens inside the prefix. ``query`` is the input alone as it is
    asked at inference and ``target`` the answer tokens that follow it (probe likelihood and calibration).
    ``model_kwargs`` (e.g. ``pixel_values``) go with both the prefix and the query.
    """

    prefix: torch.Tensor
    key_span: tuple[int, int]
    answer_span: tuple[int, int]
    query: torch.Tensor
    target: torch.Tensor
    query_span: tuple[int, int] | None = None
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.prefix = torch.as_tensor(self.prefix, dtype=torch.long).flatten()
        self.query = torch.as_tensor(self.query, dtype=torch.long).flatten()
        self.target = torch.as_tensor(self.target, dtype=torch.long).flatten()
        n = self.prefix.numel()
        for name, span in (("key_span", self.key_span), ("answer_span", self.answer_span)):
            if not (0 <= span[0] < span[1] <= n):
                raise ValueError(f"Example.{name} {span} is not a non-empty span of the {n}-token prefix")
        if self.query_span is not None and not (0 <= self.query_span[0] < self.query_span[1] <= self.query.numel()):
            raise ValueError(f"Example.query_span {self.query_span} is not inside the {self.query.numel()}-token query")
        if self.target.numel() == 0 or self.query.numel() == 0:
            raise ValueError("Example needs a non-empty query and target")


def geometry(model) -> tuple[int, int, int, int]:
    """(layers, KV heads, head dim, hidden size) of the language model."""
    from .models import model_info

    info = model_info(model)
    hidden = model.config.get_text_config(decoder=True).hidden_size
    return info["num_layers"], info["num_kv_heads"], info["head_dim"], hidden


def _rope(model):
    """The language model's single rotary embedding, or an error naming why memories cannot be placed."""
    from .models import model_info

    info = model_info(model)
    kinds = set(info["layer_types"])
    if kinds != {"full_attention"}:
        raise ValueError(
            f"InduceKV: {info['model_type']} has {sorted(kinds - {'full_attention'})} layers; a memory must be read "
            "by every layer, so only models whose layers all use full attention are supported")
    ropes = [m for name, m in model.named_modules() if name.endswith("rotary_emb")]
    if len(ropes) != 1:
        raise ValueError(f"InduceKV re-rotates memory keys and needs exactly one rotary embedding (RoPE) module; "
                         f"{info['model_type']} has {len(ropes)}")
    return ropes[0]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cos_sin(rope, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """RoPE tables at ``positions`` (any shape) as [*positions.shape, d] float32, and the module's scaling."""
    flat = positions.reshape(1, -1).long()
    cos, sin = rope(like[..., :1, :].float(), flat)
    shape = (*positions.shape, cos.shape[-1])
    return cos[0].float().reshape(shape), sin[0].float().reshape(shape), float(getattr(rope, "attention_scaling", 1.0))


def rotate(keys, cos, sin):
    """Apply RoPE as the model does (``cos``/``sin`` from the model's rotary module)."""
    return keys * cos + _rotate_half(keys) * sin


def unrotate(keys, cos, sin, scale: float = 1.0):
    """Invert :func:`rotate` (the rotation is orthogonal up to the rotary module's attention scaling)."""
    return (keys * cos - _rotate_half(keys) * sin) / (scale * scale)


# ---------------------------------------------------------------------------------------------------------------
# Forward passes through the frozen model
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_weight_grads(model):
    """Gradients may flow *through* the model (to memory payloads or selection weights), never into its weights."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _forward(model, ids: torch.Tensor, cache=None, mask=None, **model_kwargs):
    # a peft wrapper's forward takes **kwargs: the cache keyword is named after the model it wraps
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = cache_kwargs(inner, cache) if cache is not None else {"use_cache": False}
    return model(input_ids=ids, attention_mask=mask, **kw, **model_kwargs)


@torch.no_grad()
def embed(model, ids: torch.Tensor, span: tuple[int, int] | None = None, layer: int = -1, **model_kwargs):
    """Retrieval embedding of one input: unit-norm mean of layer ``layer``'s hidden states over ``span``."""
    out = model(input_ids=ids.view(1, -1), output_hidden_states=True, use_cache=False, **model_kwargs)
    hs = out.hidden_states[layer][0]
    s, e = span if span is not None else (0, hs.shape[0])
    return F.normalize(hs[s:e].float().mean(0), dim=-1)


def _memory_mask(bias: torch.Tensor, q: int, dtype) -> torch.Tensor:
    """[1, 1, q, M + q] additive mask: ``bias`` [M] on the memory columns, causal over the q live tokens."""
    live = torch.full((q, q), float("-inf"), dtype=dtype, device=bias.device).triu(1)
    return torch.cat([bias.to(dtype)[None, :].expand(q, -1), live], dim=1)[None, None]


def sequence_nll(model, cache, query: torch.Tensor, target: torch.Tensor, bias=None, **model_kwargs):
    """Mean NLL (nats per token) of ``target`` after ``query``, with ``cache`` (memory or None) before the query."""
    ids = torch.cat([query, target]).view(1, -1)
    mask = None
    if bias is not None:
        mask = _memory_mask(bias, ids.shape[1], next(model.parameters()).dtype)
    logits = _forward(model, ids, cache, mask, **model_kwargs).logits[0, query.numel() - 1 : -1]
    return F.cross_entropy(logits.float(), target.to(logits.device))


# ---------------------------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """Stacked entries: keys [N, D]; k, v [N, L, H, ell, d] (keys before RoPE); pos [N, L, H, ell] (their positions in
    the source prefix); task [N]; gain [N] (NLL reduction measured when the entry was induced)."""

    keys: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    task: torch.Tensor
    gain: torch.Tensor

    def __len__(self) -> int:
        return self.keys.shape[0]

    def take(self, idx) -> "Candidates":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Candidates(*(getattr(self, f.name)[idx] for f in fields(self)))

    @staticmethod
    def cat(parts: list["Candidates"]) -> "Candidates":
        parts = [p for p in parts if p is not None]
        return Candidates(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Candidates)))


@torch.no_grad()
def extract_candidates(model, examples: list[Example], task: int, ell: int, kernel: int = 5, key_layer: int = -1,
                       dtype: torch.dtype = torch.float16) -> Candidates:
    """One candidate entry per example: run the frozen model on its prefix, keep the retrieval key and, per layer and
    KV head, the ``ell`` entries the answer tokens attend to most (answer tokens always kept), keys un-rotated."""
    from .replay import capture_prefill

    rope = _rope(model)
    L, H, d, _ = geometry(model)
    keys, ks, vs, ps = [], [], [], []
    for i, ex in enumerate(examples):
        n = ex.prefix.numel()
        a0, a1 = ex.answer_span
        if n < ell or a1 - a0 > ell:
            raise ValueError(f"example {i}: payload length ell={ell} needs a prefix of at least ell tokens ({n}) "
                             f"and an answer of at most ell tokens ({a1 - a0})")
        cap = capture_prefill(model, ex.prefix.view(1, -1), output_hidden_states=True, **ex.model_kwargs)
        hs = cap.hidden_states[key_layer][0]
        keys.append(F.normalize(hs[slice(*ex.key_span)].float().mean(0), dim=-1))
        real = torch.ones(1, n, dtype=torch.bool, device=ex.prefix.device)
        force = torch.zeros(1, n, dtype=torch.bool, device=ex.prefix.device)
        force[0, a0:a1] = True
        rows = torch.arange(a0, a1, device=ex.prefix.device)
        lk, lv, lp = [], [], []
        for layer in range(L):
            query, k, v, _, scaling = cap.layers[layer]
            score = scoring.group_reduce(scoring._probs(query, k, scaling, rows, real).sum(2), H)
            score = scoring.pool1d(score, kernel)
            scoring.check_finite(score, "InduceKV")
            idx = scoring.select_topk(score, torch.tensor([ell]), real, force=force)[0]  # [H, ell] ascending
            kk = k[0].gather(1, idx[..., None].expand(-1, -1, d)).float()
            cos, sin, scale = _cos_sin(rope, idx, kk)
            lk.append(unrotate(kk, cos, sin, scale))
            lv.append(v[0].gather(1, idx[..., None].expand(-1, -1, v.shape[-1])))
            lp.append(idx.to(torch.int32))
        ks.append(torch.stack(lk).to(dtype))
        vs.append(torch.stack(lv).to(dtype))
        ps.append(torch.stack(lp))
    N = len(examples)
    return Candidates(torch.stack(keys), torch.stack(ks), torch.stack(vs), torch.stack(ps),
                      torch.full((N,), task, dtype=torch.long), torch.zeros(N))


# ---------------------------------------------------------------------------------------------------------------
# The bank
# ---------------------------------------------------------------------------------------------------------------


class MemoryBank:
    """Induced entries plus the retrieval calibration and anchors, within ``budget_bytes`` (None = unbounded).

    All of it lives in fixed-size tensors except the entries, so :attr:`nbytes` = ``reserved_bytes`` +
    ``len(bank) * entry_bytes`` and :attr:`capacity` is how many entries the budget admits.
    """

    def __init__(self, layers: int, heads: int, ell: int, head_dim: int, dim: int, budget_bytes: int | None,
                 dtype: torch.dtype = torch.float16, max_tasks: int = 64, max_anchors: int = 128, tau: float = 0.05):
        self.shape = (layers, heads, ell, head_dim)
        self.dim = dim
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.tau = tau
        self.entries = Candidates(torch.zeros(0, dim), torch.zeros(0, *self.shape, dtype=dtype),
                                  torch.zeros(0, *self.shape, dtype=dtype),
                                  torch.zeros(0, layers, heads, ell, dtype=torch.int32),
                                  torch.zeros(0, dtype=torch.long), torch.zeros(0))
        self.W = torch.eye(dim)
        self.mu = torch.zeros(dim)
        self.task_bias = torch.zeros(max_tasks)
        self.anchors = torch.zeros(max_anchors, dim)
        self.anchor_task = torch.full((max_anchors,), -1, dtype=torch.long)
        if budget_bytes is not None and self.capacity < 1:
            raise ValueError(f"InduceKV budget of {budget_bytes} bytes cannot hold one entry: the calibration and "
                             f"anchors reserve {self.reserved_bytes} bytes and one entry needs {self.entry_bytes}")

    def __len__(self) -> int:
        return len(self.entries)

    def fixed_tensors(self) -> dict[str, torch.Tensor]:
        return {"W": self.W, "mu": self.mu, "task_bias": self.task_bias, "anchors": self.anchors,
                "anchor_task": self.anchor_task}

    @property
    def entry_bytes(self) -> int:
        L, H, ell, d = self.shape
        item = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * L * H * ell * d * item + L * H * ell * 4 + self.dim * 4 + 8 + 4  # k, v, pos, key, task, gain

    @property
    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fixed_tensors().values())

    @property
    def capacity(self) -> int | None:
        if self.budget_bytes is None:
            return None
        return (self.budget_bytes - self.reserved_bytes) // self.entry_bytes

    @property
    def nbytes(self) -> int:
        tensors = [*self.fixed_tensors().values(), *(getattr(self.entries, f.name) for f in fields(Candidates))]
        return sum(t.numel() * t.element_size() for t in tensors)

    def tasks(self) -> dict[int, int]:
        """Entries per task."""
        ids, counts = torch.unique(self.entries.task, return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts)}

    # -- retrieval -----------------------------------------------------------------------------------------------
    def project(self, x: torch.Tensor, W=None) -> torch.Tensor:
        """Calibrated retrieval space: unit-norm W (x - mu)."""
        W = self.W if W is None else W
        return F.normalize((x.float() - self.mu) @ W.T, dim=-1)

    def scores(self, q: torch.Tensor, keys=None, tasks=None, W=None, bias=None) -> torch.Tensor:
        """Retrieval scores [Q, N] of queries ``q`` [Q, D] against ``keys`` (default: the bank's entries)."""
        keys = self.entries.keys if keys is None else keys
        tasks = self.entries.task if tasks is None else tasks
        bias = self.task_bias if bias is None else bias
        return self.project(q, W) @ self.project(keys, W).T / self.tau + bias[tasks]

    def retrieve(self, q: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, scores) of the ``top_k`` best entries for one query embedding [D], best first."""
        if len(self) == 0 or top_k <= 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        s = self.scores(q.view(1, -1))[0]
        top = s.topk(min(top_k, len(self)))
        return top.indices, top.values

    # -- placement -----------------------------------------------------------------------------------------------
    def memory_cache(self, model, idx, payload=None, order: str = "descending") -> tuple[DynamicCache, int]:
        """A transformers cache holding entries ``idx`` (given best first) before the prompt, keys re-rotated to
        positions [0, M); returns (cache, M). ``payload`` = (k, v) overrides the stored tensors (refinement)."""
        k, v = payload if payload is not None else (self.entries.k, self.entries.v)
        idx = torch.as_tensor(idx, dtype=torch.long)
        if order == "ascending":
            idx = idx.flip(0)
        elif order != "descending":
            raise ValueError(f"unknown memory order {order!r}; use 'descending' or 'ascending'")
        cache = DynamicCache()
        if idx.numel() == 0:
            return cache, 0
        dt = next(model.parameters()).dtype
        dev = next(model.parameters()).device
        L, H, ell, d = self.shape
        M = idx.numel() * ell
        keys = k[idx].transpose(0, 1).transpose(1, 2).reshape(L, H, M, d).to(dev, torch.float32)  # [L, H, M, d]
        vals = v[idx].transpose(0, 1).transpose(1, 2).reshape(L, H, M, d).to(dev, dt)
        cos, sin, _ = _cos_sin(_rope(model), torch.arange(M, device=dev), keys)
        keys = rotate(keys, cos, sin).to(dt)
        for layer in range(L):
            cache.update(keys[layer][None], vals[layer][None], layer)
        return cache, M

    # -- files ---------------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"entry_{f.name}": getattr(self.entries, f.name).contiguous() for f in fields(Candidates)}
        out.update({name: t.contiguous() for name, t in self.fixed_tensors().items()})
        return out

    def save(self, path, config: dict | None = None) -> Path:
        """Write the bank as safetensors with its shape, budget and a SHA-256 of every tensor in the header."""
        from safetensors.torch import save_file

        tensors = self.tensors()
        meta = {"format": FORMAT, "shape": list(self.shape), "dim": self.dim, "dtype": str(self.dtype).split(".")[-1],
                "budget_bytes": self.budget_bytes, "tau": self.tau, "config": config or {},
                "sha256": {name: _digest(t) for name, t in tensors.items()}}
        path = Path(path)
        save_file(tensors, str(path), metadata={"inducekv": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path) -> tuple["MemoryBank", dict]:
        """Read a bank written by :meth:`save`; any corruption or inconsistency raises a ValueError naming it."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"InduceKV bank file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("inducekv", "null"))
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # safetensors raises several types for a damaged header or body
            raise ValueError(f"{path} is not a readable InduceKV bank (corrupted or truncated file): {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an InduceKV bank (no '{FORMAT}' header)")
        for name, digest in meta["sha256"].items():
            if name not in tensors:
                raise ValueError(f"{path}: tensor {name!r} is missing (corrupted file)")
            if _digest(tensors[name]) != digest:
                raise ValueError(f"{path}: checksum mismatch in tensor {name!r} (the file is corrupted)")
        L, H, ell, d = meta["shape"]
        bank = cls(L, H, ell, d, meta["dim"], meta["budget_bytes"], getattr(torch, meta["dtype"]),
                   max_tasks=tensors["task_bias"].numel(), max_anchors=tensors["anchors"].shape[0], tau=meta["tau"])
        bank.entries = Candidates(*(tensors[f"entry_{f.name}"] for f in fields(Candidates)))
        for name in bank.fixed_tensors():
            setattr(bank, name, tensors[name])
        if bank.budget_bytes is not None and bank.nbytes > bank.budget_bytes:
            raise ValueError(f"{path}: the bank holds {bank.nbytes} bytes, over its budget of {bank.budget_bytes}")
        return bank, meta["config"]

    def check_model(self, model) -> None:
        L, H, d, D = geometry(model)
        if (L, H, d, D) != (self.shape[0], self.shape[1], self.shape[3], self.dim):
            raise ValueError(f"this InduceKV bank was built for (layers, KV heads, head dim, hidden) = "
                             f"{(self.shape[0], self.shape[1], self.shape[3], self.dim)}; the model has {(L, H, d, D)}")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Selection helpers
# ---------------------------------------------------------------------------------------------------------------


def k_center(x: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` points of ``x`` [N, D] chosen by greedy k-centre (farthest point, cosine), in pick order."""
    n = x.shape[0]
    if m >= n:
        return torch.arange(n)
    x = F.normalize(x.float(), dim=-1)
    centre = F.normalize(x.mean(0), dim=-1)
    picked = [int((x @ centre).argmax())]
    dist = 1 - x @ x[picked[0]]
    for _ in range(m - 1):
        j = int(dist.argmax())
        picked.append(j)
        dist = torch.minimum(dist, 1 - x @ x[j])
    return torch.tensor(picked)


def project_capped_simplex(w: torch.Tensor, total: float, iters: int = 60) -> torch.Tensor:
    """Euclidean projection of ``w`` onto {0 <= w <= 1, sum w = total} by bisection on a shift."""
    if not 0 <= total <= w.numel():
        raise ValueError(f"capped simplex total {total} must lie in [0, {w.numel()}]")
    lo, hi = float(w.min()) - 1.0, float(w.max())
    for _ in range(iters):
        mid = (lo + hi) / 2
        if float((w - mid).clamp(0, 1).sum()) > total:
            lo = mid
        else:
            hi = mid
    return (w - (lo + hi) / 2).clamp(0, 1)


def greedy_select(gain, cover, anchor, budget: int, lambda_a: float, lambda_c: float) -> list[int]:
    """Greedy maximisation of sum(gain) + lambda_a * anchor facility location + lambda_c * coverage facility location.

    gain [P]; cover [U, P] non-negative similarities (averaged over the U rows); anchor [A, P] non-negative
    similarities already weighted per row (zero across tasks; summed over rows). The objective is monotone
    submodular, so the greedy keeps the (1 - 1/e) guarantee on it.
    """
    P = gain.numel()
    best_u = torch.zeros(cover.shape[0])
    best_a = torch.zeros(anchor.shape[0])
    chosen: list[int] = []
    taken = torch.zeros(P, dtype=torch.bool)
    for _ in range(min(budget, P)):
        marg = gain.clone()
        if cover.numel():
            marg += lambda_c * (cover - best_u[:, None]).clamp(min=0).mean(0)
        if anchor.numel():
            marg += lambda_a * (anchor - best_a[:, None]).clamp(min=0).sum(0)
        marg[taken] = float("-inf")
        j = int(marg.argmax())
        chosen.append(j)
        taken[j] = True
        if cover.numel():
            best_u = torch.maximum(best_u, cover[:, j])
        if anchor.numel():
            best_a = torch.maximum(best_a, anchor[:, j])
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class InduceKV:
    """Continual adaptation of a frozen model through a fixed-size bank of induced KV memories (see the module)."""

    budget_bytes: int | None = 32 * 2**20  # the whole deployed adaptation state; None = unbounded (upper bound)
    ell: int = 32  # payload tokens per layer and KV head per entry (CHOICE; paper 256)
    top_k: int = 4  # entries placed before a prompt (CHOICE; paper 8)
    selection: str = "greedy"  # greedy | bilevel | random | all
    key_layer: int = -1  # hidden-state layer pooled into retrieval keys (paper: last)
    kernel: int = 5  # SnapKV pooling of the payload scores
    dtype: str = "float16"  # payload storage (CHOICE)
    order: str = "descending"  # best entry first (spec) or last ("ascending")
    soft_bias: bool = False  # add log(retrieval weight) to memory logits at inference (CHOICE)
    tau: float = 0.05
    tau_c: float = 0.05
    lambda_a: float = 1.0
    lambda_c: float = 0.1
    calib_steps: int = 50
    calib_lr: float = 1e-3
    calib_decay: float = 1.0  # pull of W toward the identity (CHOICE, keeps few-example fits sane)
    bilevel_steps: int = 10
    bilevel_lr: float = 0.2
    probes: int = 16  # probe examples per task for the bilevel likelihood term
    refine_steps: int = 0
    refine_lr: float = 1e-3
    anchors_per_task: int = 16
    max_anchors: int = 128
    max_tasks: int = 64
    prefilter: int = 4
    seed: int = 0
    bank: MemoryBank | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown InduceKV selection {self.selection!r}; choose one of {SELECTIONS}")
        if self.selection == "all" and self.budget_bytes is not None:
            raise ValueError("selection='all' keeps every entry: it needs budget_bytes=None (unbounded)")
        if self.selection != "all" and self.budget_bytes is None:
            raise ValueError(f"selection={self.selection!r} needs a byte budget (budget_bytes)")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"InduceKV budget_bytes must be positive, got {self.budget_bytes}")
        for name in ("ell", "top_k", "anchors_per_task", "max_anchors", "max_tasks", "prefilter"):
            if getattr(self, name) < 1:
                raise ValueError(f"InduceKV {name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"InduceKV dtype {self.dtype!r}: use float16, bfloat16 or float32")

    @classmethod
    def budget_for(cls, model, entries: int, **kwargs) -> int:
        """The ``budget_bytes`` that holds exactly ``entries`` entries (plus the fixed part) for these parameters."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("budget_bytes", "selection")}
        bank = cls(budget_bytes=None, selection="all", **kwargs)._bank(model)
        return bank.reserved_bytes + entries * bank.entry_bytes

    def config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "bank"}

    def _bank(self, model) -> MemoryBank:
        if self.bank is None:
            L, H, d, D = geometry(model)
            self.bank = MemoryBank(L, H, self.ell, d, D, self.budget_bytes, getattr(torch, self.dtype),
                                   self.max_tasks, self.max_anchors, self.tau)
        self.bank.check_model(model)
        return self.bank

    # -- inference -----------------------------------------------------------------------------------------------
    def retrieve(self, model, query: torch.Tensor, span=None, **model_kwargs):
        """(indices, scores) of the entries routed to this input (best first)."""
        bank = self._bank(model)
        if len(bank) == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return bank.retrieve(embed(model, query, span, self.key_layer, **model_kwargs), self.top_k)

    @torch.no_grad()
    def generate(self, model, query: torch.Tensor, max_new_tokens: int = 16, span=None, eos_token_id=None,
                 **model_kwargs) -> tuple[list[int], dict]:
        """Greedy generation of one input with its retrieved memories before it; returns (new tokens, info).
        An empty bank runs the frozen model unchanged."""
        query = torch.as_tensor(query, dtype=torch.long).flatten()
        idx, s = self.retrieve(model, query, span, **model_kwargs)
        cache, M = self._bank(model).memory_cache(model, idx, order=self.order)
        mask = None
        if self.soft_bias and M:
            bias = self._entry_bias(s)
            mask = _memory_mask(bias, query.numel(), next(model.parameters()).dtype)
        out = _forward(model, query.view(1, -1), cache, mask, **model_kwargs)
        tokens: list[int] = []
        nxt = int(out.logits[0, -1].argmax())
        while True:
            tokens.append(nxt)
            if len(tokens) >= max_new_tokens or nxt == eos_token_id:
                break
            step_mask = None
            if mask is not None:  # the bias stays on the memory columns for every later token
                n_seen = cache.get_seq_length()
                step_mask = torch.zeros(1, 1, 1, n_seen + 1, dtype=mask.dtype)
                step_mask[..., :M] = mask[..., -1:, :M]
            out = _forward(model, torch.tensor([[nxt]]), cache, step_mask)
            nxt = int(out.logits[0, -1].argmax())
        return tokens, {"entries": idx.tolist(), "tasks": self.bank.entries.task[idx].tolist() if len(idx) else [],
                        "memory_tokens": M}

    def _entry_bias(self, scores: torch.Tensor) -> torch.Tensor:
        """Per memory token, the log of its entry's normalised retrieval weight (softmax over the placed entries'
        scores, which already include log w during selection); ``order`` respected."""
        lw = torch.log_softmax(scores, dim=0)
        if self.order == "ascending":
            lw = lw.flip(0)
        return lw.repeat_interleave(self.ell)

    # -- learning a task -----------------------------------------------------------------------------------------
    def add_task(self, model, task: int, examples: list[Example]) -> dict:
        """Induce the task's candidate memories, recalibrate retrieval and re-select the bank under the budget."""
        bank = self._bank(model)
        if not 0 <= task < bank.task_bias.numel():
            raise ValueError(f"task id {task} out of range [0, {bank.task_bias.numel()}) (max_tasks)")
        if not examples:
            raise ValueError(f"task {task}: no examples")
        if bool((bank.entries.task == task).any()) or bool((bank.anchor_task == task).any()):
            raise ValueError(f"task {task} was already added; continual tasks need new ids")
        was_training = model.training
        model.eval()
        try:
            return self._add_task(model, bank, task, examples)
        finally:
            model.train(was_training)

    def _add_task(self, model, bank: MemoryBank, task: int, examples: list[Example]) -> dict:
        gen = torch.Generator().manual_seed(self.seed + task)
        cand = extract_candidates(model, examples, task, self.ell, self.kernel, self.key_layer, bank.dtype)
        q = torch.stack([embed(model, ex.query, ex.query_span, self.key_layer, **ex.model_kwargs) for ex in examples])
        if self.refine_steps:
            self._refine(model, bank, cand, examples)
        if self.selection in ("greedy", "bilevel"):
            cand.gain = self._own_gain(model, bank, cand, examples)
        self._add_anchors(bank, task, cand.keys)
        pool = Candidates.cat([bank.entries, cand])
        own = torch.arange(len(bank), len(pool))  # pool index of each example's own candidate
        cap = bank.capacity
        if cap is not None and len(pool) > self.prefilter * cap:  # k-centre prefilter of the pool
            keep = k_center(pool.keys, self.prefilter * cap).sort().values
            remap = torch.full((len(pool),), -1, dtype=torch.long)
            remap[keep] = torch.arange(keep.numel())
            pool, own = pool.take(keep), remap[own]
        self._calibrate(bank, pool, q, own, task, torch.zeros(len(pool)))
        if self.selection == "all" or cap >= len(pool):
            chosen = torch.arange(len(pool))
        elif self.selection == "random":
            chosen = torch.randperm(len(pool), generator=gen)[:cap].sort().values
        elif self.selection == "greedy":
            chosen = torch.tensor(sorted(self._greedy(bank, pool, cap)), dtype=torch.long)
        else:
            chosen = self._bilevel(model, bank, pool, q, own, task, examples, cap, gen)
        bank.entries = pool.take(chosen)
        if cap is not None:
            assert len(bank) <= cap and bank.nbytes <= bank.budget_bytes
        return {"task": task, "candidates": len(cand), "pool": len(pool), "kept": len(bank), "capacity": cap,
                "per_task": bank.tasks(), "bank_bytes": bank.nbytes, "mean_gain": float(cand.gain.mean())}

    def _own_gain(self, model, bank, cand: Candidates, examples) -> torch.Tensor:
        """NLL reduction (nats per answer token) of each candidate on its own example's query."""
        gains = []
        with torch.no_grad():
            for i, ex in enumerate(examples):
                base = sequence_nll(model, None, ex.query, ex.target, **ex.model_kwargs)
                cache, _ = bank.memory_cache(model, [i], payload=(cand.k, cand.v))
                gains.append(float(base - sequence_nll(model, cache, ex.query, ex.target, **ex.model_kwargs)))
        return torch.tensor(gains)

    def _refine(self, model, bank, cand: Candidates, examples) -> None:
        """Gradient refinement of each new payload on its own answer's NLL; the backbone stays frozen."""
        with _no_weight_grads(model):
            for i, ex in enumerate(examples):
                k = cand.k[i : i + 1].float().clone().requires_grad_(True)
                v = cand.v[i : i + 1].float().clone().requires_grad_(True)
                opt = torch.optim.Adam([k, v], lr=self.refine_lr)
                for _ in range(self.refine_steps):
                    cache, _ = bank.memory_cache(model, [0], payload=(k, v))
                    loss = sequence_nll(model, cache, ex.query, ex.target, **ex.model_kwargs)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                cand.k[i] = k.detach()[0].to(cand.k.dtype)
                cand.v[i] = v.detach()[0].to(cand.v.dtype)

    def _add_anchors(self, bank: MemoryBank, task: int, keys: torch.Tensor) -> None:
        """Keep ``anchors_per_task`` k-centre keys of the new task; shrink every task's share to fit the slots."""
        per = {int(t): bank.anchors[bank.anchor_task == t] for t in bank.anchor_task.unique() if t >= 0}
        per[task] = keys[k_center(keys, self.anchors_per_task)]
        share = min(self.anchors_per_task, bank.anchors.shape[0] // len(per))
        if share < 1:
            raise ValueError(f"max_anchors={bank.anchors.shape[0]} slots cannot hold one anchor for each of "
                             f"{len(per)} tasks")
        bank.anchors.zero_()
        bank.anchor_task.fill_(-1)
        at = 0
        for t, a in sorted(per.items()):
            a = a[k_center(a, share)] if a.shape[0] > share else a  # k-centre order: the first picks spread widest
            bank.anchors[at : at + a.shape[0]] = a
            bank.anchor_task[at : at + a.shape[0]] = t
            at += a.shape[0]

    def _calibrate(self, bank: MemoryBank, pool: Candidates, q, own, task: int, logw: torch.Tensor,
                   steps: int | None = None) -> None:
        """Inner problem: refit φ = (W, mu, task bias) by the retrieval likelihood of the task's queries (positive:
        the query's own candidate, or its task's entries if that one was prefiltered away) and of the anchors of
        earlier tasks (positive: their task's entries), warm-started from the current φ."""
        bank.mu = pool.keys.mean(0)
        old = bank.anchor_task >= 0
        old &= bank.anchor_task != task
        queries = torch.cat([q, bank.anchors[old]])
        pos = torch.zeros(queries.shape[0], len(pool), dtype=torch.bool)
        for i, j in enumerate(own.tolist()):
            pos[i] = (pool.task == task) if j < 0 else F.one_hot(torch.tensor(j), len(pool)).bool()
        pos[q.shape[0]:] = bank.anchor_task[old][:, None] == pool.task[None, :]
        usable = pos.any(1)
        queries, pos = queries[usable], pos[usable]
        steps = self.calib_steps if steps is None else steps
        if not steps or queries.shape[0] == 0:
            return
        W = bank.W.clone().requires_grad_(True)
        b = bank.task_bias.clone().requires_grad_(True)
        eye = torch.eye(W.shape[0])
        opt = torch.optim.Adam([W, b], lr=self.calib_lr)
        for _ in range(steps):
            s = bank.scores(queries, pool.keys, pool.task, W=W, bias=b) + logw
            loss = -(torch.logsumexp(s.masked_fill(~pos, float("-inf")), 1) - torch.logsumexp(s, 1)).mean()
            loss = loss + self.calib_decay * (W - eye).pow(2).sum() / W.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        bank.W, bank.task_bias = W.detach(), b.detach()

    def _greedy(self, bank: MemoryBank, pool: Candidates, cap: int) -> list[int]:
        """The spec's cheap fallback. Gains are divided by the pool's largest so that they share a [0, 1] scale with
        the facility-location terms (CHOICE); each task's anchors weigh 1 / (its anchor count), so every task, new
        or old, is worth up to ``lambda_a`` of anchor retention (CHOICE) — old tasks shrink rather than vanish."""
        z = bank.project(pool.keys)
        cover = (z @ z.T).clamp(min=0)
        live = bank.anchor_task >= 0
        tasks = bank.anchor_task[live]
        share = (tasks[:, None] == tasks[None, :]).sum(1).float()
        anchor = (bank.project(bank.anchors[live]) @ z.T).clamp(min=0) * (tasks[:, None] == pool.task[None, :])
        gain = pool.gain.clamp(min=0)
        gain = gain / gain.max().clamp(min=1e-9)
        return greedy_select(gain, cover, anchor / share[:, None], cap, self.lambda_a, self.lambda_c)

    def _bilevel(self, model, bank, pool: Candidates, q, own, task, examples, cap: int, gen) -> torch.Tensor:
        """Projected gradient ascent on w in {0 <= w <= 1, sum w = cap}; φ refitted (few steps) at every step."""
        P = len(pool)
        w = torch.full((P,), cap / P)
        probes = torch.randperm(len(examples), generator=gen)[: self.probes].tolist()
        live = bank.anchor_task >= 0
        old = live & (bank.anchor_task != task)
        inner = max(1, self.calib_steps // max(1, self.bilevel_steps))
        with _no_weight_grads(model):
            for _ in range(self.bilevel_steps):
                self._calibrate(bank, pool, q, own, task, torch.log(w.clamp(min=1e-6)), steps=inner)
                wv = w.clone().requires_grad_(True)
                logw = torch.log(wv.clamp(min=1e-6))
                J = torch.zeros(())
                for i in probes:
                    ex = examples[i]
                    s = bank.scores(q[i : i + 1], pool.keys, pool.task)[0] + logw
                    top = s.topk(min(self.top_k, P)).indices
                    cache, _ = bank.memory_cache(model, top, payload=(pool.k, pool.v), order=self.order)
                    bias = self._entry_bias(s[top])
                    J = J - sequence_nll(model, cache, ex.query, ex.target, bias=bias, **ex.model_kwargs) / len(probes)
                if bool(old.any()):
                    sa = bank.scores(bank.anchors[old], pool.keys, pool.task) + logw
                    same = bank.anchor_task[old][:, None] == pool.task[None, :]
                    ok = same.any(1)
                    if bool(ok.any()):
                        ret = torch.logsumexp(sa.masked_fill(~same, float("-inf")), 1) - torch.logsumexp(sa, 1)
                        J = J + self.lambda_a * ret[ok].mean()
                z = bank.project(pool.keys)
                J = J + self.lambda_c * torch.logsumexp(logw[None, :] + (z @ z.T) / self.tau_c, 1).mean()
                (grad,) = torch.autograd.grad(J, wv)
                step = self.bilevel_lr * grad / grad.abs().max().clamp(min=1e-12)
                w = project_capped_simplex(w + step, float(cap))
        self._calibrate(bank, pool, q, own, task, torch.zeros(P))
        return w.topk(cap).indices.sort().values

    # -- files ---------------------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        if self.bank is None:
            raise ValueError("InduceKV.save: the bank is empty (add a task first)")
        return self.bank.save(path, self.config())

    @classmethod
    def load(cls, path, model=None) -> "InduceKV":
        bank, config = MemoryBank.load(path)
        known = {f.name for f in fields(cls)}
        method = cls(**{k: v for k, v in config.items() if k in known})
        method.bank = bank
        if model is not None:
            bank.check_model(model)
        return method


def continual_metrics(acc) -> dict:
    """Avg, Last, BWT and forgetting from an accuracy matrix acc[i][j] (after stage i, on task j; j <= i).

    Last: mean accuracy over all tasks after the final stage. Avg: the mean over stages of the mean accuracy on the
    tasks seen so far. BWT: mean over earlier tasks of (final - just learned). Forgetting: mean over earlier tasks of
    (best earlier - final)."""
    T = len(acc)
    last = sum(acc[T - 1][: T]) / T
    avg = sum(sum(acc[i][: i + 1]) / (i + 1) for i in range(T)) / T
    if T == 1:
        return {"avg": avg, "last": last, "bwt": 0.0, "forgetting": 0.0}
    bwt = sum(acc[T - 1][j] - acc[j][j] for j in range(T - 1)) / (T - 1)
    forget = sum(max(acc[i][j] for i in range(j, T - 1)) - acc[T - 1][j] for j in range(T - 1)) / (T - 1)
    return {"avg": avg, "last": last, "bwt": bwt, "forgetting": forget}


__all__ = ["Example", "InduceKV", "MemoryBank", "Candidates", "extract_candidates", "embed", "continual_metrics",
           "project_capped_simplex", "greedy_select", "k_center"]

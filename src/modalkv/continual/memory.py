"""InduceKV's memory: training examples, candidate entries induced from them, and the fixed-size bank (retrieval
calibration, anchors, placement before a prompt, safetensors files).

An entry ``e = (κ, P)`` is a frozen retrieval key κ (unit-norm mean of one layer's hidden states over the
instruction tokens) and, per layer and KV head, ``ell`` key/value pairs chosen from the prefix by SnapKV scoring
with the answer tokens as observation window (the answer tokens are always kept). Keys are stored *before* RoPE
(un-rotated after capture) and re-rotated at placement, so each entry gets its own positions wherever it lands.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from .. import rope, scoring
from ..replay import capture_prefill
from .frozen import check_full_attention, geometry

FORMAT = "modalkv-inducekv/1"


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
    check_full_attention(model)
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
            score = scoring.group_reduce(scoring.attention_probs(query, k, scaling, rows, real).sum(2), H)
            score = scoring.pool1d(score, kernel)
            scoring.check_finite(score, "InduceKV")
            idx = scoring.select_topk(score, torch.tensor([ell]), real, force=force)[0]  # [H, ell] ascending
            kk = k[0].gather(1, idx[..., None].expand(-1, -1, d)).float()
            cos, sin = rope.cos_sin(model, layer, idx, kk)  # idx [H, ell] as a batch of H position rows
            lk.append(rope.unrotate(kk, cos.float(), sin.float()))
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
        cos, sin = rope.cos_sin(model, 0, torch.arange(M, device=dev)[None], keys)
        cos, sin = cos[0].float(), sin[0].float()
        keys = (keys * cos + rope.rotate_half(keys) * sin).to(dt)
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



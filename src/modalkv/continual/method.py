"""InduceKV — fixed-footprint continual adaptation of a frozen model through induced KV memories.

Paper: Chen, Feng, Xiao, Tang, "InduceKV: Fixed-Footprint Continual Adaptation of Multimodal LLMs via Inducing KV
Memories", arXiv 2607.02010 (NeurIPS 2026).

Not a cache-compression method: continual learning in which every task update lives in a bank of key/value
payloads placed before the live prompt in every layer. The backbone is never updated, no raw training data is
kept, and the bank never exceeds one byte budget, whatever the number of tasks.

* **Entries** (:mod:`.memory`): a frozen retrieval key and ``ell`` SnapKV-chosen KV pairs per layer and KV head.
* **Retrieval**: ``score_m(x) = cos(W (q(x) - mu), W (κ_m - mu)) / tau + b_task(m)``; the calibration
  φ = (W, mu, b) starts at the identity and is refitted on every task by the retrieval likelihood; the top
  ``top_k`` entries are placed before the prompt (CHOICE: cosine after W, and the centring mu).
* **Consolidation** (:mod:`.selection`): the new task's candidates and the bank's entries form one pool, re-selected
  under the same byte budget (old tasks shrink). ``selection``: ``bilevel`` (the paper's, with the hypergradient
  through the calibration), ``greedy`` (the cheap fallback), ``random`` or ``all`` (no budget).
* **Fixed footprint**: payloads, keys, task ids, gains, W, mu, ``max_tasks`` task biases and ``max_anchors``
  anchors are all counted; :attr:`MemoryBank.nbytes` is the size of exactly what :meth:`save` writes.

CHOICEs (configurable): fp16 payloads (``dtype``), best entry first (``order``), no attention bias at inference
(``soft_bias``), ``ell`` = 32 and ``top_k`` = 4 (CPU scale; the paper uses 256 and 8), the greedy's per-token NLL
gain, the normalised outer step, the unrolled inner solve (``inner_steps``, ``inner_lr``), the k-centre
prefilter to ``prefilter`` x capacity. Only full-attention RoPE models are supported. Measurements:
docs/results/inducekv_continual.md and docs/results/inducekv_selection.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .frozen import check_full_attention, embed, forward, geometry, memory_mask, no_weight_grads, sequence_nll
from .memory import Candidates, Example, MemoryBank, extract_candidates
from .selection import (
    Bilevel,
    calibrate,
    entry_bias,
    greedy_select,
    k_center,
    retrieval_targets,
)

SELECTIONS = ("greedy", "bilevel", "random", "all")
HYPERGRADIENTS = ("unrolled", "none")


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
    calib_steps: int = 50  # Adam steps of the calibration refit after every task (0 = no calibration)
    calib_lr: float = 1e-3
    calib_decay: float = 1.0  # pull of W toward the identity (CHOICE, keeps few-example fits sane)
    bilevel_steps: int = 10  # outer projected-gradient steps
    bilevel_lr: float = 0.2
    inner_steps: int = 5  # unrolled gradient steps of the inner calibration per outer step
    inner_lr: float = 0.05
    hypergradient: str = "unrolled"  # unrolled (through φ*(w)) | none (φ held constant: the ablation)
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
        if self.hypergradient not in HYPERGRADIENTS:
            raise ValueError(f"unknown InduceKV hypergradient {self.hypergradient!r}; choose one of {HYPERGRADIENTS}")
        if self.selection == "all" and self.budget_bytes is not None:
            raise ValueError("selection='all' keeps every entry: it needs budget_bytes=None (unbounded)")
        if self.selection != "all" and self.budget_bytes is None:
            raise ValueError(f"selection={self.selection!r} needs a byte budget (budget_bytes)")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"InduceKV budget_bytes must be positive, got {self.budget_bytes}")
        for name in ("ell", "top_k", "anchors_per_task", "max_anchors", "max_tasks", "prefilter"):
            if getattr(self, name) < 1:
                raise ValueError(f"InduceKV {name} must be >= 1, got {getattr(self, name)}")
        for name in ("calib_steps", "bilevel_steps", "inner_steps", "probes", "refine_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"InduceKV {name} must be >= 0, got {getattr(self, name)}")
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
            mask = memory_mask(entry_bias(s, self.ell, self.order), query.numel(), next(model.parameters()).dtype)
        out = forward(model, query.view(1, -1), cache, mask, **model_kwargs)
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
            out = forward(model, torch.tensor([[nxt]]), cache, step_mask)
            nxt = int(out.logits[0, -1].argmax())
        return tokens, {"entries": idx.tolist(), "tasks": self.bank.entries.task[idx].tolist() if len(idx) else [],
                        "memory_tokens": M}

    # -- learning a task -----------------------------------------------------------------------------------------
    def add_task(self, model, task: int, examples: list[Example]) -> dict:
        """Induce the task's candidate memories, recalibrate retrieval and re-select the bank under the budget."""
        bank = self._check_task(model, task, examples)
        was_training = model.training
        model.eval()
        try:
            return self._add_task(model, bank, task, examples)
        finally:
            model.train(was_training)

    def _check_task(self, model, task: int, examples) -> MemoryBank:
        bank = self._bank(model)
        check_full_attention(model)
        if not 0 <= task < bank.task_bias.numel():
            raise ValueError(f"task id {task} out of range [0, {bank.task_bias.numel()}) (max_tasks)")
        if not examples:
            raise ValueError(f"task {task}: no examples")
        if bool((bank.entries.task == task).any()) or bool((bank.anchor_task == task).any()):
            raise ValueError(f"task {task} was already added; continual tasks need new ids")
        return bank

    def _pool(self, model, bank: MemoryBank, task: int, examples: list[Example]):
        """Induce the candidates, add the task's anchors, form the (prefiltered) pool and calibrate retrieval on it.
        Returns (pool, query embeddings of the examples, pool index of each example's own candidate or -1, the
        new candidates)."""
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
        bank.mu = pool.keys.mean(0)
        calibrate(bank, pool, retrieval_targets(bank, pool, q, own, task), self.calib_steps, self.calib_lr,
                  self.calib_decay)
        return pool, q, own, cand

    def _add_task(self, model, bank: MemoryBank, task: int, examples: list[Example]) -> dict:
        gen = torch.Generator().manual_seed(self.seed + task)
        pool, q, own, cand = self._pool(model, bank, task, examples)
        cap = bank.capacity
        if self.selection == "all" or cap >= len(pool):
            chosen = torch.arange(len(pool))
        elif self.selection == "random":
            chosen = torch.randperm(len(pool), generator=gen)[:cap].sort().values
        elif self.selection == "greedy":
            chosen = torch.tensor(sorted(self._greedy(bank, pool, cap)), dtype=torch.long)
        else:
            problem = self.bilevel_problem(model, bank, pool, q, own, task, examples, gen)
            with no_weight_grads(model):
                w = problem.solve(cap, self.bilevel_steps, self.bilevel_lr)
            chosen = w.topk(cap).indices.sort().values
            calibrate(bank, pool, retrieval_targets(bank, pool, q, own, task), self.calib_steps, self.calib_lr,
                      self.calib_decay)
        bank.entries = pool.take(chosen)
        if cap is not None:
            assert len(bank) <= cap and bank.nbytes <= bank.budget_bytes
        return {"task": task, "candidates": len(cand), "pool": len(pool), "kept": len(bank), "capacity": cap,
                "per_task": bank.tasks(), "bank_bytes": bank.nbytes, "mean_gain": float(cand.gain.mean())}

    def bilevel_problem(self, model, bank, pool: Candidates, q, own, task: int, examples, gen=None) -> Bilevel:
        """The bilevel selection problem of this task's consolidation (its objective and hypergradient)."""
        gen = gen if gen is not None else torch.Generator().manual_seed(self.seed + task)
        probes = torch.randperm(len(examples), generator=gen)[: self.probes].tolist()
        old = (bank.anchor_task >= 0) & (bank.anchor_task != task)
        return Bilevel(model, bank, pool, [examples[i] for i in probes], q[probes],
                       retrieval_targets(bank, pool, q, own, task), bank.anchors[old], bank.anchor_task[old],
                       self.top_k, self.order, self.ell, self.lambda_a, self.lambda_c, self.tau_c, self.inner_steps,
                       self.inner_lr, self.calib_decay, self.hypergradient)

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
        with no_weight_grads(model):
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

    def _greedy(self, bank: MemoryBank, pool: Candidates, cap: int) -> list[int]:
        """The cheap fallback. Gains are divided by the pool's largest so that they share a [0, 1] scale with the
        facility-location terms (CHOICE); each task's anchors weigh 1 / (its anchor count), so every task, new or
        old, is worth up to ``lambda_a`` of anchor retention (CHOICE) — old tasks shrink rather than vanish."""
        z = bank.project(pool.keys)
        cover = (z @ z.T).clamp(min=0)
        live = bank.anchor_task >= 0
        tasks = bank.anchor_task[live]
        share = (tasks[:, None] == tasks[None, :]).sum(1).float()
        anchor = (bank.project(bank.anchors[live]) @ z.T).clamp(min=0) * (tasks[:, None] == pool.task[None, :])
        gain = pool.gain.clamp(min=0)
        gain = gain / gain.max().clamp(min=1e-9)
        return greedy_select(gain, cover, anchor / share[:, None], cap, self.lambda_a, self.lambda_c)

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

"""InduceKV's consolidation: which pool entries the bank keeps under its budget, and the retrieval calibration
(the inner problem of the paper's bilevel selection).

* ``greedy`` — the cheap fallback: marginal gain of NLL reduction + anchor facility location + coverage facility
  location (monotone submodular, so the greedy keeps its (1 - 1/e) guarantee).
* ``bilevel`` — the paper's: selection weights w on the capped simplex {0 <= w <= 1, sum w = B} (outer variables)
  ascend J(w, φ*(w)) by projected gradient, where φ*(w) = (W, task bias) is the retrieval calibration fitted to
  w by the retrieval likelihood (inner problem). The hypergradient dJ/dw differentiates *through* the inner
  solution: φ*(w) is ``inner_steps`` gradient steps warm-started from the previous φ, unrolled with
  ``create_graph=True`` (CHOICE: unrolled rather than implicit, since the warm-started few-step inner solve is
  what is run; ``hypergradient="none"`` treats φ as a constant, the ablation).
* ``random`` — a random subset of the same size (ablation); ``all`` — no budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .frozen import sequence_nll
from .memory import Candidates, MemoryBank

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
# The inner problem: retrieval calibration φ = (W, task bias)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RetrievalTargets:
    """What the calibration is fitted to: query embeddings [Q, D] and, per query, its positive pool entries [Q, P]."""

    queries: torch.Tensor
    positive: torch.Tensor


def retrieval_targets(bank: MemoryBank, pool: Candidates, q: torch.Tensor, own: torch.Tensor,
                      task: int) -> RetrievalTargets:
    """The task's queries ``q`` (positive: the query's own candidate ``own``, or its task's entries if that one was
    prefiltered away, own = -1) and the anchors of earlier tasks (positive: their task's entries); queries without
    any positive entry in the pool are dropped."""
    old = (bank.anchor_task >= 0) & (bank.anchor_task != task)
    queries = torch.cat([q, bank.anchors[old]])
    pos = torch.zeros(queries.shape[0], len(pool), dtype=torch.bool)
    for i, j in enumerate(own.tolist()):
        pos[i] = (pool.task == task) if j < 0 else F.one_hot(torch.tensor(j), len(pool)).bool()
    pos[q.shape[0]:] = bank.anchor_task[old][:, None] == pool.task[None, :]
    usable = pos.any(1)
    return RetrievalTargets(queries[usable], pos[usable])


def retrieval_nll(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log (softmax probability of the row's positive entries)."""
    inside = torch.logsumexp(scores.masked_fill(~positive, float("-inf")), 1)
    return -(inside - torch.logsumexp(scores, 1)).mean()


def calibration_loss(bank: MemoryBank, pool: Candidates, targets: RetrievalTargets, W, bias, logw,
                     decay: float) -> torch.Tensor:
    """The inner objective: retrieval NLL of the targets with scores + log w, plus ``decay`` * |W - I|^2 / D."""
    s = bank.scores(targets.queries, pool.keys, pool.task, W=W, bias=bias) + logw
    eye = torch.eye(W.shape[0], dtype=W.dtype)
    return retrieval_nll(s, targets.positive) + decay * (W - eye).pow(2).sum() / W.shape[0]


def calibrate(bank: MemoryBank, pool: Candidates, targets: RetrievalTargets, steps: int, lr: float, decay: float,
              logw: torch.Tensor | None = None) -> None:
    """Refit the bank's φ (Adam, warm-started from the current φ) and store it in the bank."""
    if not steps or targets.queries.shape[0] == 0:
        return
    logw = torch.zeros(len(pool)) if logw is None else logw
    W = bank.W.clone().requires_grad_(True)
    b = bank.task_bias.clone().requires_grad_(True)
    opt = torch.optim.Adam([W, b], lr=lr)
    for _ in range(steps):
        loss = calibration_loss(bank, pool, targets, W, b, logw, decay)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bank.W, bank.task_bias = W.detach(), b.detach()


def unrolled_calibration(bank: MemoryBank, pool: Candidates, targets: RetrievalTargets, logw: torch.Tensor,
                         W0: torch.Tensor, b0: torch.Tensor, steps: int, lr: float, decay: float,
                         differentiable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """φ*(w): ``steps`` gradient-descent steps on the calibration loss from (W0, b0). With ``differentiable`` the
    steps are recorded (create_graph) so that the result is a differentiable function of ``logw``."""
    W, b = W0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    if targets.queries.shape[0] == 0:
        return W, b
    if not differentiable:
        logw = logw.detach()
    with torch.enable_grad():  # the inner solve is gradient descent, also when J is only evaluated
        for _ in range(steps):
            loss = calibration_loss(bank, pool, targets, W, b, logw, decay)
            gW, gb = torch.autograd.grad(loss, (W, b), create_graph=differentiable)
            W, b = W - lr * gW, b - lr * gb
            if not differentiable:
                W, b = W.detach().requires_grad_(True), b.detach().requires_grad_(True)
    return (W, b) if differentiable else (W.detach(), b.detach())


# ---------------------------------------------------------------------------------------------------------------
# The outer problem: selection weights on the capped simplex
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Bilevel:
    """One bilevel selection problem: the pool, the probe examples, the retrieval targets and the parameters.

    :meth:`objective` is J(w, φ*(w)) (to maximise):
    mean probe log-likelihood with the top-k entries placed before the probe query and log softmax(score + log w)
    as their attention bias + ``lambda_a`` * anchor retention (log probability that an old task's anchor retrieves
    its own task) + ``lambda_c`` * coverage of the retrieval space (mean over candidates of log sum_m w_m
    exp(sim / tau_c)). :meth:`hypergradient` is dJ/dw through φ*(w).
    """

    model: object
    bank: MemoryBank
    pool: Candidates
    probes: list  # Example objects whose likelihood J measures
    probe_keys: torch.Tensor  # [len(probes), D] their query embeddings
    targets: RetrievalTargets
    old_anchors: torch.Tensor  # [A, D] anchors of earlier tasks
    old_anchor_task: torch.Tensor  # [A]
    top_k: int
    order: str
    ell: int
    lambda_a: float
    lambda_c: float
    tau_c: float
    inner_steps: int
    inner_lr: float
    decay: float
    hypergradient_mode: str = "unrolled"  # unrolled | none

    def __post_init__(self):
        self.W0, self.b0 = self.bank.W.clone(), self.bank.task_bias.clone()

    def calibration(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """φ*(w), differentiable in w unless the hypergradient mode is ``none``."""
        logw = torch.log(w.clamp(min=1e-6))
        return unrolled_calibration(self.bank, self.pool, self.targets, logw, self.W0, self.b0, self.inner_steps,
                                    self.inner_lr, self.decay, differentiable=self.hypergradient_mode == "unrolled")

    def objective(self, w: torch.Tensor, phi=None) -> torch.Tensor:
        """J(w, φ) with φ = φ*(w) unless given."""
        W, b = self.calibration(w) if phi is None else phi
        bank, pool = self.bank, self.pool
        logw = torch.log(w.clamp(min=1e-6))
        J = torch.zeros(())
        for ex, key in zip(self.probes, self.probe_keys):
            s = bank.scores(key[None], pool.keys, pool.task, W=W, bias=b)[0] + logw
            top = s.detach().topk(min(self.top_k, len(pool))).indices
            cache, _ = bank.memory_cache(self.model, top, payload=(pool.k, pool.v), order=self.order)
            bias = entry_bias(s[top], self.ell, self.order)
            nll = sequence_nll(self.model, cache, ex.query, ex.target, bias=bias, **ex.model_kwargs)
            J = J - nll / len(self.probes)
        if self.old_anchors.shape[0]:
            sa = bank.scores(self.old_anchors, pool.keys, pool.task, W=W, bias=b) + logw
            same = self.old_anchor_task[:, None] == pool.task[None, :]
            ok = same.any(1)
            if bool(ok.any()):
                J = J - self.lambda_a * retrieval_nll(sa[ok], same[ok])
        z = bank.project(pool.keys, W)
        J = J + self.lambda_c * torch.logsumexp(logw[None, :] + (z @ z.T) / self.tau_c, 1).mean()
        return J

    def hypergradient(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(J, dJ/dw, φ*(w) detached) at ``w``."""
        wv = w.detach().clone().requires_grad_(True)
        W, b = self.calibration(wv)
        J = self.objective(wv, (W, b))
        (grad,) = torch.autograd.grad(J, wv)
        return J.detach(), grad, (W.detach(), b.detach())

    def solve(self, cap: int, steps: int, lr: float) -> torch.Tensor:
        """Projected gradient ascent from the uniform w; φ warm-started from the previous step's φ*(w). Returns the
        final w (keep its top ``cap`` entries)."""
        w = torch.full((len(self.pool),), cap / len(self.pool))
        for _ in range(steps):
            _, grad, (W, b) = self.hypergradient(w)
            self.W0, self.b0 = W, b
            step = lr * grad / grad.abs().max().clamp(min=1e-12)
            w = project_capped_simplex(w + step, float(cap))
        return w


def entry_bias(scores: torch.Tensor, ell: int, order: str = "descending") -> torch.Tensor:
    """Per memory token, the log of its entry's normalised retrieval weight (softmax over the placed entries'
    ``scores``, given best first), in the order the entries are placed."""
    lw = torch.log_softmax(scores, dim=0)
    if order == "ascending":
        lw = lw.flip(0)
    return lw.repeat_interleave(ell)

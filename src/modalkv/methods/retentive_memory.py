"""RetentiveKV's state-space memory: per-token entropy gates, the 2-D scan over an image's token grid, the 1-D scan
of the recall state, and the byte accounting that puts the states inside the budget.

Everything here is a pure function of tensors, so the decode loop of :mod:`.retentivekv` only calls it. The mechanism
is described in ``docs/methods/retentivekv.md``.
"""

from __future__ import annotations

import math

import torch

_TINY = 1e-30


def token_entropy(alpha: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Normalised cross-modal entropy ``H_hat`` [..., n] of every entry: ``p = alpha / sum(alpha)`` within the group,
    ``H = -p log p``, divided by its maximum over the group (0 outside the group)."""
    a = alpha.float() * group
    p = a / a.sum(-1, keepdim=True).clamp(min=_TINY)
    ent = -(p * torch.log(p.clamp(min=_TINY)))
    return ent / ent.amax(-1, keepdim=True).clamp(min=_TINY) * group


def decay_gate(h_hat: torch.Tensor, h_min: float, beta: float, centre: float = 0.5) -> torch.Tensor:
    """Retention (decay) gate of a token from its normalised entropy: ``h_min + (1 - h_min) sigmoid(beta (H - centre))``,
    in [h_min, 1] and increasing in the entropy (an uncertain token keeps the memory longer)."""
    return h_min + (1 - h_min) * torch.sigmoid(beta * (h_hat.float() - centre))


def input_gate(h_hat: torch.Tensor, beta: float, centre: float = 0.5) -> torch.Tensor:
    """Absorption (input) gate of a token from its normalised entropy: ``sigmoid(beta (H - centre))``, in (0, 1) and
    increasing in the entropy (a high-entropy evicted token enters the memory, a negligible one barely does)."""
    return torch.sigmoid(beta * (h_hat.float() - centre))


def scan1d(a: torch.Tensor, d: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence ``S <- d_i S + a_i x_i`` over the masked entries of the last dimension, in order, as weights.

    a, d, mask [..., m]. Returns (w [..., m], total [...]): ``S_end = total * S_start + sum_i w_i x_i`` with
    ``w_i = a_i * prod_{j > i, masked} d_j`` (0 for unmasked entries) and ``total = prod_{masked} d_j``.
    """
    logd = torch.where(mask, torch.log(d.float().clamp(min=_TINY)), torch.zeros_like(d, dtype=torch.float32))
    after = logd.flip(-1).cumsum(-1).flip(-1) - logd  # sum of log d over the later masked entries
    w = torch.where(mask, a.float() * torch.exp(after), torch.zeros_like(after))
    return w, torch.exp(logd.sum(-1))


def _path_weights(logd: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Bidirectional scan toward ``root`` along the last dimension: logd [H, R, C] log decays of the cells, root [H]
    the target column. Returns [H, R, C] the decay a cell's input has reached when the scan arrives at the root:
    ``exp(sum of logd over the path from the cell to the root, the cell excluded, the root included)``."""
    H, R, C = logd.shape
    cum = logd.cumsum(-1)  # cum[c] = sum_{j <= c}
    idx = root.view(H, 1, 1).expand(H, R, 1)
    cum_r = cum.gather(2, idx)  # [H, R, 1]
    ld_r = logd.gather(2, idx)
    col = torch.arange(C, device=logd.device).view(1, 1, C)
    left = cum_r - cum  # cells c <= root: sum over (c, root]
    right = (cum - logd) - (cum_r - ld_r)  # cells c > root: sum over [root, c)
    return torch.exp(torch.where(col <= root.view(H, 1, 1), left, right))


def scan2d_weights(row: torch.Tensor, col: torch.Tensor, root: torch.Tensor, gate: torch.Tensor, gamma_h: float,
                   gamma_v: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of one image's tokens in the horizontal and vertical sub-states of the visual memory.

    row, col [m] grid coordinates of the image's tokens; root [H] index (into the m tokens) of the root patch per
    head; gate [H, m] each token's decay gate. The horizontal sub-state scans every row toward the root's column, the
    state decaying by ``gamma_h * gate_j`` at each token j it enters (the root's column included), and sums the rows'
    scans; the vertical sub-state does the same along every column toward the root's row with ``gamma_v``. Returns
    (w_h, w_v) [H, m]: the product of decays from each token to the root (1 at the root; ``gamma ** distance`` when all
    gates are 1). A token's contribution to a sub-state is its input gate times this weight.
    """
    H, m = gate.shape
    rows, cols = int(row.max()) + 1, int(col.max()) + 1
    dev = gate.device
    flat = (row * cols + col).long()
    logg = torch.log(gate.float().clamp(min=_TINY))
    grid = torch.zeros(H, rows * cols, device=dev)  # cells without a token (a partial last row) do not decay
    out = []
    for gamma, transpose in ((gamma_h, False), (gamma_v, True)):
        g = grid.clone()
        g[:, flat] = logg + math.log(gamma)
        g = g.view(H, rows, cols)
        target = col[root] if not transpose else row[root]
        if transpose:
            g = g.transpose(1, 2)
        w = _path_weights(g, target.long())
        if transpose:
            w = w.transpose(1, 2)
        out.append(w.reshape(H, rows * cols)[:, flat])
    return out[0], out[1]


def moment_state_floats(d: int, dv: int, second_order: bool = False) -> int:
    """float32 numbers one moment state holds per (row, KV head): m, sum k, sum v, sum k v^T (, sum k k^T), and its
    lazy decay scale."""
    return 1 + d + dv + d * dv + (d * d if second_order else 0) + 1


def entries_within(bytes_budget: torch.Tensor, state_bytes: int, entry_bytes: int) -> torch.Tensor:
    """How many entries of ``entry_bytes`` fit in ``bytes_budget`` [B] beside ``state_bytes`` of states (per head)."""
    room = (bytes_budget.double() - state_bytes) / entry_bytes
    return torch.floor(room + 1e-9).clamp(min=0).long()

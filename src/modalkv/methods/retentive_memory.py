"""RetentiveKV's state-space memory: the retention score and per-token entropy gates, the visual tokens' grid and
spatial weights, the 2-D scan over an image's token grid, the 1-D scan of the recall state, the states themselves
(creation, absorption, lazy decay) and the byte accounting that puts the states inside the budget.

Everything here is a pure function of tensors, so the decode loop of :mod:`.retentivekv` only calls it. The mechanism
is described in ``docs/methods/retentivekv.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..modality import IMAGE, VIDEO, ModalityLayout, mask_runs, place_square

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


def retention_score(alpha: torch.Tensor, group: torch.Tensor, lam: float) -> torch.Tensor:
    """Retention score ``R = lam * alpha_hat + (1 - lam) * H_hat`` per entry.

    alpha [..., n] attention received (>= 0, 0 for absent entries); group [..., n] bool: the entries of one
    modality (visual or text). Within the group ``p = alpha / sum(alpha)``, ``H = -p log p``, and both ``alpha``
    and ``H`` are divided by their maximum over the group. Entries outside the group get 0.
    """
    a = alpha.float() * group
    a_hat = a / a.amax(-1, keepdim=True).clamp(min=_TINY)
    return (lam * a_hat + (1 - lam) * token_entropy(alpha, group)) * group


def row_entropy(p: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """Normalised entropy (in [0, 1]) of attention rows p [..., n] restricted to ``among`` [..., n]."""
    x = p.float() * among
    x = x / x.sum(-1, keepdim=True).clamp(min=_TINY)
    ent = -(x * torch.log(x.clamp(min=_TINY))).sum(-1)
    count = among.sum(-1).float()
    return torch.where(count > 1, ent / torch.log(count.clamp(min=2)), torch.zeros_like(ent))


# -- the visual tokens' grid ---------------------------------------------------------------------------------------
def square_grid(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(item, row, col) [B, n] of tokens with modality ids ``ids`` [B, n] (CPU): each run of visual tokens is one
    image laid out as a square (a 1-D strip when its length is not a square); videos are numbered apart from
    images; text tokens get item -1 (and row, col 0)."""
    B, n = ids.shape
    layout = ModalityLayout(ids, *(torch.full((B, n), -1, dtype=torch.int32) for _ in range(4)))
    for b in range(B):
        for mid in (IMAGE, VIDEO):  # each run of visual tokens is one item, a square when its length is one
            runs = mask_runs(ids[b] == mid)
            if runs:
                place_square(layout, b, runs, None, mid)
    item = layout.item.long() + n * (ids == VIDEO)  # videos numbered apart from images
    return item, layout.row.long().clamp(min=0), layout.col.long().clamp(min=0)


def manhattan_weights(item: torch.Tensor, row: torch.Tensor, col: torch.Tensor, R: torch.Tensor,
                      gamma_s: float) -> torch.Tensor:
    """[B, H, n] spatial weight of every visual token (0 for text): ``gamma_s ** Manhattan distance`` to its image's
    root patch (the token with the largest ``R`` [B, H, n] of that image, per head); item, row, col [B, n]."""
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
        out = torch.where(in_i, gamma_s ** dist.float(), out)
    return out


def scan_weights(item: torch.Tensor, row: torch.Tensor, col: torch.Tensor, R: torch.Tensor, gate: torch.Tensor,
                 gamma_h: float, gamma_v: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, n] each visual token's weights in the horizontal and vertical sub-states (0 for text): the 2-D scan of
    its image toward the root patch (argmax ``R`` of that image and head, :func:`scan2d_weights`), gated per token by
    ``gate`` [B, H, n]."""
    B, H, n = R.shape
    w_h = torch.zeros(B, H, n, device=R.device)
    w_v = torch.zeros(B, H, n, device=R.device)
    for b in range(B):
        for i in item[b][item[b] >= 0].unique().tolist():
            idx = (item[b] == i).nonzero().squeeze(-1)
            root = R[b][:, idx].argmax(-1)  # [H]
            wh, wv = scan2d_weights(row[b, idx], col[b, idx], root, gate[b][:, idx], gamma_h, gamma_v)
            w_h[b][:, idx] = wh
            w_v[b][:, idx] = wv
    return w_h, w_v


# -- the states ----------------------------------------------------------------------------------------------------
# A layer's states are a dict of float32 tensors [B, H, S, ...] (S states): the moment sums "m", "s", "u", "M" (and
# "C", second order) or the linear-attention sums "S", "z"; "scale" [B, H, S] is their lazy decay (the sums are stored
# divided by it); "_version" counts the changes.

def empty_states(B: int, H: int, S: int, d: int, dv: int, device, linear: bool,
                 second_order: bool) -> dict[str, torch.Tensor]:
    """``S`` empty states per (row, KV head): linear-attention sums when ``linear``, else moment sums."""
    z = lambda *shape: torch.zeros(B, H, S, *shape, dtype=torch.float32, device=device)  # noqa: E731
    if linear:
        states = {"S": z(d, dv), "z": z(d)}
    else:
        states = {"m": z(), "s": z(d), "u": z(dv), "M": z(d, dv)}
        if second_order:
            states["C"] = z(d, d)
    states["scale"] = torch.ones(B, H, S, dtype=torch.float32, device=device)
    return states


def fold_scale(states: dict) -> None:
    """Multiply the lazy decay scale into the sums (before it underflows) and reset it to 1."""
    scale = states["scale"]
    for name, t in states.items():
        if name != "scale" and not name.startswith("_"):
            t *= scale.view(*scale.shape, *([1] * (t.dim() - 3)))
    scale.fill_(1.0)
    states["_version"] = states.get("_version", 0) + 1


def absorb(states: dict, g: int, w: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, linear: bool,
           heads: slice = slice(None), decay: torch.Tensor | None = None) -> None:
    """Add tokens to state ``g``: w [B, H', m] weights, keys [B, H', m, d], values [B, H', m, dv]
    (H' = the KV heads ``heads``); ``decay`` [B, H'] multiplies the state first."""
    states["_version"] = states.get("_version", 0) + 1
    sl = (slice(None), heads, g)
    if decay is not None:
        states["scale"][sl] *= decay
        if bool((states["scale"][sl] < 1e-20).any()):
            fold_scale(states)
    w = w.float() / states["scale"][sl][..., None]  # sums are stored divided by the lazy decay scale
    k, v = keys.float(), values.float()
    if linear:
        phi = F.elu(k) + 1
        states["S"][sl] += torch.einsum("bhm,bhmd,bhme->bhde", w, phi, v)
        states["z"][sl] += torch.einsum("bhm,bhmd->bhd", w, phi)
        return
    states["m"][sl] += w.sum(-1)
    states["s"][sl] += torch.einsum("bhm,bhmd->bhd", w, k)
    states["u"][sl] += torch.einsum("bhm,bhme->bhe", w, v)
    states["M"][sl] += torch.einsum("bhm,bhmd,bhme->bhde", w, k, v)
    if "C" in states:
        states["C"][sl] += torch.einsum("bhm,bhmd,bhme->bhde", w, k, k)


# -- reading the states in decode attention ------------------------------------------------------------------------
def linear_readout(states: dict, h: int, q: torch.Tensor, logits: torch.Tensor, values: torch.Tensor, gate_w: float,
                   gate_b: float, convex: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear-attention readout of head ``h`` (``phi = elu + 1``) joined to local attention by the gate
    ``sigmoid(gate_w H_t + gate_b)``: added, or mixed convexly when ``convex``. q [B, r, d] float, logits [B, r, n],
    values [B, n, dv] -> (output [B, r, dv], probs over the entries [B, r, n])."""
    scale = states["scale"][:, h]  # [B, S]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    local = torch.matmul(probs.to(values.dtype), values).float()
    phi = F.elu(q) + 1
    num = torch.einsum("brd,bsde,bs->bre", phi, states["S"][:, h], scale)
    den = torch.einsum("brd,bsd,bs->br", phi, states["z"][:, h], scale)
    o_s = num / (den[..., None] + 1e-6)
    gamma = torch.sigmoid(gate_w * row_entropy(probs, torch.isfinite(logits)) + gate_b)
    gamma = gamma * (den > 0)  # an empty state contributes nothing
    out = (1 - gamma[..., None]) * local + gamma[..., None] * o_s if convex else local + gamma[..., None] * o_s
    return out.to(values.dtype), probs.to(values.dtype)


def moment_readout(states: dict, h: int, q: torch.Tensor, logits: torch.Tensor, values: torch.Tensor, gated: bool,
                   gate_w: float, gate_b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax readout of head ``h``'s moment states: :func:`moment_readout_layer` for that one head. Shapes as
    :func:`linear_readout`; the probs are renormalised over the cached entries (for scoring)."""
    one = {name: t[:, h : h + 1] for name, t in states.items() if not name.startswith("_")}
    out, probs = moment_readout_layer(one, q[:, None], logits[:, None], values[:, None], gated, gate_w, gate_b)
    return out[:, 0], probs[:, 0]


def moment_readout_layer(states: dict, q: torch.Tensor, logits: torch.Tensor, values: torch.Tensor, gated: bool,
                         gate_w: float, gate_b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax readout of the moment states of every KV head at once (second order when the states hold
    ``"C"``): each state one pseudo-entry inside the softmax, weighted by the gate ``sigmoid(gate_w H_t + gate_b)``
    when ``gated``. q [B, H, r, d] float, logits [B, H, r, n], values [B, H, n, dv] -> (output [B, H, r, dv], probs
    over the entries [B, H, r, n], renormalised over the cached entries for scoring)."""
    scale = states["scale"]  # [B, H, S]
    m = states["m"]  # [B, H, S]
    kbar = states["s"] / m.clamp(min=_TINY)[..., None]  # [B, H, S, d]
    z = torch.matmul(q, kbar.transpose(-1, -2))  # [B, H, r, S]
    u = states["u"][:, :, None]  # [B, H, 1, S, dv]
    num = u + torch.einsum("bhrd,bhsde->bhrse", q, states["M"]) - z[..., None] * u
    den = m[:, :, None].expand_as(z)
    if "C" in states:
        qcq = torch.einsum("bhrd,bhsde,bhre->bhrs", q, states["C"], q)
        den = den + 0.5 * (qcq - m[:, :, None] * z * z).clamp(min=0)
    weight = den * scale[:, :, None]
    if gated:
        local_probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        gamma = torch.sigmoid(gate_w * row_entropy(local_probs, torch.isfinite(logits)) + gate_b)
        weight = weight * gamma[..., None]
    state_logits = torch.where(weight > 0, z + torch.log(weight.clamp(min=_TINY)), torch.full_like(z, float("-inf")))
    value = num / den.clamp(min=_TINY)[..., None]  # [B, H, r, S, dv]
    all_logits = torch.cat([logits.float(), state_logits], -1)
    p = torch.softmax(all_logits, dim=-1)
    n = logits.shape[-1]
    out = torch.matmul(p[..., :n].to(values.dtype), values).float()
    out = out + (p[..., n:, None] * torch.nan_to_num(value)).sum(-2)
    local = p[..., :n]
    local = local / local.sum(-1, keepdim=True).clamp(min=_TINY)  # attention over the cached entries, for scoring
    return out.to(values.dtype), local.to(values.dtype)


def first_order_terms(states: dict) -> dict[str, torch.Tensor]:
    """The per-state terms of the first-order readout for every head at once: ``k_bar`` and ``u/m`` [B, H, S, d],
    ``(M - k_bar u^T) / m`` [B, H, S, d, dv] and ``log(m scale)`` [B, H, S] (-inf for an empty state)."""
    m = states["m"]  # [B, H, S]
    safe = m.clamp(min=_TINY)[..., None]
    kbar = states["s"] / safe
    b = states["u"] / safe
    A = (states["M"] - kbar[..., :, None] * states["u"][..., None, :]) / safe[..., None]
    logm = torch.where(m > 0, torch.log(safe[..., 0] * states["scale"]), torch.full_like(m, float("-inf")))
    return {"kbar": kbar, "b": b, "A": A, "logm": logm}


def first_order_readout(terms: dict, h: int, q: torch.Tensor, logits: torch.Tensor,
                        values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first-order softmax readout of head ``h``: :func:`first_order_readout_layer` for that one head. Shapes as
    :func:`linear_readout`."""
    one = {name: t[:, h : h + 1] for name, t in terms.items() if isinstance(t, torch.Tensor)}
    out, probs = first_order_readout_layer(one, q[:, None], logits[:, None], values[:, None])
    return out[:, 0], probs[:, 0]


def first_order_readout_layer(terms: dict, q: torch.Tensor, logits: torch.Tensor,
                              values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first-order softmax readout of every KV head at once from :func:`first_order_terms`: one pseudo-entry per
    state with logit ``q.k_bar + log(m scale)`` and the query-affine value ``u/m + q^T (M - k_bar u^T) / m``. Shapes
    as :func:`moment_readout_layer`."""
    z = torch.matmul(q, terms["kbar"].transpose(-1, -2)) + terms["logm"][:, :, None, :]  # [B, H, r, S]
    value = terms["b"][:, :, None] + torch.einsum("bhrd,bhsde->bhrse", q, terms["A"])  # [B, H, r, S, dv]
    n = logits.shape[-1]
    p = torch.softmax(torch.cat([logits.float(), z], -1), dim=-1)
    out = torch.matmul(p[..., :n].to(values.dtype), values).float() + (p[..., n:, None] * value).sum(-2)
    local = p[..., :n]
    local = local / local.sum(-1, keepdim=True).clamp(min=_TINY)
    return out.to(values.dtype), local.to(values.dtype)

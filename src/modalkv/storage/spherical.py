"""Spherical KV storage: keys as radius codes + direction codes in tier sections, values dense.

Paper: Chauhan et al., "Spherical KV: Angle-Domain Attention and Rate-Distortion Retention for KV Caches",
arXiv 2605.18856 (v2). The method (codebooks, tiers, allocation) is :class:`modalkv.methods.SphericalKV`; this
module holds the coded entries and their reads.
"""

from __future__ import annotations

import math

import torch

from . import kernels
from .base import Payload, StorageFormat, gather_slots, grown

SORTS_LAST = 1 << 40  # a sort key above every position: entries given it sort after all real ones


def code_bytes(groups: int, bits: int) -> int:
    """Bytes of one token's packed direction codes (``groups * bits`` bits, rounded up to whole bytes)."""
    return (groups * bits + 7) // 8


def _bit_layout(groups: int, bits: int, device):
    offset = torch.arange(groups, device=device, dtype=torch.int64) * bits
    return offset // 8, offset % 8  # byte index and bit shift of each code (a code spans at most two bytes)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Direction codes [..., G] (each < 2**bits) -> one little-endian bit stream uint8 [..., ceil(G*bits/8)]."""
    G = codes.shape[-1]
    byte, shift = _bit_layout(G, bits, codes.device)
    word = codes.to(torch.int32) << shift.to(torch.int32)  # < 2**15
    nbytes = code_bytes(G, bits)
    out = torch.zeros(*codes.shape[:-1], nbytes + 1, dtype=torch.int32, device=codes.device)
    index = byte.expand(*codes.shape[:-1], G)
    out.scatter_add_(-1, index, word & 0xFF)
    out.scatter_add_(-1, index + 1, word >> 8)
    return out[..., :nbytes].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [..., nbytes] -> int64 codes [..., groups]."""
    byte, shift = _bit_layout(groups, bits, packed.device)
    p = torch.nn.functional.pad(packed.to(torch.int64), (0, 1))
    lo = p.index_select(-1, byte)
    hi = p.index_select(-1, byte + 1)
    return ((lo | (hi << 8)) >> shift) & ((1 << bits) - 1)


def directions(keys: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [..., d] -> (radii [..., G], unit directions [..., G, g]); a zero group gets direction e_0."""
    x = keys.float().unflatten(-1, (keys.shape[-1] // g, g))
    r = x.norm(dim=-1)
    u = x / r.clamp(min=1e-12)[..., None]
    zero = r <= 1e-12
    if bool(zero.any()):
        e0 = torch.zeros(g, device=keys.device)
        e0[0] = 1.0
        u = torch.where(zero[..., None], e0, u)
    return r, u


def encode_directions(u: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Nearest codeword (largest cosine) per group: u [B, n, G, g], book [G, K, g] -> codes [B, n, G] int64."""
    return torch.einsum("bngx,gkx->bngk", u, book).argmax(-1)


class SphericalStorage(StorageFormat):
    """The coded store of a :class:`~modalkv.methods.SphericalKV` method (its tiers, pages and group order)."""

    name = "spherical"

    def __init__(self, params):
        self.params = params

    @property
    def payload_class(self):
        return SphericalPayload

    def __deepcopy__(self, memo):  # the method owns the parameters; a copied cache shares them with its method
        return self


class SphericalPayload(Payload):
    """Slots ``[0, tail_start)`` are tier sections (tier 1, 2, 3, each ``width`` slots, tokens in the order they were
    laid out, in pages of ``page_size`` tokens), slots ``[tail_start, n)`` a dense tail of keys appended since the
    last re-allocation; values are dense for every slot.

    A tier-t section holds per token ``ceil(G_t b_t / 8)`` bytes of packed direction codes and ``G_t`` bytes of
    radius codes; per page a header (8 bytes: tier id, count, padding) and ``G_t`` float32 radius scales
    (``sigma_j = max r_j`` over the page; ``r_hat = sigma round(255 r / sigma) / 255``).

    Entries move freely inside the tail; an entry inside a section is removed by laying the kept entries out again
    (:meth:`keep`: the directions keep their codes, the radii are re-coded against their new pages' scales).
    """

    fused = True
    repacks = True  # a layer whose packing ended packs again on the next one-token append (see SphericalLayer)

    def __init__(self, fmt: SphericalStorage, keys, values, reserve: int):
        self.format = fmt
        B, k, d = keys.shape
        self.d, self.dv, self.dtype = d, values.shape[-1], keys.dtype
        self.reserve = max(0, reserve)
        self.books = None  # [per tier: [G_t, K_t, g_t]] set by the method
        self.sections: list[dict] = []
        self.values = grown(values, k + self.reserve, k)
        self.tail_start = 0  # until the first layout every entry is dense tail
        self.tail_keys = grown(keys, k + self.reserve, k)

    @property
    def params(self):
        return self.format.params

    @property
    def batch(self) -> int:
        return self.values.shape[0]

    def first_movable(self) -> int:
        return self.tail_start

    # -- writing ----------------------------------------------------------------------------------------------
    def append(self, keys, values, at: int) -> None:
        q = keys.shape[1]
        r = at - self.tail_start
        if r + q > self.tail_keys.shape[1]:
            self.tail_keys = grown(self.tail_keys, max(r + q, self.tail_keys.shape[1] + 64), r)
        if at + q > self.values.shape[1]:
            self.values = grown(self.values, at + q + max(64, self.reserve), at)
        self.tail_keys[:, r : r + q] = keys
        self.values[:, at : at + q] = values

    def grow(self, cap: int) -> None:
        if cap > self.values.shape[1]:
            self.values = grown(self.values, cap, self.values.shape[1])

    def move(self, dst: torch.Tensor, src: int) -> None:
        rows = torch.arange(dst.shape[0], device=dst.device)
        self.tail_keys[rows, dst - self.tail_start] = self.tail_keys[:, src - self.tail_start].clone()
        self.values[rows, dst] = self.values[:, src].clone()

    def keep(self, slots: torch.Tensor, n: int):
        """Keep ``slots`` [B, m]: coded entries stay in their tier (sections laid out again), tail entries stay
        dense. Returns (order, ok) into ``slots`` (see :mod:`modalkv.storage.base`)."""
        keys, _ = self.kv(n)
        tiers = gather_slots(self.tiers(n), slots)
        rank = torch.arange(slots.shape[1], device=slots.device).expand_as(slots)
        return self.layout(gather_slots(keys, slots), gather_slots(self.values, slots), tiers, rank,
                           torch.ones_like(slots, dtype=torch.bool), keep_tail=True)

    def encode(self, tiers: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, n: int):
        """The method's (re-)allocation: slot s gets tier ``tiers[:, s]`` (1..T; 0 = dropped), each tier's tokens
        sorted by position. Returns (order, ok) into slots [0, n)."""
        keys, values = self.kv(n)
        return self.layout(keys, values[:, :n], tiers, pos[:, :n].long(), valid[:, :n], keep_tail=False)

    def layout(self, keys, values, tiers, sort_key, valid, keep_tail: bool):
        """Lay entries [B, m] out as tier sections (then a dense tail of the tier-0 entries if ``keep_tail``)."""
        groups = list(range(1, len(self.params.tier_spec) + 1)) + ([0] if keep_tail else [])
        orders, oks, widths = [], [], []
        for t in groups:
            sel = valid & (tiers == t)
            count = sel.sum(-1)
            w = int(count.max()) if count.numel() else 0
            order = torch.where(sel, sort_key, torch.full_like(sort_key, SORTS_LAST)).argsort(dim=-1, stable=True)[:, :w]
            orders.append(order)
            oks.append(torch.arange(w, device=order.device)[None, :] < count[:, None])
            widths.append(w)
        order, ok = torch.cat(orders, 1), torch.cat(oks, 1)
        m = order.shape[1]
        new_keys = gather_slots(keys, order)
        vals = gather_slots(values, order)
        if not m <= self.values.shape[1] <= m + self.reserve + 64:  # in place unless too small or far too large
            self.values = values.new_zeros(self.batch, m + self.reserve, self.dv)
        self.values[:, :m] = vals
        self.sections, start = [], 0
        for t, w in zip(groups, widths):
            if t and w:
                self.sections.append(self._encode_section(t, start, new_keys[:, start : start + w],
                                                          ok[:, start : start + w]))
            start += w
        self.tail_start = sum(w for t, w in zip(groups, widths) if t)
        tail = m - self.tail_start
        if not tail <= self.tail_keys.shape[1] <= tail + self.reserve + 64:  # in place, as the values
            self.tail_keys = keys.new_empty(self.batch, tail + self.reserve, self.d)
        self.tail_keys[:, :tail] = new_keys[:, self.tail_start :]
        return order, ok

    def _encode_section(self, t: int, start: int, keys: torch.Tensor, ok: torch.Tensor) -> dict:
        g, bits = self.params.tier_spec[t - 1]
        P = self.params.page_size
        B, w, d = keys.shape
        G = d // g
        r, u = directions(self.params.grouped(keys), g)  # [B, w, G], [B, w, G, g]
        r = r * ok[..., None]
        codes = encode_directions(u, self.books[t - 1])
        pages = math.ceil(w / P)
        rp = torch.zeros(B, pages * P, G, device=keys.device)
        rp[:, :w] = r
        scale = rp.view(B, pages, P, G).amax(2).clamp(min=1e-12)  # [B, pages, G] float32
        per_tok = scale.repeat_interleave(P, 1)[:, :w]
        rcode = torch.round(255 * r / per_tok).clamp(0, 255).to(torch.uint8)
        return {"tier": t, "start": start, "width": w, "G": G, "g": g, "bits": bits,
                "codes": pack_codes(codes, bits).contiguous(), "rcode": rcode.contiguous(), "scale": scale.contiguous()}

    def select_batch(self, index: torch.Tensor) -> None:
        self.values = self.values.index_select(0, index)
        self.tail_keys = self.tail_keys.index_select(0, index)
        for sec in self.sections:
            for name in ("codes", "rcode", "scale"):
                sec[name] = sec[name].index_select(0, index)

    def shrink(self, cap: int) -> None:
        if cap < self.values.shape[1]:
            self.values = self.values[:, :cap].clone()

    # -- reading ----------------------------------------------------------------------------------------------
    def tiers(self, n: int) -> torch.Tensor:
        """[B, n] tier of every slot (0 for the dense tail)."""
        out = torch.zeros(self.batch, n, dtype=torch.long, device=self.values.device)
        for sec in self.sections:
            out[:, sec["start"] : sec["start"] + sec["width"]] = sec["tier"]
        return out

    def radii(self, sec) -> torch.Tensor:
        P = self.params.page_size
        per_tok = sec["scale"].repeat_interleave(P, 1)[:, : sec["width"]]
        return sec["rcode"].float() * per_tok / 255.0  # [B, w, G]

    def section_keys(self, sec) -> torch.Tensor:
        """Dense reconstruction ``k_hat_j = r_hat_j C[c_j]`` of a section's keys: [B, w, d]."""
        codes = unpack_codes(sec["codes"], sec["bits"], sec["G"])  # [B, w, G]
        book = self.books[sec["tier"] - 1]  # [G, K, g]
        G, K, g = book.shape
        B, w = codes.shape[:2]
        dirs = book[torch.arange(G, device=codes.device)[None, None, :], codes]  # [B, w, G, g]
        return self.params.ungrouped((dirs * self.radii(sec)[..., None]).reshape(B, w, G * g)).to(self.dtype)

    def lut(self, sec, query: torch.Tensor) -> torch.Tensor:
        """Per query row and group j the table ``T[j, c] = <q_j, C_c>``: query [B, r, d] -> [B, r, G, K]."""
        book = self.books[sec["tier"] - 1]
        G, K, g = book.shape
        B, r, _ = query.shape
        return torch.einsum("brjx,jkx->brjk", self.params.grouped(query.float()).reshape(B, r, G, g), book)

    def section_logits(self, sec, query: torch.Tensor) -> torch.Tensor:
        """Angle-domain logits of a section, never rebuilding dense keys: query [B, r, d] -> [B, r, w];
        ``l_i = sum_j r_hat_ij T[j, c_ij]`` (pure torch: G gathers and G multiply-adds per key)."""
        lut = self.lut(sec, query)
        B, r, G, _ = lut.shape
        codes = unpack_codes(sec["codes"], sec["bits"], G)  # [B, w, G]
        w = codes.shape[1]
        picked = lut.gather(3, codes.transpose(1, 2)[:, None].expand(B, r, G, w))  # [B, r, G, w]
        return torch.einsum("brjw,bwj->brw", picked, self.radii(sec))

    def kv(self, n: int):
        parts = [self.section_keys(sec) for sec in self.sections]
        parts.append(self.tail_keys[:, : n - self.tail_start])
        return torch.cat(parts, 1), self.values[:, :n]

    def logits(self, query: torch.Tensor, n: int) -> torch.Tensor:
        if self.params.reference:  # the dense-reconstruction path (the paper's sphkv_recon ablation)
            return super().logits(query, n)
        out = query.new_empty(query.shape[0], query.shape[1], n, dtype=torch.float32)
        lib = kernels.library() if self.fused and query.device.type == "cpu" else None
        grouped = self.params.grouped(query.float()).contiguous()[:, None] if lib is not None else None
        for sec in self.sections:
            if lib is not None:
                spherical_logits(lib, [self], sec["tier"], grouped, out[:, None])
            else:
                out[:, :, sec["start"] : sec["start"] + sec["width"]] = self.section_logits(sec, query)
        tail = self.tail_keys[:, : n - self.tail_start]
        out[:, :, self.tail_start :] = torch.matmul(query.float(), tail.float().transpose(1, 2))
        return out.to(query.dtype)

    def mix(self, probs: torch.Tensor, n: int) -> torch.Tensor:
        return torch.matmul(probs.to(self.values.dtype), self.values[:, :n])

    # -- accounting and saving --------------------------------------------------------------------------------
    def section_bytes(self) -> int:
        """Codes, radius codes, page scales and page headers of every tier section (all batch rows)."""
        total = 0
        for sec in self.sections:
            pages = sec["scale"].shape[1]
            total += sec["codes"].numel() + sec["rcode"].numel() + sec["scale"].numel() * 4 + 8 * pages * self.batch
        return total

    def nbytes(self, n: int) -> int:
        tail = (n - self.tail_start) * self.d * self.tail_keys.element_size() * self.batch
        return self.section_bytes() + tail + n * self.dv * self.values.element_size() * self.batch

    def allocated(self) -> int:
        return self.section_bytes() + sum(t.numel() * t.element_size() for t in (self.values, self.tail_keys))

    _SECTION_FIELDS = ("tier", "start", "width", "G", "g", "bits")

    def state(self, n: int):
        """Values, each tier section's codes, radius codes and page scales as stored, and the dense tail. The
        codebooks are the method's (restored by ``SphericalKV.load_state_dict``)."""
        tensors = {"values": self.values[:, :n], "tail_keys": self.tail_keys[:, : n - self.tail_start]}
        for sec in self.sections:  # one section per tier
            tensors.update({f"tier{sec['tier']}.{name}": sec[name] for name in ("codes", "rcode", "scale")})
        scalars = {"tail_start": self.tail_start,
                   "sections": [{name: sec[name] for name in self._SECTION_FIELDS} for sec in self.sections]}
        return tensors, scalars

    def restore(self, tensors, scalars, n: int, reserve: int) -> None:
        tail, values = tensors["tail_keys"], tensors["values"]
        self.d, self.dv, self.dtype = tail.shape[-1], values.shape[-1], tail.dtype
        self.reserve = max(0, reserve)
        self.values = grown(values, n + self.reserve, n)
        self.tail_start = int(scalars["tail_start"])
        self.tail_keys = grown(tail, tail.shape[1] + self.reserve, tail.shape[1])
        self.sections = [{**meta, **{name: tensors[f"tier{meta['tier']}.{name}"]
                                     for name in ("codes", "rcode", "scale")}} for meta in scalars["sections"]]
        self.books = None


def spherical_logits(lib, payloads: list[SphericalPayload], tier: int, query: torch.Tensor, out: torch.Tensor) -> None:
    """Fused logits of tier ``tier``'s section of every payload (head h reads ``payloads[h]``): query f32 contiguous
    [B, H, r, d] in the grouped channel order (``params.grouped``), out f32 [B, H, r, >=n] (innermost stride 1),
    written at each section's slots. The kernel forms each (row, head)'s table ``T = <q_j, C_c>`` itself."""
    B, H, r, d = query.shape
    rows, shape, books = [], None, []
    for h, pl in enumerate(payloads):
        for sec in pl.sections:
            if sec["tier"] != tier or not sec["width"]:
                continue
            book = pl.books[tier - 1].float().contiguous()  # [G, K, g]
            books.append(book)  # held until the call returns
            shape = (sec["G"], sec["g"], sec["bits"], book.shape[1])
            for b in range(B):
                rows.append((kernels.row(sec["codes"], b), kernels.row(sec["rcode"], b), kernels.row(sec["scale"], b),
                             kernels.row(query, b, h), book.data_ptr(),
                             kernels.row(out, b, h) + sec["start"] * out.element_size(), sec["width"]))
    if rows:
        G, g, bits, K = shape
        tasks = kernels.tasks(rows)  # held until the call returns
        lib.spherical_logits(len(rows), tasks.data_ptr(), G, g, bits, K, payloads[0].params.page_size, r,
                             out.stride(2), kernels.threads())


def spherical_tail_logits(lib, payloads: list[SphericalPayload], query: torch.Tensor, out: torch.Tensor,
                          sizes: list[int]) -> None:
    """Logits of every payload's dense tail (slots ``[tail_start, sizes[h])``, float32 keys): query f32 contiguous
    [B, H, r, d], out f32 [B, H, r, >=max(sizes)] (innermost stride 1); head h reads ``payloads[h]``."""
    B, H, r, d = query.shape
    rows = [(kernels.row(pl.tail_keys, b), kernels.row(query, b, h),
             kernels.row(out, b, h) + pl.tail_start * out.element_size(), n - pl.tail_start)
            for h, (pl, n) in enumerate(zip(payloads, sizes)) for b in range(B) if n > pl.tail_start]
    if rows:
        table = kernels.tasks(rows)
        lib.dense_logits(len(rows), table.data_ptr(), d, r, out.stride(2), kernels.threads())


def spherical_mix(lib, payloads: list[SphericalPayload], probs: torch.Tensor, out: torch.Tensor,
                  sizes: list[int]) -> None:
    """Probabilities times the dense float32 values of slots [0, sizes[h]) of every payload: probs f32
    [B, H, r, >=max(sizes)] (innermost stride 1), out f32 contiguous [B, H, r, dv] (overwritten)."""
    B, H, r, _ = probs.shape
    rows = [(kernels.row(pl.values, b), kernels.row(probs, b, h), kernels.row(out, b, h), n)
            for h, (pl, n) in enumerate(zip(payloads, sizes)) for b in range(B)]
    table = kernels.tasks(rows)
    lib.dense_mix(len(rows), table.data_ptr(), payloads[0].dv, r, probs.stride(2), kernels.threads())


class SphericalLayer:
    """The dense values and dense-tail keys of every KV head of one Spherical KV layer held in layer buffers
    ``[B, H, cap, ...]``; each head's :class:`SphericalPayload` holds a view of its slice with its own capacity, so
    the head-by-head code (re-allocations lay entries out in place) keeps working, while :meth:`append` writes a new
    token to every head at once, each at its own slot (heads hold different numbers of entries): one indexed write per
    buffer whatever the number of heads. Coded sections stay per head (they are rewritten only by re-allocations).
    A head whose tensors were re-allocated (a layout that needed another size, batch selection) ends the packing
    (:meth:`intact` is False) until the layer packs again.
    """

    ragged = True  # heads may hold different numbers of entries

    def __init__(self, payloads: list[SphericalPayload]):
        first = payloads[0]
        self.payloads = payloads
        B, H = first.batch, len(payloads)
        self.heads = torch.arange(H, device=first.values.device)
        self.values = first.values.new_zeros(B, H, max(pl.values.shape[1] for pl in payloads), first.dv)
        self.tail = first.tail_keys.new_zeros(B, H, max(pl.tail_keys.shape[1] for pl in payloads), first.d)
        for h, pl in enumerate(payloads):
            self.values[:, h, : pl.values.shape[1]] = pl.values
            self.tail[:, h, : pl.tail_keys.shape[1]] = pl.tail_keys
            self._view(h, pl.values.shape[1], pl.tail_keys.shape[1])

    def _view(self, h: int, vcap: int, tcap: int) -> None:
        pl = self.payloads[h]
        with torch.enable_grad():  # as the dense layer buffers: in-place writes allowed with or without no_grad
            pl.values, pl.tail_keys = self.values[:, h, :vcap], self.tail[:, h, :tcap]

    def intact(self) -> bool:
        """Are the heads' values and tail keys still views of these buffers? (Pointer arithmetic only.)"""
        for name, buf in (("values", self.values), ("tail_keys", self.tail)):
            base, step = buf.data_ptr(), buf.stride(1) * buf.element_size()
            if any(getattr(pl, name).data_ptr() != base + h * step for h, pl in enumerate(self.payloads)):
                return False
        return True

    def _grow(self, name: str, cap: int) -> None:
        buf = getattr(self, name)
        new = buf.new_zeros(buf.shape[0], buf.shape[1], cap, buf.shape[3])
        new[:, :, : buf.shape[2]] = buf
        setattr(self, name, new)
        for h, pl in enumerate(self.payloads):
            self._view(h, pl.values.shape[1], pl.tail_keys.shape[1])

    def append(self, keys: torch.Tensor, values: torch.Tensor, sizes: list[int]) -> None:
        """Append one entry to every head h at its slot ``sizes[h]`` (keys [B, H, 1, d], values [B, H, 1, dv]);
        a head without room grows by 64 slots (as :meth:`SphericalPayload.append`)."""
        tails = [n - pl.tail_start for n, pl in zip(sizes, self.payloads)]
        for h, (pl, n, r) in enumerate(zip(self.payloads, sizes, tails)):
            vcap, tcap = pl.values.shape[1], pl.tail_keys.shape[1]
            if n + 1 > vcap or r + 1 > tcap:
                vcap = max(vcap, n + 1 + max(64, pl.reserve))
                tcap = max(tcap, r + 1 + 64)
                if vcap > self.values.shape[2]:
                    self._grow("values", vcap)
                if tcap > self.tail.shape[2]:
                    self._grow("tail", tcap)
                self._view(h, vcap, tcap)
        dev = self.values.device
        self.values[:, self.heads, torch.tensor(sizes, device=dev)] = values[:, :, 0]
        self.tail[:, self.heads, torch.tensor(tails, device=dev)] = keys[:, :, 0]

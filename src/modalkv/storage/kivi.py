"""KIVI storage: keys quantized per channel, values per token, the most recent entries in full precision.

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024 (arXiv 2402.02750).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .base import Payload, StorageFormat, gather_slots, grown


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., d] (values < 2**bits) -> packed uint8 [..., d * bits / 8], low bits first."""
    per = 8 // bits
    c = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: packed uint8 [..., m] -> codes uint8 [..., m * 8 / bits]."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantisation of ``x`` with one (scale, zero) per slice along ``dim``.

    Returns (codes uint8 same shape as x, scale fp16, zero fp16) with scale/zero keeping ``dim`` as size 1.
    The codes are computed against the fp16-rounded scale and zero, exactly as they are dequantized.
    """
    xf = x.float()
    lo = xf.amin(dim, keepdim=True)
    hi = xf.amax(dim, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8).half()
    zero = lo.half()
    codes = torch.round((xf - zero.float()) / scale.float()).clamp(0, levels).to(torch.uint8)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype) -> torch.Tensor:
    return (codes.float() * scale.float() + zero.float()).to(dtype)


@dataclass
class KIVI(StorageFormat):
    """Quantized storage: keys per channel, values per token, the most recent tokens in full precision.

    Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024
    (arXiv 2402.02750). Asymmetric min-max quantisation ``Q(x) = round((x - z) / s)``, ``z = min``,
    ``s = (max - min) / (2^b - 1)``. Keys: per channel, every ``group_size`` consecutive tokens share one (s, z)
    per channel. Values: per token, every ``group_size`` channels share one (s, z). Codes are bit-packed
    (four 2-bit or two 4-bit codes per byte), so the bytes reported are the bytes held.

    Parameters
    ----------
    bits : int
        2, 4 or 8.
    group_size : int
        ``G``: tokens per key group and channels per value group (paper: 32). CHOICE: the value group is
        ``min(G, head_dim)`` and must divide the head dimension.
    residual : int
        ``R``: the most recent entries kept in full precision (paper: 128).

    Notes
    -----
    CHOICE (quantisation schedule): once ``R + G`` entries are full precision, the oldest ``G`` of them are
    quantized as one key group (the paper quantizes keys in chunks, values token by token; here values leave the
    residual in the same chunks — per-token value quantisation makes the result identical, they only stay exact a
    little longer). At prefill the kept prompt entries are quantized the same way, so at most ``R + G - 1`` stay
    exact.
    CHOICE (scale storage): scales and zeros in fp16, as in the paper's kernels.
    CHOICE (eviction inside quantized groups): an evicted entry becomes a hole (masked, not counted as kept);
    when every batch row has at least ``G`` holes the store is repacked (dequantized, compacted, requantized),
    so evicting methods stay bounded in memory. Requantizing repacked groups compounds the quantisation error
    of those entries once per repack.
    Reads: attention logits are computed from the codes, ``q . (s c + z) = (q * s) . c + q . z`` per key group, and
    the attention output as ``sum_t p_t (s_t c_t + z_t)`` per value group, by the fused kernels of
    :mod:`modalkv.storage.kernels` (no dense copy of the keys or values); without them, by dequantizing the head.
    """

    bits: int = 4
    group_size: int = 32
    residual: int = 128

    name = "kivi"
    summary = "KIVI quantized storage: keys per channel, values per token, full-precision residual (Liu et al., 2024)"

    def __post_init__(self) -> None:
        for field in ("bits", "group_size", "residual"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"KIVI.{field} must be int, got {type(value).__name__} {value!r}")
        if self.bits not in (2, 4, 8):
            raise ValueError(f"KIVI.bits must be 2, 4 or 8, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"KIVI.group_size must be >= 1, got {self.group_size}")
        if self.residual < 0:
            raise ValueError(f"KIVI.residual must be >= 0, got {self.residual}")

    @property
    def payload_class(self):
        return KIVIPayload

    def params(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "residual": self.residual}


class KIVIPayload(Payload):
    """Slots ``[0, nq)`` quantized (``nq`` a multiple of G: codes ``kc``/``vc``, scales/zeros ``ks kz vs vz``), slots
    ``[nq, n)`` the full-precision residual ``rk``/``rv``."""

    fused = True  # read the codes with the fused kernels when they are available (False: dequantize)

    def __init__(self, fmt: KIVI, keys, values, reserve: int):
        self.format = fmt
        d, dv = keys.shape[-1], values.shape[-1]
        self.vgroup = min(fmt.group_size, dv)
        per = 8 // fmt.bits
        if dv % self.vgroup or d % per or dv % per:
            raise ValueError(f"KIVI: head dim {d}/{dv} must be divisible by the value group {self.vgroup} and 8/bits")
        self.dtype, self.d, self.dv = keys.dtype, d, dv
        self._set_dense(keys, values)

    @property
    def repack_holes(self) -> int:
        return self.format.group_size

    @property
    def batch(self) -> int:
        return self.rk.shape[0]

    def first_movable(self) -> int:
        return self.nq

    # -- the quantized representation -------------------------------------------------------------------------
    def _set_dense(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """(Re)build codes and residual from dense keys/values of slots [0, n)."""
        B, n = keys.shape[:2]
        G, R, bits = self.format.group_size, self.format.residual, self.format.bits
        nq = max(0, (n - R) // G * G)
        self.nq = 0
        dev = keys.device
        self.kc = torch.empty(B, 0, self.d * bits // 8, dtype=torch.uint8, device=dev)
        self.ks = torch.empty(B, 0, self.d, dtype=torch.float16, device=dev)
        self.kz = torch.empty(B, 0, self.d, dtype=torch.float16, device=dev)
        self.vc = torch.empty(B, 0, self.dv * bits // 8, dtype=torch.uint8, device=dev)
        self.vs = torch.empty(B, 0, self.dv // self.vgroup, dtype=torch.float16, device=dev)
        self.vz = torch.empty(B, 0, self.dv // self.vgroup, dtype=torch.float16, device=dev)
        if nq:
            self._quantize_groups(keys[:, :nq], values[:, :nq])
        rcap = (n - nq) + G + 8
        self.rk = keys.new_empty(B, rcap, self.d)
        self.rv = values.new_empty(B, rcap, self.dv)
        self.rk[:, : n - nq] = keys[:, nq:]
        self.rv[:, : n - nq] = values[:, nq:]

    def _quantize_groups(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize whole groups of entries [B, m*G, d] and append them to the quantized part."""
        B, m = keys.shape[:2]
        G, bits = self.format.group_size, self.format.bits
        kcodes, ks, kz = quantize(keys.reshape(B, m // G, G, self.d), bits, dim=2)  # per channel over G tokens
        vcodes, vs, vz = quantize(values.reshape(B, m, self.dv // self.vgroup, self.vgroup), bits, dim=3)
        self.kc = torch.cat([self.kc, pack_bits(kcodes.reshape(B, m, self.d), bits)], 1)
        self.ks = torch.cat([self.ks, ks.reshape(B, m // G, self.d)], 1)
        self.kz = torch.cat([self.kz, kz.reshape(B, m // G, self.d)], 1)
        self.vc = torch.cat([self.vc, pack_bits(vcodes.reshape(B, m, self.dv), bits)], 1)
        self.vs = torch.cat([self.vs, vs.reshape(B, m, -1)], 1)
        self.vz = torch.cat([self.vz, vz.reshape(B, m, -1)], 1)
        self.nq += m

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense keys and values of the quantized slots [0, nq)."""
        B, G, bits = self.batch, self.format.group_size, self.format.bits
        if self.nq == 0:
            return self.rk.new_empty(B, 0, self.d), self.rv.new_empty(B, 0, self.dv)
        kcodes = unpack_bits(self.kc, bits).view(B, self.nq // G, G, self.d)
        k = dequantize(kcodes, self.ks[:, :, None], self.kz[:, :, None], self.dtype).view(B, self.nq, self.d)
        vcodes = unpack_bits(self.vc, bits).view(B, self.nq, self.dv // self.vgroup, self.vgroup)
        v = dequantize(vcodes, self.vs[..., None], self.vz[..., None], self.dtype).view(B, self.nq, self.dv)
        return k, v

    # -- writing ----------------------------------------------------------------------------------------------
    def append(self, keys, values, at: int) -> None:
        B, q = keys.shape[:2]
        r = at - self.nq
        if r + q > self.rk.shape[1]:
            cap = max(r + q, self.rk.shape[1] + self.format.group_size)
            self.rk, self.rv = grown(self.rk, cap, r), grown(self.rv, cap, r)
        self.rk[:, r : r + q] = keys
        self.rv[:, r : r + q] = values
        G, R = self.format.group_size, self.format.residual
        r += q
        if r >= R + G:  # the oldest whole groups leave the residual
            m = (r - R) // G * G
            self._quantize_groups(self.rk[:, :m], self.rv[:, :m])
            self.rk[:, : r - m] = self.rk[:, m:r].clone()
            self.rv[:, : r - m] = self.rv[:, m:r].clone()

    def move(self, dst: torch.Tensor, src: int) -> None:
        rows = torch.arange(dst.shape[0], device=dst.device)
        r = dst - self.nq
        self.rk[rows, r] = self.rk[:, src - self.nq].clone()
        self.rv[rows, r] = self.rv[:, src - self.nq].clone()

    def keep(self, slots: torch.Tensor, n: int):
        k, v = self.kv(n)
        self._set_dense(gather_slots(k, slots), gather_slots(v, slots))
        return None

    def select_batch(self, index: torch.Tensor) -> None:
        for name in ("kc", "ks", "kz", "vc", "vs", "vz", "rk", "rv"):
            setattr(self, name, getattr(self, name).index_select(0, index))

    # -- reading ----------------------------------------------------------------------------------------------
    def kv(self, n: int):
        k, v = self.dequantized()
        r = n - self.nq
        return torch.cat([k, self.rk[:, :r]], 1), torch.cat([v, self.rv[:, :r]], 1)

    def logits(self, query: torch.Tensor, n: int) -> torch.Tensor:
        lib = kernels.library() if self.fused else None
        if lib is None or self.nq == 0:
            return super().logits(query, n)
        out = query.new_empty(query.shape[0], query.shape[1], n, dtype=torch.float32)
        kivi_logits(lib, [self], query.float().contiguous()[:, None], out[:, None])
        out[:, :, self.nq :] = torch.matmul(query.float(), self.rk[:, : n - self.nq].float().transpose(1, 2))
        return out.to(query.dtype)

    def mix(self, probs: torch.Tensor, n: int) -> torch.Tensor:
        lib = kernels.library() if self.fused else None
        if lib is None or self.nq == 0:
            return super().mix(probs, n)
        p = probs.float().contiguous()
        out = p.new_empty(p.shape[0], p.shape[1], self.dv)
        kivi_mix(lib, [self], p[:, None], out[:, None])
        out += torch.matmul(p[..., self.nq : n], self.rv[:, : n - self.nq].float())
        return out.to(self.dtype)

    # -- accounting and saving --------------------------------------------------------------------------------
    def _quantized_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kc, self.ks, self.kz, self.vc, self.vs, self.vz))

    def nbytes(self, n: int) -> int:
        """Codes + scales/zeros of the quantized part (holes inside quantized groups included: they are held until
        a repack) and the residual's full-precision entries."""
        return self._quantized_bytes() + (n - self.nq) * self.dense_bytes_per_entry() * self.batch

    def allocated(self) -> int:
        return self._quantized_bytes() + sum(t.numel() * t.element_size() for t in (self.rk, self.rv))

    def state(self, n: int):
        """The packed codes, scales and zeros as stored and the residual's full-precision entries."""
        r = n - self.nq
        tensors = {name: getattr(self, name) for name in ("kc", "ks", "kz", "vc", "vs", "vz")}
        tensors.update(rk=self.rk[:, :r], rv=self.rv[:, :r])
        return tensors, {"nq": self.nq}

    def restore(self, tensors, scalars, n: int, reserve: int) -> None:
        for name in ("kc", "ks", "kz", "vc", "vs", "vz"):
            setattr(self, name, tensors[name])
        self.nq = int(scalars["nq"])
        rk, rv = tensors["rk"], tensors["rv"]
        self.dtype, self.d, self.dv = rk.dtype, rk.shape[-1], rv.shape[-1]
        self.vgroup = min(self.format.group_size, self.dv)
        r = rk.shape[1]
        self.rk, self.rv = grown(rk, r + self.format.group_size + 8, r), grown(rv, r + self.format.group_size + 8, r)


# ----------------------------------------------------------------------------------------------------------------
# fused reads over several stores at once (a layer's heads): one kernel call
# ----------------------------------------------------------------------------------------------------------------


def kivi_logits(lib, payloads: list[KIVIPayload], query: torch.Tensor, out: torch.Tensor) -> None:
    """Logits of the quantized slots of every payload: query f32 [B, H, r, d] (contiguous), out f32 [B, H, r, >=nq]
    (innermost stride 1); head h reads ``payloads[h]``."""
    fmt = payloads[0].format
    B, H, r, d = query.shape
    ld = out.stride(2)
    rows = []
    for h, pl in enumerate(payloads):
        for b in range(B):
            rows.append((kernels.row(pl.kc, b), kernels.row(pl.ks, b), kernels.row(pl.kz, b),
                         kernels.row(query, b, h), kernels.row(out, b, h), pl.nq))
    table = kernels.tasks(rows)
    lib.kivi_logits(len(rows), table.data_ptr(), d, fmt.group_size, fmt.bits, r, ld, kernels.threads())


def kivi_mix(lib, payloads: list[KIVIPayload], probs: torch.Tensor, out: torch.Tensor) -> None:
    """sum_t p_t v_t over the quantized slots: probs f32 [B, H, r, >=nq] (innermost stride 1), out f32 contiguous
    [B, H, r, dv] (overwritten)."""
    fmt = payloads[0].format
    B, H, r, _ = probs.shape
    ld = probs.stride(2)
    rows = []
    for h, pl in enumerate(payloads):
        for b in range(B):
            rows.append((kernels.row(pl.vc, b), kernels.row(pl.vs, b), kernels.row(pl.vz, b),
                         kernels.row(probs, b, h), kernels.row(out, b, h), pl.nq))
    table = kernels.tasks(rows)
    lib.kivi_mix(len(rows), table.data_ptr(), payloads[0].dv, payloads[0].vgroup, fmt.bits, r, ld, kernels.threads())


# ----------------------------------------------------------------------------------------------------------------
# a layer's heads in layer buffers: one write per buffer when a token is appended
# ----------------------------------------------------------------------------------------------------------------


class KIVILayer:
    """The residuals and codes of every KV head of one KIVI layer held in layer buffers ``[B, H, cap, ...]``; each
    head's :class:`KIVIPayload` holds views of its slices (``rk = self.rk[:, h]``, ``kc = self.kc[:, h, :nq]``), so
    the head-by-head reads and writes keep working, while :meth:`append` writes a new token to every head at once
    and quantizes a finished group of every head in one set of tensor ops (the same codes as head by head: the
    quantisation is per head and group either way).

    Built by :meth:`pack` when the heads hold the same number of entries and quantized slots; any head-by-head change
    that re-allocates a head's tensors (eviction inside the codes, batch selection, a per-head quantisation) ends the
    packing (:meth:`intact` is False) and the layer goes back to appending head by head.
    """

    CODES = ("kc", "ks", "kz", "vc", "vs", "vz")
    ragged = False  # every head holds the same number of entries
    GROUPED = ("ks", "kz")  # one entry per key group, the others one per quantized token

    def __init__(self, payloads: list[KIVIPayload], n: int):
        first = payloads[0]
        self.payloads = payloads
        self.format = first.format
        self.d, self.dv, self.vgroup = first.d, first.dv, first.vgroup
        self.nq = first.nq
        B, H, G = first.batch, len(payloads), self.format.group_size
        r = n - self.nq
        rcap = max(r + G + 8, max(pl.rk.shape[1] for pl in payloads))
        self.rk = first.rk.new_zeros(B, H, rcap, self.d)
        self.rv = first.rv.new_zeros(B, H, rcap, self.dv)
        for h, pl in enumerate(payloads):
            self.rk[:, h, :r] = pl.rk[:, :r]
            self.rv[:, h, :r] = pl.rv[:, :r]
        self.qcap = self.nq + 4 * G  # quantized slots (a multiple of G): room for four more groups
        for name in self.CODES:
            t = getattr(first, name)
            buf = t.new_zeros(B, H, self._slots(name, self.qcap), *t.shape[2:])
            for h, pl in enumerate(payloads):
                buf[:, h, : self._slots(name, self.nq)] = getattr(pl, name)
            setattr(self, name, buf)
        self._views()

    def _slots(self, name: str, nq: int) -> int:
        return nq // self.format.group_size if name in self.GROUPED else nq

    def _views(self) -> None:
        """Point every head's payload at its slices of the layer buffers."""
        with torch.enable_grad():  # as the dense layer buffers: in-place writes allowed with or without no_grad
            for h, pl in enumerate(self.payloads):
                pl.rk, pl.rv = self.rk[:, h], self.rv[:, h]
                for name in self.CODES:
                    setattr(pl, name, getattr(self, name)[:, h, : self._slots(name, self.nq)])
                pl.nq = self.nq

    def intact(self) -> bool:
        """Are the heads' payloads still views of these buffers, with the layer's quantized slot count? (Pointer
        arithmetic only: no tensor op per head.)"""
        for name in ("rk", "rv", "kc", "vc", "ks"):
            buf = getattr(self, name)
            base, step = buf.data_ptr(), buf.stride(1) * buf.element_size()
            size = buf.shape[2] if name in ("rk", "rv") else self._slots(name, self.nq)
            for h, pl in enumerate(self.payloads):
                t = getattr(pl, name)
                # (an empty view reports address 0: nothing quantized yet)
                if t.shape[1] != size or (size and t.data_ptr() != base + h * step):
                    return False
        return all(pl.nq == self.nq for pl in self.payloads)

    def append(self, keys: torch.Tensor, values: torch.Tensor, at: int) -> None:
        """Append q entries to every head at slot ``at`` (keys [B, H, q, d], values [B, H, q, dv]); the oldest whole
        groups of the residual are quantized as :meth:`KIVIPayload.append` does."""
        q = keys.shape[2]
        G, R = self.format.group_size, self.format.residual
        r = at - self.nq
        if r + q > self.rk.shape[2]:
            cap = max(r + q, self.rk.shape[2] + G)
            self.rk = torch.cat([self.rk[:, :, :r], self.rk.new_zeros(*self.rk.shape[:2], cap - r, self.d)], 2)
            self.rv = torch.cat([self.rv[:, :, :r], self.rv.new_zeros(*self.rv.shape[:2], cap - r, self.dv)], 2)
            self._views()
        self.rk[:, :, r : r + q] = keys
        self.rv[:, :, r : r + q] = values
        r += q
        if r >= R + G:
            m = (r - R) // G * G
            self._quantize(m)
            self.rk[:, :, : r - m] = self.rk[:, :, m:r].clone()
            self.rv[:, :, : r - m] = self.rv[:, :, m:r].clone()
            self._views()

    def _quantize(self, m: int) -> None:
        """Quantize the residual's first ``m`` slots (whole groups) of every head into the code buffers."""
        B, H = self.rk.shape[:2]
        G, bits = self.format.group_size, self.format.bits
        kcodes, ks, kz = quantize(self.rk[:, :, :m].reshape(B, H, m // G, G, self.d), bits, dim=3)
        vcodes, vs, vz = quantize(self.rv[:, :, :m].reshape(B, H, m, self.dv // self.vgroup, self.vgroup), bits,
                                  dim=4)
        new = {"kc": pack_bits(kcodes.reshape(B, H, m, self.d), bits), "ks": ks.reshape(B, H, m // G, self.d),
               "kz": kz.reshape(B, H, m // G, self.d), "vc": pack_bits(vcodes.reshape(B, H, m, self.dv), bits),
               "vs": vs.reshape(B, H, m, -1), "vz": vz.reshape(B, H, m, -1)}
        if self.nq + m > self.qcap:
            cap = self.nq + m + max(4 * G, self.qcap // 8 // G * G)
            for name in self.CODES:
                buf = getattr(self, name)
                old = self._slots(name, self.nq)
                grown_buf = buf.new_zeros(B, H, self._slots(name, cap), *buf.shape[3:])
                grown_buf[:, :, :old] = buf[:, :, :old]
                setattr(self, name, grown_buf)
            self.qcap = cap
        for name, t in new.items():
            at = self._slots(name, self.nq)
            getattr(self, name)[:, :, at : at + t.shape[2]] = t
        self.nq += m

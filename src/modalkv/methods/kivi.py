"""KIVI-style quantized storage for the kept entries: composes with any eviction method.

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024 (arXiv 2402.02750).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import HeadStore


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., d] (values < 2**bits) -> packed uint8 [..., d * bits / 8]."""
    per = 8 // bits
    c = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: packed uint8 [..., m] -> codes uint8 [..., m * 8 / bits]."""
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
class KIVI:
    """Quantized storage: keys per channel, values per token, the most recent tokens in full precision.

    Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024
    (arXiv 2402.02750). Asymmetric min-max quantisation; keys share one (scale, zero) per channel over ``group_size``
    tokens, values per token over ``group_size`` channels; codes are bit-packed, so the bytes reported are the bytes
    held.

    Parameters
    ----------
    bits : int
        2, 4 or 8.
    group_size : int
        Tokens per key group and channels per value group (paper: 32).
    residual : int
        The most recent entries kept in full precision (paper: 128).

    CHOICE (quantisation schedule, fp16 scales, holes left by eviction and repacking): see docs/methods/kivi.md.
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

    def store_class(self):
        params = self

        class BoundQuantizedHeadStore(QuantizedHeadStore):
            kivi = params

        return BoundQuantizedHeadStore


class QuantizedHeadStore(HeadStore):
    """A :class:`HeadStore` whose older entries are KIVI-quantized (see :class:`KIVI`).

    Slots ``[0, nq)`` are quantized (``nq`` a multiple of G), slots ``[nq, n)`` are the full-precision residual.
    Per-entry metadata (positions, modality ids, validity, method state) is kept as in ``HeadStore``.
    """

    kivi: KIVI = KIVI()
    slot_arrays = ("pos", "mod", "valid")  # keys and values live in the codes and the residual buffers

    def __init__(self, keys, values, pos, mod, valid, extras, reserve: int):
        B, k, d = keys.shape
        dv = values.shape[-1]
        G, bits = self.kivi.group_size, self.kivi.bits
        self.vgroup = min(G, dv)
        if dv % self.vgroup or d % (8 // bits) or dv % (8 // bits):
            raise ValueError(f"KIVI: head dim {d}/{dv} must be divisible by the value group {self.vgroup} and 8/bits")
        self.dtype, self.d, self.dv = keys.dtype, d, dv
        cap = k + max(0, reserve)
        dev = keys.device
        self.pos = torch.empty(B, cap, dtype=torch.int32, device=dev)
        self.mod = torch.empty(B, cap, dtype=torch.int8, device=dev)
        self.valid = torch.zeros(B, cap, dtype=torch.bool, device=dev)
        self.extras = {name: torch.zeros(B, cap, dtype=torch.float32, device=dev) for name in extras}
        self.n = k
        self.all_valid = True
        self.pos[:, :k] = pos
        self.mod[:, :k] = mod
        self.valid[:, :k] = valid
        for name, t in extras.items():
            self.extras[name][:, :k] = t
        self.all_valid = bool(valid.all())
        self._set_dense(keys, values)

    # -- quantized representation -----------------------------------------------------------------------
    def _set_dense(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """(Re)build codes and residual from dense keys/values of slots [0, n)."""
        B, n = keys.shape[:2]
        G, R = self.kivi.group_size, self.kivi.residual
        nq = max(0, (n - R) // G * G)
        self.nq = 0
        dev = keys.device
        bits = self.kivi.bits
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
        G, bits = self.kivi.group_size, self.kivi.bits
        kg = keys.reshape(B, m // G, G, self.d)
        kcodes, ks, kz = quantize(kg, bits, dim=2)  # per channel over each group of G tokens
        vg = values.reshape(B, m, self.dv // self.vgroup, self.vgroup)
        vcodes, vs, vz = quantize(vg, bits, dim=3)  # per token over each group of channels
        self.kc = torch.cat([self.kc, _pack(kcodes.reshape(B, m, self.d), bits)], 1)
        self.ks = torch.cat([self.ks, ks.reshape(B, m // G, self.d)], 1)
        self.kz = torch.cat([self.kz, kz.reshape(B, m // G, self.d)], 1)
        self.vc = torch.cat([self.vc, _pack(vcodes.reshape(B, m, self.dv), bits)], 1)
        self.vs = torch.cat([self.vs, vs.reshape(B, m, -1)], 1)
        self.vz = torch.cat([self.vz, vz.reshape(B, m, -1)], 1)
        self.nq += m

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, G, bits = self.batch, self.kivi.group_size, self.kivi.bits
        if self.nq == 0:
            empty = self.rk.new_empty(B, 0, self.d)
            return empty, self.rv.new_empty(B, 0, self.dv)
        kcodes = _unpack(self.kc, bits).view(B, self.nq // G, G, self.d)
        k = dequantize(kcodes, self.ks[:, :, None], self.kz[:, :, None], self.dtype).view(B, self.nq, self.d)
        vcodes = _unpack(self.vc, bits).view(B, self.nq, self.dv // self.vgroup, self.vgroup)
        v = dequantize(vcodes, self.vs[..., None], self.vz[..., None], self.dtype).view(B, self.nq, self.dv)
        return k, v

    # -- HeadStore interface ------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._dequantized()
        r = self.n - self.nq
        return torch.cat([k, self.rk[:, :r]], 1), torch.cat([v, self.rv[:, :r]], 1)

    def _meta_tensors(self) -> list[torch.Tensor]:
        return [self.pos, self.mod, self.valid, *self.extras.values()]

    def append(self, keys, values, pos, mod, valid) -> None:
        B, q = keys.shape[:2]
        if self.n + q > self.pos.shape[1]:
            self._grow(self.n + q)
        self.pos[:, self.n : self.n + q] = pos
        self.mod[:, self.n : self.n + q] = mod
        self.valid[:, self.n : self.n + q] = valid
        for t in self.extras.values():
            t[:, self.n : self.n + q] = 0.0
        if not bool(valid.all()):
            self.all_valid = False
        r = self.n - self.nq
        if r + q > self.rk.shape[1]:
            grow = max(r + q, self.rk.shape[1] + self.kivi.group_size)
            rk, rv = self.rk.new_empty(B, grow, self.d), self.rv.new_empty(B, grow, self.dv)
            rk[:, :r], rv[:, :r] = self.rk[:, :r], self.rv[:, :r]
            self.rk, self.rv = rk, rv
        self.rk[:, r : r + q] = keys
        self.rv[:, r : r + q] = values
        self.n += q
        G, R = self.kivi.group_size, self.kivi.residual
        r += q
        if r >= R + G:  # the oldest whole groups leave the residual
            m = (r - R) // G * G
            self._quantize_groups(self.rk[:, :m], self.rv[:, :m])
            self.rk[:, : r - m] = self.rk[:, m:r].clone()
            self.rv[:, : r - m] = self.rv[:, m:r].clone()

    def _rebuild(self, order: torch.Tensor) -> None:
        """Keep slots ``order`` [B, m] (all rows the same count) and requantize."""
        k, v = self.kv()
        idx = order[..., None]
        keys = k.gather(1, idx.expand(-1, -1, self.d))
        values = v.gather(1, idx.expand(-1, -1, self.dv))
        for name in ("pos", "mod", "valid"):
            t = getattr(self, name)
            t[:, : order.shape[1]] = t.gather(1, order)
        for t in self.extras.values():
            t[:, : order.shape[1]] = t.gather(1, order)
        self.n = order.shape[1]
        self._set_dense(keys, values)
        self.all_valid = bool(self.valid[:, : self.n].all())

    def remove(self, slot: torch.Tensor) -> None:
        """Evict one entry per row. In the full-precision residual the entry is freed at once (the last slot moves
        into it); inside a quantized group it becomes a hole (see the CHOICE in :class:`KIVI`)."""
        if bool((slot >= self.nq).all()):
            self._remove_residual(slot)
            return
        rows = torch.arange(slot.shape[0], device=slot.device)
        self.valid[rows, slot] = False
        self.all_valid = False
        self.compact()

    def _remove_residual(self, slot: torch.Tensor) -> None:
        """Free one residual slot per row (slot [B], all >= nq): the last slot moves into it."""
        last = self.n - 1
        rows = torch.arange(slot.shape[0], device=slot.device)
        for t in self._meta_tensors():
            t[rows, slot] = t[:, last].clone()
        r = slot - self.nq
        self.rk[rows, r] = self.rk[:, last - self.nq].clone()
        self.rv[rows, r] = self.rv[:, last - self.nq].clone()
        self.n -= 1

    def compact(self) -> None:
        """Free residual holes at once (while every row has one); repack once every row holds at least G holes
        (a whole group's worth)."""
        if self.n == 0:
            return
        while self.n > self.nq:
            res_invalid = ~self.valid[:, self.nq : self.n]
            if not bool(res_invalid.any(-1).all()):
                break
            self._remove_residual(res_invalid.float().argmax(-1) + self.nq)
        if self.n and bool(self.valid[:, : self.n].all()):
            self.all_valid = True
        invalid = ~self.valid[:, : self.n]
        m = int(invalid.sum(-1).min())
        if m < self.kivi.group_size:
            return
        # per row: all valid slots plus its surplus holes beyond m, in slot order
        rank = invalid.long().cumsum(-1)
        drop = invalid & (rank <= m)
        key = torch.arange(self.n, device=invalid.device)[None, :].expand_as(invalid).masked_fill(drop, self.n)
        order = key.sort(-1).values[:, : self.n - m]
        self._rebuild(order)

    def keep_slots(self, slots: torch.Tensor) -> None:
        valid = slots >= 0
        self._rebuild(slots.clamp(min=0))
        self.valid[:, : slots.shape[1]] &= valid
        self.all_valid = bool(self.valid[:, : self.n].all())

    def add_extra(self, name: str, init: torch.Tensor | float = 0.0) -> torch.Tensor:
        t = torch.zeros(self.pos.shape, dtype=torch.float32, device=self.pos.device)
        t[:, : self.n] = init
        self.extras[name] = t
        return t

    def select_batch(self, index: torch.Tensor) -> None:
        for name in ("pos", "mod", "valid", "kc", "ks", "kz", "vc", "vs", "vz", "rk", "rv"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.extras = {k: v.index_select(0, index) for k, v in self.extras.items()}

    # -- saving (modalkv.saved) ---------------------------------------------------------------------------
    def state(self):
        """Per-slot metadata as ``HeadStore``, the packed codes, scales and zeros as stored, and the residual's
        full-precision entries (no dequantisation)."""
        tensors, scalars = super().state()
        r = self.n - self.nq
        tensors.update({name: getattr(self, name) for name in ("kc", "ks", "kz", "vc", "vs", "vz")})
        tensors.update(rk=self.rk[:, :r], rv=self.rv[:, :r])
        scalars["nq"] = self.nq
        return tensors, scalars

    def restore(self, tensors, scalars, reserve: int) -> None:
        super().restore(tensors, scalars, reserve)
        for name in ("kc", "ks", "kz", "vc", "vs", "vz"):
            setattr(self, name, tensors[name])
        self.nq = int(scalars["nq"])
        rk, rv = tensors["rk"], tensors["rv"]
        self.dtype, self.d, self.dv = rk.dtype, rk.shape[-1], rv.shape[-1]
        self.vgroup = min(self.kivi.group_size, self.dv)
        r = rk.shape[1]
        self.rk = rk.new_empty(rk.shape[0], r + self.kivi.group_size + 8, self.d)
        self.rv = rv.new_empty(rv.shape[0], r + self.kivi.group_size + 8, self.dv)
        self.rk[:, :r], self.rv[:, :r] = rk, rv

    # -- accounting ---------------------------------------------------------------------------------------
    def dense_bytes_per_entry(self) -> int:
        return (self.d + self.dv) * torch.empty((), dtype=self.dtype).element_size()

    def _quantized_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kc, self.ks, self.kz, self.vc, self.vs, self.vz))

    def bytes(self) -> dict[str, int]:
        """payload: codes + scales/zeros of the quantized part and the residual's full-precision entries (holes
        inside quantized groups included: they are held until a repack); meta: per valid entry, as HeadStore."""
        n_valid = self.count()
        residual = (self.n - self.nq) * self.dense_bytes_per_entry() * self.batch
        allocated = self._quantized_bytes() + sum(t.numel() * t.element_size() for t in (self.rk, self.rv))
        allocated += sum(t.numel() * t.element_size() for t in self._meta_tensors())
        return {
            "payload": self._quantized_bytes() + residual,
            "meta": n_valid * self.meta_bytes_per_entry(),
            "allocated": allocated,
        }

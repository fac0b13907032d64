"""The kept entries of one (layer, KV head): a :class:`HeadStore`.

A store holds, for all batch rows, slots ``[0, n)`` of:

* ``keys`` / ``values`` [B, cap, d]   post-RoPE keys and values (original positions baked in), in the store's
                                      payload (:mod:`modalkv.storage`: dense, KIVI codes, Spherical KV codes),
* ``pos`` [B, cap] int32               original token index of each entry (the cache never renumbers),
* ``mod`` [B, cap] int8                modality id (0 text, 1 image, 2 video, 3 audio),
* ``valid`` [B, cap] bool              False for padding slots (a row that keeps fewer entries than another),
* ``extras`` name -> [B, cap] float32  per-entry method state (e.g. H2O's accumulated attention).

Slots are unordered: a decode-time eviction moves the last slot into the freed one (O(1)), which is exact
because attention over post-RoPE keys does not depend on slot order. ``cap - n`` slots are reserve for
appended tokens.
"""

from __future__ import annotations

import torch

from .storage import DENSE
from .storage.base import grown


class HeadStore:
    """The kept entries of one (layer, KV head) for all batch rows (see the module docstring).

    The store owns the per-entry metadata of slots ``[0, n)`` (``pos``, ``mod``, ``valid``, ``extras``) and one
    payload (:mod:`modalkv.storage`) holding the same slots' keys and values in the store's format (dense, KIVI
    codes, Spherical KV codes). Eviction, compaction and batch selection are written once here, for every format.
    """

    growth = 64  # minimum number of slots added when the store is full
    slot_arrays = ("keys", "values", "pos", "mod", "valid")  # dense per-slot tensors a layer may pack (see pack())
    meta_arrays = ("pos", "mod", "valid")  # the metadata a layer of coded payloads packs (see pack_coded())

    def __init__(self, keys, values, pos, mod, valid, extras: dict[str, torch.Tensor], reserve: int, storage=None):
        B, k, _ = keys.shape
        cap = k + max(0, reserve)
        dev = keys.device
        self.payload = (storage or DENSE).new(keys, values, reserve)
        self.pos = torch.empty(B, cap, dtype=torch.int32, device=dev)
        self.mod = torch.empty(B, cap, dtype=torch.int8, device=dev)
        self.valid = torch.zeros(B, cap, dtype=torch.bool, device=dev)
        self.extras = {name: torch.zeros(B, cap, dtype=torch.float32, device=dev) for name in extras}
        self.pos[:, :k], self.mod[:, :k], self.valid[:, :k] = pos, mod, valid
        for name, t in extras.items():
            self.extras[name][:, :k] = t
        self.n = k
        self.all_valid = bool(valid.all())

    # -- dense payload views (packing, tests) ---------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor:
        return self.payload.keys

    @keys.setter
    def keys(self, value) -> None:
        self.payload.keys = value

    @property
    def values(self) -> torch.Tensor:
        return self.payload.values

    @values.setter
    def values(self, value) -> None:
        self.payload.values = value

    @property
    def d(self) -> int:
        return self.payload.d

    @property
    def dv(self) -> int:
        return self.payload.dv

    # -- storage ------------------------------------------------------------------------------------------
    def _meta(self) -> list[torch.Tensor]:
        return [self.pos, self.mod, self.valid, *self.extras.values()]

    def _grow(self, needed: int) -> None:
        """Reallocate every per-slot tensor with room for at least ``needed`` slots (keeping slots [0, n))."""
        cap = self.pos.shape[1]
        new_cap = max(needed, cap + max(self.growth, cap // 8))
        self.pos, self.mod, self.valid = (grown(t, new_cap, self.n) for t in (self.pos, self.mod, self.valid))
        self.extras = {name: grown(t, new_cap, self.n) for name, t in self.extras.items()}
        self.payload.grow(new_cap)

    def append(self, keys, values, pos, mod, valid) -> None:
        """Append q entries per row: keys/values [B, q, d], pos [B, q], mod [B, q], valid [B, q] bool (or True:
        every new entry is real, known without looking at a tensor)."""
        q, at = keys.shape[1], self.n
        if at + q > self.pos.shape[1]:
            self._grow(at + q)
        self.payload.append(keys, values, at)
        self.pos[:, at : at + q] = pos
        self.mod[:, at : at + q] = mod
        self.valid[:, at : at + q] = valid
        for t in self.extras.values():
            t[:, at : at + q] = 0.0
        if valid is not True and not bool(valid.all()):
            self.all_valid = False
        self.n += q

    def _move_last(self, slot: torch.Tensor) -> None:
        """Move the last slot of every row into ``slot`` [B] (all >= the payload's first movable slot); n -= 1."""
        last = self.n - 1
        self.payload.move(slot, last)
        if slot.shape[0] == 1 and slot.device.type == "cpu":  # one row on the CPU: plain views, no index tensors
            s = int(slot)
            if s != last:
                for t in self._meta():
                    t[0, s] = t[0, last]
        else:
            rows = torch.arange(slot.shape[0], device=slot.device)
            for t in self._meta():
                t[rows, slot] = t[:, last].clone()
        self.n -= 1

    def remove(self, slot: torch.Tensor) -> None:
        """Evict one entry per row (slot: LongTensor [B]). The last slot moves into the hole when the payload can
        take it there (always for dense entries); otherwise the entry is marked invalid and :meth:`compact` closes
        the holes (KIVI: once every row holds a group's worth; Spherical KV: at once, by laying the entries out
        again)."""
        lo = self.payload.first_movable()
        if lo == 0 or bool((slot >= lo).all()):
            self._move_last(slot)
            return
        rows = torch.arange(slot.shape[0], device=slot.device)
        self.valid[rows, slot] = False
        self.all_valid = False
        self.compact()

    def evict_lowest(self, score: torch.Tensor, count: torch.Tensor) -> None:
        """Evict, per row b, the ``count[b]`` valid entries with the lowest ``score`` [B, n] (inf = protected).

        Evicted slots are first marked invalid (rows may evict different numbers), then removed swap-with-last
        while every row has a hole, so the store shrinks as far as the batch allows (for batch 1, fully).
        """
        m = int(count.max()) if count.numel() else 0
        if m == 1 and self.all_valid and bool((count == 1).all()):  # the common decode step: one per row, no holes
            self.remove(score.argmin(-1))
            return
        if m > 0:
            valid = self.valid[:, : self.n]
            s = score.float().masked_fill(~valid, float("inf"))
            victims = s.topk(m, dim=-1, largest=False, sorted=True).indices  # [B, m]
            use = torch.arange(m, device=s.device)[None, :] < count[:, None]
            rows = torch.arange(self.batch, device=s.device)[:, None].expand_as(victims)
            self.valid[rows[use], victims[use]] = False
            self.all_valid = False
        self.compact()

    def compact(self) -> None:
        """Remove invalid slots: swap-with-last while every row has a hole where the payload can move entries; then,
        once every row has at least ``payload.repack_holes`` holes, keep only the valid entries (:meth:`keep_slots`)."""
        lo = self.payload.first_movable()
        while self.n > lo:
            invalid = ~self.valid[:, lo : self.n]
            if not bool(invalid.any(-1).all()):
                break
            self._move_last(invalid.float().argmax(-1) + lo)  # the first movable hole of each row
        if self.n == 0:
            return
        invalid = ~self.valid[:, : self.n]
        holes = int(invalid.sum(-1).min())
        if holes and holes >= self.payload.repack_holes:
            # per row: all valid slots plus its surplus holes beyond the common count, in slot order
            rank = invalid.long().cumsum(-1)
            drop = invalid & (rank <= holes)
            key = torch.arange(self.n, device=invalid.device)[None, :].expand_as(invalid).masked_fill(drop, self.n)
            self.keep_slots(key.sort(-1).values[:, : self.n - holes])
        if self.n and bool(self.valid[:, : self.n].all()):
            self.all_valid = True

    def keep_slots(self, slots: torch.Tensor) -> None:
        """Keep only ``slots`` (LongTensor [B, m], -1 = none) in every row, compacting in place (a payload that lays
        its entries out in its own order, Spherical KV's, returns that order and the metadata follows it)."""
        safe = slots.clamp(min=0)
        layout = self.payload.keep(safe, self.n)
        ok = slots >= 0
        if layout is not None:
            order, fits = layout
            safe, ok = safe.gather(1, order), ok.gather(1, order) & fits
        self.reorder(safe, ok)

    def reorder(self, slots: torch.Tensor, ok: torch.Tensor) -> None:
        """Metadata of slots [B, m] into slots [0, m) (``ok`` False: an unused slot)."""
        m = slots.shape[1]
        if m > self.pos.shape[1]:
            self._grow(m)
        for t in self._meta():
            t[:, :m] = t.gather(1, slots)
        self.valid[:, :m] &= ok
        self.n = m
        self.all_valid = bool(self.valid[:, :m].all())

    def shrink(self, reserve: int) -> None:
        """Release the slots beyond ``n + reserve`` (after a method kept fewer entries than the store holds)."""
        cap = self.n + max(0, reserve)
        if cap >= self.pos.shape[1]:
            return
        self.pos, self.mod, self.valid = (t[:, :cap].clone() for t in (self.pos, self.mod, self.valid))
        self.extras = {name: t[:, :cap].clone() for name, t in self.extras.items()}
        self.payload.shrink(cap)

    def add_extra(self, name: str, init: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Attach a per-entry float32 array (method state) that moves with the entries."""
        t = torch.zeros(self.pos.shape, dtype=torch.float32, device=self.pos.device)
        t[:, : self.n] = init
        self.extras[name] = t
        return t

    def select_batch(self, index: torch.Tensor) -> None:
        self.pos, self.mod, self.valid = (t.index_select(0, index) for t in (self.pos, self.mod, self.valid))
        self.extras = {k: v.index_select(0, index) for k, v in self.extras.items()}
        self.payload.select_batch(index)

    # -- saving (modalkv.saved) -----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The store as :func:`modalkv.save_cache` writes it: tensors of slots [0, n) only (no reserve) and plain
        scalars: the metadata, and the payload's tensors as stored (nothing is dequantized)."""
        tensors, scalars = self.payload.state(self.n)
        tensors.update({name: getattr(self, name)[:, : self.n] for name in ("pos", "mod", "valid")})
        tensors.update({"extra." + name: t[:, : self.n] for name, t in self.extras.items()})
        return tensors, {**scalars, "n": self.n, "all_valid": self.all_valid}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], scalars: dict, reserve: int, storage=None) -> "HeadStore":
        """A store rebuilt from :meth:`state`, with ``reserve`` free slots."""
        store = cls.__new__(cls)
        n = int(scalars["n"])
        for name, t in tensors.items():
            if (name in ("pos", "mod", "valid") or name.startswith("extra.")) and t.shape[1] != n:
                raise ValueError(f"a saved store holds {t.shape[1]} slots where its header says {n}")
        store.pos, store.mod, store.valid = (grown(tensors[name], n + reserve, n) for name in ("pos", "mod", "valid"))
        store.extras = {name[6:]: grown(t, n + reserve, n) for name, t in tensors.items() if name.startswith("extra.")}
        store.n = n
        store.all_valid = bool(scalars["all_valid"])
        store.payload = (storage or DENSE).restore(tensors, scalars, n, reserve)
        return store

    # -- reading ------------------------------------------------------------------------------------------
    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, n) as dense tensors ([B, n, d] each; a reconstruction for coded formats)."""
        return self.payload.kv(self.n)

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """Attention logits of ``query`` [B, r, d] (already scaled) against slots [0, n): [B, r, n]."""
        return self.payload.logits(query, self.n)

    def mix(self, probs: torch.Tensor) -> torch.Tensor:
        """Attention output of probabilities [B, r, n] over slots [0, n): [B, r, dv]."""
        return self.payload.mix(probs, self.n)

    def logits_values(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`logits` and the dense values [B, n, dv] (for readouts that combine them with other terms)."""
        return self.logits(query), self.kv()[1]

    def count(self) -> int:
        """Valid entries over all rows."""
        return int(self.valid[:, : self.n].sum())

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def dense_bytes_per_entry(self) -> int:
        """K+V bytes of one entry in a plain (unquantised) cache."""
        return self.payload.dense_bytes_per_entry()

    def meta_bytes_per_entry(self) -> int:
        return 4 + 1 + 1 + 4 * len(self.extras)  # pos int32, mod int8, valid bool, float32 extras

    def bytes(self) -> dict[str, int]:
        """payload: the payload's bytes of slots [0, n) as held (dense: valid entries only); meta: per valid
        entry; allocated: every tensor, reserve included."""
        n_valid = self.count()
        payload = self.payload.nbytes(self.n)
        if self.payload.packable:  # dense: padding slots of shorter rows hold nothing
            payload = n_valid * self.payload.dense_bytes_per_entry()
        return {
            "payload": payload,
            "meta": n_valid * self.meta_bytes_per_entry(),
            "allocated": self.payload.allocated() + sum(t.numel() * t.element_size() for t in self._meta()),
        }

"""The payload protocol: how one (layer, KV head) store holds its keys and values.

A :class:`~modalkv.store.HeadStore` owns, for all batch rows, the per-entry metadata of slots ``[0, n)``
(original position, modality id, validity, method extras) and one :class:`Payload` holding the keys and values of
the same slots in some stored form (dense, KIVI codes, Spherical KV direction codes). The store decides which slots
exist; the payload only stores, moves and reads them. A new storage format is a :class:`StorageFormat` (its
parameters, registered by name in :mod:`modalkv.storage`) and a :class:`Payload` subclass.

What a payload must do
----------------------
* ``append(keys, values, at)``: write ``q`` entries at slots ``[at, at + q)`` ([B, q, d] / [B, q, dv]).
* ``move(dst, src)``: slot ``src`` (an int, the last slot) of every row into slot ``dst[b]`` (swap-with-last
  eviction); allowed only for ``dst >= first_movable`` (slots that hold entries in a form a moved entry can take
  without re-encoding others).
* ``keep(slots, n)``: keep slots ``slots`` [B, m] (all >= 0, of the ``n`` held) in that order; returns ``(order, ok)`` [B, m'] when the
  payload had to lay the kept entries out differently (new slot i holds ``slots[b, order[b, i]]``, ``ok`` False for a
  padding slot), else None.
* ``grow(cap)``, ``select_batch(index)``, ``shrink(cap)``: capacity and batch-row bookkeeping.
* the two reads decode needs: ``logits(query, n)`` -> [B, r, n] for already scaled queries [B, r, d], and
  ``mix(probs, n)`` -> [B, r, dv] (probabilities times values); ``kv(n)`` is the dense reconstruction (the reference
  the reads are tested against, and what methods that rescore entries read).
* ``nbytes(n)``: the bytes of slots [0, n) as held (codes, scales, dense parts), ``allocated()``: every tensor,
  ``dense_bytes_per_entry()``: what one entry costs in a plain cache.
* ``state(n)`` / ``restore(...)``: the tensors and plain scalars :func:`modalkv.save_cache` writes.
"""

from __future__ import annotations

import copy

import torch


class StorageFormat:
    """The parameters of a storage format; :meth:`new` builds a payload for one store, :meth:`restore` rebuilds one
    from :meth:`Payload.state`. ``name`` is what a saved cache records; ``params()`` its parameters."""

    name = ""
    payload_class: type["Payload"]

    def new(self, keys: torch.Tensor, values: torch.Tensor, reserve: int) -> "Payload":
        return self.payload_class(self, keys, values, reserve)

    def restore(self, tensors: dict, scalars: dict, n: int, reserve: int) -> "Payload":
        payload = self.payload_class.__new__(self.payload_class)
        payload.format = self
        payload.restore(tensors, scalars, n, reserve)
        return payload

    def params(self) -> dict:
        return {}

    def copy(self) -> "StorageFormat":
        return copy.deepcopy(self)


class Payload:
    """Keys and values of slots ``[0, n)`` of one store, for B rows (see the module docstring)."""

    format: StorageFormat
    packable = False  # dense [B, cap, d] arrays that a layer may pack into one [B, H, cap, d] buffer
    repack_holes = 1  # holes every row must have before the store re-gathers its entries (keep)

    def first_movable(self) -> int:
        """The lowest slot an entry may be moved into (see :meth:`move`)."""
        return 0

    # -- writing ------------------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, at: int) -> None:
        raise NotImplementedError

    def move(self, dst: torch.Tensor, src: int) -> None:
        raise NotImplementedError

    def keep(self, slots: torch.Tensor, n: int):
        raise NotImplementedError

    def grow(self, cap: int) -> None:
        pass

    def shrink(self, cap: int) -> None:
        pass

    def select_batch(self, index: torch.Tensor) -> None:
        raise NotImplementedError

    # -- reading ------------------------------------------------------------------------------------------------
    def kv(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def logits(self, query: torch.Tensor, n: int) -> torch.Tensor:
        keys, _ = self.kv(n)
        return torch.matmul(query, keys.transpose(1, 2))

    def mix(self, probs: torch.Tensor, n: int) -> torch.Tensor:
        _, values = self.kv(n)
        return torch.matmul(probs.to(values.dtype), values)

    # -- accounting and saving ----------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        raise NotImplementedError

    def nbytes(self, n: int) -> int:
        raise NotImplementedError

    def allocated(self) -> int:
        raise NotImplementedError

    def dense_bytes_per_entry(self) -> int:
        return (self.d + self.dv) * torch.empty((), dtype=self.dtype).element_size()

    def state(self, n: int) -> tuple[dict[str, torch.Tensor], dict]:
        raise NotImplementedError

    def restore(self, tensors: dict, scalars: dict, n: int, reserve: int) -> None:
        raise NotImplementedError


def grown(t: torch.Tensor, cap: int, keep: int) -> torch.Tensor:
    """A copy of ``t`` [B, cap0, ...] with ``cap`` slots, the first ``keep`` copied."""
    new = t.new_zeros(t.shape[0], cap, *t.shape[2:])
    new[:, :keep] = t[:, :keep]
    return new


def gather_slots(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``t`` [B, cap, ...] at ``slots`` [B, m] -> [B, m, ...]."""
    if t.dim() == 2:
        return t.gather(1, slots)
    return t.gather(1, slots.view(*slots.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))

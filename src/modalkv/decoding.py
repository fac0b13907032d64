"""Decode-time eviction, written once: the context a method sees after each decode step, and the one routine that
evicts entries from a layer's head stores.

After a decode step attended, the core builds a :class:`DecodeStep` for the layer and hands it to the method's
``decode`` hook (and then to the cache's own ``decode_budget`` eviction). A method scores entries on a
:class:`Group` of head stores and calls :meth:`Group.evict`: per (batch row, KV head) the ``count`` lowest-scored
entries are chosen, handed to the method's ``on_evict`` hook while they are still stored (RetentiveKV absorbs them
into its state memories, LOOK-M merges them into kept entries), then removed, so their bytes are released. Removal
keeps every entry's original position and modality id; attention over post-RoPE keys does not depend on slot order.

Shapes: a group's tensors are ``[B, H', n]`` — ``H'`` = every KV head of a packed layer (the layer's buffers, one set
of tensor ops whatever the number of heads), or one head otherwise (``[B, 1, n]`` views of its store).

This module imports neither the cache's classes nor the methods: it works on anything that looks like a layer and its
head stores (:class:`LayerLike`, :class:`StoreLike`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

INF = float("inf")


@dataclass(frozen=True)
class Extra:
    """A float32 value a method keeps beside every stored entry: it moves with the entry when slots are reused, is
    counted as metadata and saved with the cache. Appended entries start at 0."""

    name: str
    meaning: str
    hides_entry: bool = False  # a value > 0 hides the entry from attention (kept and scored, but not read)


def hidden_entries(method, store) -> torch.Tensor | None:
    """[B, cap] float: the extra of ``store`` whose positive values hide entries from attention, or None."""
    for extra in getattr(method, "extras", ()):
        if extra.hides_entry and extra.name in store.extras:
            return store.extras[extra.name]
    return None


class StoreLike(Protocol):
    n: int
    all_valid: bool
    pos: torch.Tensor
    mod: torch.Tensor
    valid: torch.Tensor
    extras: dict

    def remove(self, slot: torch.Tensor) -> None: ...
    def keep_slots(self, slots: torch.Tensor) -> None: ...
    def kv(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def add_extra(self, name: str, init: Any = 0.0) -> torch.Tensor: ...


class LayerLike(Protocol):
    heads: list
    seen: int
    prompt_len: int
    packed: bool
    buffers: dict
    cache: Any

    def packed_intact(self) -> bool: ...
    def over_budget(self, h: int) -> Any: ...
    def decode_targets(self, h: int) -> torch.Tensor: ...


@dataclass
class DecodeStep:
    """One layer after one decode step attended.

    ``probs``: the step's attention over the stored entries: a tensor [B, H, G, q, n] (a packed layer) or a list of
    per-head tensors [B, G, q, n_h]; None when nobody asked for it. ``q``: new tokens in this step.
    """

    layer: Any  # LayerLike
    probs: torch.Tensor | list | None
    q: int = 1

    @property
    def heads(self) -> list:
        return self.layer.heads

    @property
    def newest(self) -> int:
        """Original position of the newest token (the cache never renumbers)."""
        return self.layer.seen - 1

    def probs_of(self, h: int) -> torch.Tensor:
        """[B, G, q, n_h] attention rows of head ``h`` (None when the step carries none)."""
        if self.probs is None:
            return None
        if isinstance(self.probs, torch.Tensor):
            return self.probs[:, h, ..., : self.heads[h].n]
        return self.probs[h]

    def packable(self) -> bool:
        """Can all heads be handled as one group (one set of tensor ops)?"""
        layer, heads = self.layer, self.heads
        return bool(layer.packed and layer.packed_intact() and all(store.n == heads[0].n for store in heads))

    def groups(self) -> list["Group"]:
        """The heads in groups a method decides on together: the whole layer when packed, else one per head."""
        if self.packable():
            return [Group(self, list(range(len(self.heads))), packed=True)]
        return [Group(self, [h]) for h in range(len(self.heads))]

    def group(self, heads: list[int] | None = None) -> "Group":
        """One group of ``heads`` (default: all) holding the same slot layout (e.g. HAE's broadcast decisions)."""
        heads = list(range(len(self.heads))) if heads is None else heads
        return Group(self, heads, packed=len(heads) == len(self.heads) and self.packable())


class Group:
    """Head stores of one layer with the same number of slots, seen as ``[B, H', n]`` tensors."""

    def __init__(self, step: DecodeStep, heads: list[int], packed: bool = False):
        self.step = step
        self.layer = step.layer
        self.heads = heads
        self.stores = [self.layer.heads[h] for h in heads]
        self.packed = packed
        self.n = self.stores[0].n
        if any(store.n != self.n for store in self.stores):
            raise ValueError("a decode group needs head stores with the same number of slots")
        # the method state of these heads (e.g. RetentiveKV's per-head states): [:, index]
        self.index = slice(None) if packed else slice(heads[0], heads[-1] + 1)

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.stores[0].pos.shape[0]

    @property
    def all_valid(self) -> bool:
        return all(store.all_valid for store in self.stores)

    def _slots(self, name: str) -> torch.Tensor:
        if self.packed:
            return self.layer.buffers[name][:, :, : self.n]
        if len(self.stores) == 1:
            return getattr(self.stores[0], name)[:, None, : self.n]
        return torch.stack([getattr(store, name)[:, : self.n] for store in self.stores], 1)

    @property
    def pos(self) -> torch.Tensor:
        return self._slots("pos")

    @property
    def mod(self) -> torch.Tensor:
        return self._slots("mod")

    @property
    def valid(self) -> torch.Tensor:
        return self._slots("valid")

    def extra(self, name: str) -> torch.Tensor:
        """[B, H', n] writable view of a method extra (added, at 0, to heads that lack it)."""
        for store in self.stores:
            if name not in store.extras:
                store.add_extra(name)
        if self.packed:
            return layer_extra(self.layer, name)[:, :, : self.n]
        if len(self.stores) > 1:
            raise ValueError("a writable extra needs a packed layer or a single head")
        return self.stores[0].extras[name][:, None, : self.n]

    def probs(self) -> torch.Tensor:
        """[B, H', G, q, n] the step's attention rows."""
        p = self.step.probs
        if p is None:
            raise ValueError("this method did not ask for the decode attention (needs_decode_probs)")
        if self.packed and isinstance(p, torch.Tensor):
            return p[..., : self.n]
        if isinstance(p, torch.Tensor):
            return p[:, self.heads, ..., : self.n]
        if len(self.heads) == 1:
            return p[self.heads[0]][:, None]
        return torch.stack([p[h] for h in self.heads], 1)

    def received(self, reduce: str = "mean") -> torch.Tensor:
        """[B, H', n] float: attention each entry received in this step (query heads of a group reduced by ``reduce``,
        "mean", "max" or "sum", then summed over the new tokens)."""
        p = self.probs()
        if reduce == "sum":
            return p.sum((2, 3)).float()
        per = p.amax(2) if reduce == "max" else p.mean(2)
        return per.sum(2).float()

    def keys_values(self, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense keys and values [B, H', m, d] of ``slots`` [B, H', m] (all slots when None)."""
        if self.packed:
            K, V = self.layer.buffers["keys"][:, :, : self.n], self.layer.buffers["values"][:, :, : self.n]
        else:
            kv = [store.kv() for store in self.stores]
            K = torch.stack([k for k, _ in kv], 1) if len(kv) > 1 else kv[0][0][:, None]
            V = torch.stack([v for _, v in kv], 1) if len(kv) > 1 else kv[0][1][:, None]
        if slots is None:
            return K, V
        slots = slots.expand(K.shape[0], K.shape[1], -1)
        return (K.gather(2, slots[..., None].expand(-1, -1, -1, K.shape[-1])),
                V.gather(2, slots[..., None].expand(-1, -1, -1, V.shape[-1])))

    # -- budgets ------------------------------------------------------------------------------------------
    def over(self):
        """Entries each (row, head) holds beyond its decode target: a Python int when one sequence without holes
        is equally far over in every head of the group (decided without a device round trip), else a LongTensor
        [B, H'] (clamped at 0)."""
        layer = self.layer
        if self.batch > 1 and self.packed:  # one set of ops for every head
            kept = torch.stack(layer.prefill_kept, 1)  # [B, H]
            real = layer.prompt_real[:, None]
            target = layer.cache.budget.decode_targets(kept, real + layer.seen - layer.prompt_len, real)
            return (self.valid.sum(-1) - target).clamp(min=0)
        over = [layer.over_budget(h) for h in self.heads]
        if all(isinstance(o, int) for o in over):
            if all(o == over[0] for o in over):
                return over[0]
            return torch.tensor(over, device=self.stores[0].pos.device).clamp(min=0)[None]
        dev = self.stores[0].pos.device
        return torch.stack([torch.as_tensor(o, device=dev).expand(self.batch) for o in over], 1).clamp(min=0)

    def kept_after(self, over):
        """Valid entries each (row, head) keeps after evicting ``over``: int, or LongTensor [B, H']."""
        if isinstance(over, int):
            return self.n - over
        return self.valid.sum(-1) - over

    def newer_than(self, count) -> torch.Tensor:
        """[B, H', n] bool: entries among the ``count`` (int, or LongTensor [B, H']) most recent positions of each
        row (by original position, counted back from the row's newest valid entry)."""
        pos = self.pos
        if isinstance(count, int) and self.all_valid:
            return pos > self.step.newest - count
        newest = pos.masked_fill(~self.valid, -1).amax(-1, keepdim=True)
        count = count if isinstance(count, int) else count[..., None]
        return pos > newest - count

    # -- the eviction routine ----------------------------------------------------------------------------------
    def evict(self, score: torch.Tensor, count, *, skip=0, keep_protected: bool = False,
              on_evict: Callable[["Group", torch.Tensor, torch.Tensor | None], None] | None = None) -> None:
        """Evict, per (row, head), the ``count`` valid entries with the lowest ``score`` [B, H' or 1, n].

        ``inf`` marks a protected entry: evicted last, or never with ``keep_protected`` (the row may then stay over
        its target). ``skip`` (int or LongTensor [B, H']): that many lowest-scored entries are protected too (e.g.
        StreamingLLM's sinks, scored by position). ``count``: int (the same for every row and head) or LongTensor
        [B, H']. ``on_evict(group, victims, use)`` sees the chosen slots [B, H', m] (``use`` [B, H', m] bool marks
        the real ones, None = all) before they are removed.

        The common decode step (one entry per row and head, no holes) takes one ``argmin``/``kthvalue`` and a
        swap-with-last removal (one scatter per layer buffer when packed); otherwise a ``topk`` chooses the victims
        and the survivors are gathered in their slot order.
        """
        H = len(self.stores)
        if isinstance(count, int):
            if count <= 0:
                return
            if count == 1 and isinstance(skip, int) and self.all_valid:
                s = score.expand(score.shape[0], H, -1) if score.shape[1] != H else score
                victims = (s.kthvalue(skip + 1, -1, keepdim=True) if skip else s.min(-1, keepdim=True)).indices
                use = None
                if keep_protected:
                    use = torch.isfinite(s.gather(-1, victims))
                    if not bool(use.all()):
                        self._evict_chosen(victims, use, on_evict)
                        return
                if on_evict is not None:
                    on_evict(self, victims, None)
                self._remove_one(victims)
                return
            count = torch.full((self.batch, H), count, dtype=torch.long, device=score.device)
        m = int(count.max()) if count.numel() else 0
        if m <= 0:
            return
        s = score.float().masked_fill(~self.valid, INF)
        top = m + (skip if isinstance(skip, int) else int(skip.max()))
        top = min(top, s.shape[-1])
        victims = s.topk(top, dim=-1, largest=False, sorted=True).indices  # [B, H', top]
        rank = torch.arange(top, device=s.device)
        low = skip if isinstance(skip, int) else skip[..., None]
        use = (rank >= low) & (rank < low + count[..., None])
        use &= self.valid.gather(-1, victims)
        if keep_protected:
            use &= torch.isfinite(s.gather(-1, victims))
        self._evict_chosen(victims, use, on_evict)

    def _evict_chosen(self, victims, use, on_evict) -> None:
        if on_evict is not None:
            on_evict(self, victims, use)
        if self.all_valid and bool((use.sum(-1) == 1).all()):  # one per row and head: swap-with-last
            self._remove_one(victims.gather(-1, use.to(torch.uint8).argmax(-1, keepdim=True)))
            return
        drop = torch.zeros(victims.shape[0], victims.shape[1], self.n + 1, dtype=torch.bool, device=victims.device)
        drop.scatter_(2, victims.masked_fill(~use, self.n), True)
        keep = self.valid & ~drop[..., : self.n]
        self.keep(keep)

    def keep(self, keep: torch.Tensor) -> None:
        """Keep, per (row, head), the slots where ``keep`` [B, H' or 1, n] is true (in their slot order); the rest go."""
        n = self.n
        arange = torch.arange(n, device=keep.device)
        for i, store in enumerate(self.stores):
            k = keep[:, i if keep.shape[1] > 1 else 0]
            width = int(k.sum(-1).max())
            idx = torch.where(k, arange, n).sort(-1).values[:, :width]
            store.keep_slots(idx.masked_fill(idx == n, -1))

    def _remove_one(self, victims: torch.Tensor) -> None:
        """Remove the entry ``victims`` [B, H', 1] from every row and head: the last slot moves into its place."""
        last = self.n - 1
        if not self.packed:
            for i, store in enumerate(self.stores):
                store.remove(victims[:, i if victims.shape[1] > 1 else 0, 0])
            return
        adopted = adopted_extras(self.layer)
        index = {}  # the scatter index for each trailing shape (keys and values share one, per-slot arrays another)
        for buf in [*self.layer.buffers.values(), *adopted.values()]:
            idx = index.get(buf.shape[3:])
            if idx is None:
                idx = index[buf.shape[3:]] = victims.view(*victims.shape, *([1] * (buf.dim() - 3))).expand(
                    *victims.shape, *buf.shape[3:])
            buf.scatter_(2, idx, buf[:, :, last : last + 1].clone())
        for i, store in enumerate(self.stores):
            for name, t in store.extras.items():  # extras that are not views of a layer buffer
                if name not in adopted:
                    rows = torch.arange(t.shape[0], device=t.device)
                    t[rows, victims[:, i, 0]] = t[:, last].clone()
            store.n = last


# -- method extras as layer buffers (packed layers) ---------------------------------------------------------------
def adopted_extras(layer) -> dict:
    """The extras that are layer buffers [B, H, cap] whose slices are still the heads' own extras."""
    bufs = layer.__dict__.get("extra_buffers", {})
    return {name: buf for name, buf in bufs.items() if _still_views(layer, name, buf)}


def _still_views(layer, name, buf) -> bool:
    heads = layer.heads
    if buf.shape[1] != len(heads) or buf.shape[2] != layer.buffers["pos"].shape[2]:
        return False
    # head h's slice starts stride(1) elements after head h-1's (pointer arithmetic: no tensor op per head)
    base, step = buf.data_ptr(), buf.stride(1) * buf.element_size()
    return all(name in store.extras and store.extras[name].data_ptr() == base + h * step
               for h, store in enumerate(heads))


def layer_extra(layer, name: str) -> torch.Tensor:
    """The extra ``name`` of every head of a packed layer as one buffer [B, H, cap] (each head's extra a view of it),
    so that scoring and removal are one tensor op for all heads. Rebuilt after the layer re-allocated its buffers."""
    bufs = layer.__dict__.setdefault("extra_buffers", {})
    buf = bufs.get(name)
    if buf is not None and _still_views(layer, name, buf):
        return buf
    heads = layer.heads
    first = heads[0].extras[name]
    cap = layer.buffers["pos"].shape[2]
    buf = first.new_zeros(first.shape[0], len(heads), cap)
    for h, store in enumerate(heads):
        buf[:, h, : store.n] = store.extras[name][:, : store.n]
        with torch.enable_grad():  # as the layer's own buffers: in-place writes allowed with or without no_grad
            store.extras[name] = buf[:, h]
    bufs[name] = buf
    return buf

"""The compressed KV cache: a transformers ``Cache`` whose full-attention layers keep only what a method selects.

Layout
------
Each managed layer (a layer transformers would give a plain ``DynamicLayer``) holds one :class:`HeadStore` per
KV head, so every (layer, KV head) keeps its own number of entries and evicted entries' bytes are released,
not masked. A store holds, for all batch rows, slots ``[0, n)`` of:

* ``keys`` / ``values`` [B, cap, d]   post-RoPE keys and values (original positions baked in),
* ``pos`` [B, cap] int32               original token index of each entry (the cache never renumbers),
* ``mod`` [B, cap] int8                modality id (0 text, 1 image, 2 video, 3 audio),
* ``valid`` [B, cap] bool              False for padding slots (a row that keeps fewer entries than another),
* ``extras`` name -> [B, cap] float32  per-entry method state (e.g. H2O's accumulated attention).

Slots are unordered: a decode-time eviction moves the last slot into the freed one (O(1)), which is exact
because attention over post-RoPE keys does not depend on slot order. ``cap - n`` slots are reserve for
appended tokens; ``memory_report`` gives both the logical bytes (valid entries) and the allocated bytes.

Sliding-window layers (Gemma-3) and any other layer kind are left exactly as transformers built them.

The cache reports the true number of tokens seen (``get_seq_length``), so positions continue correctly in
``generate`` and in hand-written loops, and a second ``generate`` on the same cache works.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from . import attention, pruning
from .budget import Budget, parse_caps
from .decoding import INF, DecodeStep, Extra, adopted_extras
from .modality import TEXT, ModalityLayout, as_modality_ids, detect_modality, special_token_modalities
from .protocol import PrefillContext, Selection  # Selection: also importable from here, as before
from .registry import make_method
from .storage import DENSE, make_storage
from .storage.base import grown

# the core's own per-entry score for decode_budget with decode_policy="attention"
DECODE_ATTENTION = Extra("decode_attention", "attention received over the decode steps (decode_budget's score)")

class HeadStore:
    """The kept entries of one (layer, KV head) for all batch rows (see the module docstring).

    The store owns the per-entry metadata of slots ``[0, n)`` (``pos``, ``mod``, ``valid``, ``extras``) and one
    payload (:mod:`modalkv.storage`) holding the same slots' keys and values in the store's format (dense, KIVI
    codes, Spherical KV codes). Eviction, compaction and batch selection are written once here, for every format.
    """

    growth = 64  # minimum number of slots added when the store is full
    slot_arrays = ("keys", "values", "pos", "mod", "valid")  # dense per-slot tensors a layer may pack (see pack())

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


class CompressedLayer(DynamicLayer):
    """A full-attention layer whose entries live in per-KV-head :class:`HeadStore` objects.

    When the heads are dense stores of (nearly) the same size, their per-slot arrays are views into one layer buffer
    per array (``[B, H, cap, ...]``, :meth:`pack`), so decode attention runs over every head of the layer in one
    batched step (:func:`modalkv.attention.attend_packed`); otherwise each head keeps its own tensors.
    """

    storage = None  # the layer's StorageFormat (modalkv.storage); None: dense entries
    packed = False  # the heads' slot arrays are views into self.buffers (see pack())

    def __init__(self, cache: "KVCache", layer_idx: int, rank: int):
        super().__init__()
        self._cache = weakref.ref(cache)  # no reference cycle: a dropped cache is freed at once, not by the GC
        self.layer_idx = layer_idx
        self.rank = rank  # index among the managed layers
        self.heads: list[HeadStore] | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.seen = 0
        self._row_targets = None  # (prefill kept per head, real prompt length) as ints, for batch 1
        self.returned_key = None  # the key tensor update() last returned (the handshake with the attention function)

    @property
    def cache(self) -> "KVCache":
        cache = self._cache()
        if cache is None:
            raise RuntimeError("this cache layer's KVCache no longer exists")
        return cache

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        return self.cache.croppable

    # -- transformers layer contract ---------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-1] != value_states.shape[-1] and self.heads is None and key_states.dim() != 4:
            raise ValueError("modalkv supports key/value states shaped [batch, kv_heads, tokens, head_dim]")
        stale = attention.take_unread()
        if stale is not None and stale._cache() is self._cache():
            # this cache's previous managed layer was updated but never read by modalkv's attention (a stale layer of
            # another cache is harmless: the attention function only takes the key tensor its update returned)
            raise RuntimeError(
                f"layer {stale.layer_idx} of a modalkv KVCache was updated but its attention did not go through "
                "modalkv's attention function, so it attended only to the new tokens: the cache was passed to a "
                "model it was not built for, or the model's attention implementation was changed after the cache "
                "was built (build the KVCache after set_attn_implementation, with the model that uses it)"
            )
        if self.rank == 0:
            self.cache.check_model()
        q = key_states.shape[-2]
        if self.heads is None:
            self.pending = (key_states, value_states)  # compressed by the attention function after attending
            if self.rank == 0:
                pruning.finish(self.cache)  # a new prompt forward: no pruning state left from an earlier one
            if pruning.active(self.cache, q):  # a pruned prompt forward: the layer still saw the whole prompt
                q = self.cache.prune_len
        else:
            if self.packed and self.packed_intact():
                self._append_packed(key_states, value_states)
            else:
                B = key_states.shape[0]
                pos = torch.arange(self.seen, self.seen + q, device=key_states.device, dtype=torch.int32).expand(B, q)
                mod = self.cache.modality_slice(self.seen, q, B, key_states.device)
                for h, store in enumerate(self.heads):
                    store.append(key_states[:, h], value_states[:, h], pos, mod, True)
        self.seen += q
        attention.hand_over(self, key_states)
        return key_states, value_states

    def _append_packed(self, keys, values) -> None:
        """Append q entries to every head of a packed layer: one write per buffer when the heads hold the same
        number of entries."""
        heads, (B, _, q, _) = self.heads, keys.shape
        n = heads[0].n
        cap = self.buffers["pos"].shape[2]
        need = max(st.n for st in heads) + q
        if need > cap:
            self._rebuffer(max(need, cap + max(HeadStore.growth, cap // 8)))
        b = self.buffers
        if any(st.n != n for st in heads):
            pos = torch.arange(self.seen, self.seen + q, device=keys.device, dtype=torch.int32).expand(B, q)
            mod = self.cache.modality_slice(self.seen, q, B, keys.device)
            for h, st in enumerate(heads):
                st.append(keys[:, h], values[:, h], pos, mod, True)
            return
        b["keys"][:, :, n : n + q] = keys
        b["values"][:, :, n : n + q] = values
        b["pos"][:, :, n : n + q] = torch.arange(self.seen, self.seen + q, device=keys.device, dtype=torch.int32)
        if self.cache._modality is None:
            b["mod"][:, :, n : n + q] = TEXT
        else:
            b["mod"][:, :, n : n + q] = self.cache.modality_slice(self.seen, q, B, keys.device)[:, None]
        b["valid"][:, :, n : n + q] = True
        adopted = adopted_extras(self)  # extras held as one layer buffer: one write for every head
        for buf in adopted.values():
            buf[:, :, n : n + q] = 0.0
        for st in heads:
            for name, t in st.extras.items():
                if name not in adopted:
                    t[:, n : n + q] = 0.0
            st.n = n + q

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask transformers builds covers only the new tokens (causality and padding among themselves);
        # stored entries are masked by the stores' own validity flags (transformers' 2-D padding mask cannot
        # be indexed correctly once entries are evicted).
        return query_length, self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.heads = None
        self.pending = None
        self.seen = 0
        self.is_initialized = False
        self.returned_key = None
        self._row_targets = None
        self.packed = False
        self.buffers = {}

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count), as assisted
        and prompt-lookup decoding do after rejecting draft tokens.

        Defined only while those tokens' entries are all still stored, in order, at the end of every head store
        (caches whose method neither evicts nor rescores while decoding: ``KVCache.croppable``); otherwise a
        ValueError says why. Cropping into the prompt works only if the prefill kept the whole prompt: a compressed
        prompt was selected with the removed tokens among its queries. (``generate(prompt_lookup_num_tokens=...)``
        feeds draft tokens with the prompt; with a compressing method, prefill the context first, then generate.)
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove (got {tokens_to_remove})")
        count = -int(tokens_to_remove)
        if count == 0 or not self.heads:
            return
        if not self.cache.croppable:
            raise ValueError(f"cannot crop a {self.cache.method.name} cache: {self.cache.not_croppable_reason()}")
        cut = self.seen - count
        from_prompt = max(0, self.prompt_len - cut)
        if from_prompt and not all(bool((k == self.prompt_real).all()) for k in self.prefill_kept):
            raise ValueError(
                f"cannot crop {count} tokens: that reaches into the compressed prompt ({self.prompt_len} tokens, "
                "selected with those tokens among its queries); for assisted or prompt-lookup decoding with a "
                "compressing method, run the context through the model with the cache first, then generate"
            )
        expected = torch.arange(cut, self.seen, dtype=torch.int32, device=self.heads[0].pos.device)
        for store in self.heads:
            tail = store.pos[:, store.n - count : store.n] if store.n >= count else None
            if tail is None or not bool((tail == expected).all()):
                raise ValueError(f"cannot crop {count} tokens: their entries are no longer all stored")
        for store in self.heads:
            store.n -= count
            store.all_valid = bool(store.valid[:, : store.n].all())
        self.seen = cut
        if from_prompt:  # the whole prompt was kept: it simply ends earlier
            self.prompt_len -= from_prompt
            self.prompt_real = self.prompt_real - from_prompt
            self.prefill_kept = [k - from_prompt for k in self.prefill_kept]
            self._row_targets = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    # -- the packed layout ---------------------------------------------------------------------------------
    def pack(self) -> None:
        """Move the dense head stores' per-slot arrays into one buffer per array, ``[B, H, cap, ...]``, each head a
        view of its slice, so that decode attention is one batched step for all heads.

        CHOICE: only when the heads keep nearly the same number of entries (the padding to the largest head is at
        most 1/16 of what they hold): a ragged layer (Ada-KV, MadaKV) keeps per-head tensors, so the memory a head
        gives up stays released, and attends head by head.
        """
        heads = self.heads
        if not heads or not all(st.payload.packable for st in heads):
            return
        sizes = [st.n for st in heads]
        if (max(sizes) * len(sizes) - sum(sizes)) * 16 > max(sum(sizes), 1):
            return
        self._rebuffer(max(st.pos.shape[1] for st in heads))

    def _rebuffer(self, cap: int) -> None:
        """(Re)allocate the layer buffers with ``cap`` slots per head and point every head store at its slice."""
        heads = self.heads
        self.buffers = {}
        for name in HeadStore.slot_arrays:
            first = getattr(heads[0], name)
            buf = first.new_zeros(first.shape[0], len(heads), cap, *first.shape[2:])
            for h, st in enumerate(heads):
                buf[:, h, : st.n] = getattr(st, name)[:, : st.n].detach()
                # views made with grad mode on (the buffers never require grad), so that later in-place writes are
                # allowed whether or not they run under no_grad
                with torch.enable_grad():
                    setattr(st, name, buf[:, h])
            self.buffers[name] = buf
        self._view_ptrs = [(st.keys.data_ptr(), st.values.data_ptr(), st.valid.data_ptr()) for st in heads]
        for st in heads:  # method extras stay per head, at the same capacity
            for name, t in list(st.extras.items()):
                if t.shape[1] != cap:
                    grown = t.new_zeros(t.shape[0], cap)
                    grown[:, : st.n] = t[:, : st.n]
                    st.extras[name] = grown
        self.packed = True

    def packed_intact(self) -> bool:
        """Are the head stores still views of the layer buffers (no store re-allocated its own tensors)?"""
        if not self.packed:
            return False
        for st, ptrs in zip(self.heads, self._view_ptrs):
            if (st.keys.data_ptr(), st.values.data_ptr(), st.valid.data_ptr()) != ptrs:
                self.packed = False
                return False
        return True

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for store in self.heads or []:
            store.select_batch(indices.to(store.pos.device))
        if self.packed:  # the stores now hold their own tensors: pack them again
            self.packed = False
            self.pack()
        if self.heads:
            index = indices.to(self.prompt_real.device)
            self.prompt_real = self.prompt_real.index_select(0, index)
            self.prefill_kept = [k.index_select(0, index) for k in self.prefill_kept]
            self._row_targets = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.heads:
            B = self.heads[0].batch
            index = torch.arange(B, device=self.heads[0].pos.device).repeat_interleave(repeats)
            self.batch_select_indices(index)

    @property
    def keys(self):  # read-only dense view for code that inspects layer.keys (padding slots included)
        if not self.heads:
            return None
        n = max(s.n for s in self.heads)
        if any(s.n != n for s in self.heads):
            raise RuntimeError("heads keep different numbers of entries; read layer.heads[h].kv() instead")
        return torch.stack([s.kv()[0] for s in self.heads], 1)

    @keys.setter
    def keys(self, value):  # DynamicLayer.__init__ / reset assign it; storage lives in the head stores
        pass

    @property
    def values(self):
        if not self.heads:
            return None
        return torch.stack([s.kv()[1] for s in self.heads], 1)

    @values.setter
    def values(self, value):
        pass

    # -- compression --------------------------------------------------------------------------------------
    def compress_prefill(self, query, keys, values, real, scaling) -> None:
        """Ask the method which prompt entries to keep and store only those."""
        cache = self.cache
        B, H, n, _ = keys.shape
        pruned = pruning.active(cache, n)
        full_len = cache.prune_len if pruned else n
        start = self.seen - full_len
        modality = cache.modality_slice(start, full_len, B, keys.device)
        if pruned:  # this layer ran on the kept tokens only (pruning.py): original positions, full-prompt budget
            positions = cache.prune_index + start
            modality = modality.gather(1, cache.prune_index)
            n_real = cache.prune_real
        else:
            positions = torch.arange(start, self.seen, device=keys.device)
            n_real = real.sum(-1)
        ctx = PrefillContext(
            layer=self, query=query, keys=keys, values=values, scaling=scaling, real=real,
            modality=modality, positions=positions, n_real=n_real,
            budget_tokens=cache.budget.tokens(n_real), caps=cache.budget.caps(modality, real),
        )
        sel = cache.method.prefill(ctx)
        pos_rows = positions.expand(B, n) if positions.dim() == 1 else positions
        if sel.keys is not None:
            keys, values = sel.keys, sel.values
        heads = []
        for h in range(H):
            idx = sel.head(h).to(keys.device)
            if idx.shape[-1] > n:
                raise ValueError(f"{cache.method.name}: selected {idx.shape[-1]} entries from a {n}-token prompt")
            ok = idx >= 0
            width = int(ok.sum(-1).max()) if idx.numel() else 0
            if width < idx.shape[-1]:  # unused trailing columns (this head keeps fewer): free them
                idx, ok = idx[:, :width], ok[:, :width]
            safe = idx.clamp(min=0)
            gidx = safe[..., None]
            k_h = keys[:, h].gather(1, gidx.expand(-1, -1, keys.shape[-1]))
            v_h = values[:, h].gather(1, gidx.expand(-1, -1, values.shape[-1]))
            extras = {name: t[:, h].float().gather(1, safe) for name, t in sel.extras.items()}
            valid = ok & real.gather(1, safe)
            heads.append(
                HeadStore(
                    k_h, v_h, pos_rows.gather(1, safe).to(torch.int32), modality.gather(1, safe), valid, extras,
                    reserve=cache.reserve, storage=self.storage,
                )
            )
        self.heads = heads
        self.prompt_len = full_len
        self.prompt_real = n_real.to(keys.device)
        if self.rank == cache.num_managed - 1:
            pruning.finish(cache)
        self.prefill_kept = [store.valid[:, : store.n].sum(-1) for store in heads]
        self._row_targets = None
        self.packed = False
        self.pack()
        cache.method.after_prefill(self)

    def decode_targets(self, h: int) -> torch.Tensor:
        """Per-row number of valid entries a decode-time evicting method may keep in head ``h`` now ([B])."""
        generated = self.seen - self.prompt_len
        return self.cache.budget.decode_targets(self.prefill_kept[h], self.prompt_real + generated, self.prompt_real)

    def over_budget(self, h: int):
        """Entries head ``h`` holds beyond its decode target: a Python int for one sequence whose store has no holes
        (the common decode step, decided without a device round trip), else a LongTensor [B] (clamped at 0)."""
        store = self.heads[h]
        if store.batch == 1 and store.all_valid:
            if self._row_targets is None:
                self._row_targets = ([int(k) for k in self.prefill_kept], int(self.prompt_real[0]))
            kept, real = self._row_targets
            return store.n - self.cache.budget.decode_target(kept[h], real + self.seen - self.prompt_len, real)
        return (store.valid[:, : store.n].sum(-1) - self.decode_targets(h)).clamp(min=0)

    def enforce_decode_budget(self, step) -> None:
        """Evict down to ``decode_budget`` entries per (row, KV head) for a method that keeps every generated token
        (``KVCache.decode_policy``: least decode-time attention outside the recent half, or oldest after 4 sinks),
        through the one eviction routine (:mod:`modalkv.decoding`); the method's ``on_core_evict`` sees the victims
        first (LOOK-M merges them into kept entries). ``step``: a
        :class:`~modalkv.decoding.DecodeStep`, or the step's attention rows per KV head ([B, G, q, n] each)."""
        if not isinstance(step, DecodeStep):
            step = DecodeStep(self, step)
        cap = self.cache.budget.decode
        by_attention = self.cache.decode_policy == "attention"
        on_evict = self.cache.method.on_core_evict
        for g in step.groups():
            if by_attention:
                g.extra(DECODE_ATTENTION.name).add_(g.received("sum"))
            if g.n <= cap:
                continue
            over = g.n - cap if g.batch == 1 and g.all_valid else (g.valid.sum(-1) - cap).clamp(min=0)
            if by_attention:
                g.evict(g.extra(DECODE_ATTENTION.name).masked_fill(g.newer_than(cap // 2), INF), over,
                        on_evict=on_evict)
            else:
                g.evict(g.pos.float(), over, skip=min(4, cap - 1), on_evict=on_evict)

    def budget_entries(self) -> int:
        """Valid entries over all heads and rows."""
        return sum(s.count() for s in self.heads or [])


class KVCache(Cache):
    """A transformers cache that compresses the KV cache with a modalkv method.

    Parameters
    ----------
    model : PreTrainedModel
        The model the cache is for. Its attention implementation is switched to modalkv's (``sdpa`` becomes
        ``modalkv_sdpa``, ``eager`` becomes ``modalkv_eager``); layers without a modalkv cache keep behaving as
        before.
    method : str or Method
        A name from :func:`modalkv.available_methods` or a method instance.
    budget : float | int
        Prompt budget per (layer, KV head): a ratio in (0, 1] or an absolute token count.
    modality_caps : dict, optional
        Per-modality caps, e.g. ``{"image": 0.1}``.
    quantize : str or Quantizer, optional
        Quantized storage for kept entries (``"kivi-2"``, ``"kivi-4"``, ``"kivi-8"`` or a ``KIVI`` instance);
        composes with any eviction method.
    decode_budget : int, optional
        A bound on the entries each (layer, KV head) holds while decoding, whatever the method. Methods that evict
        while decoding (H2O, StreamingLLM, HAE, RetentiveKV, Spherical KV) evict with their own scores down to it;
        for the others (the papers keep every generated token) the cache evicts by ``decode_policy``. None (the
        default): each method's own decode behaviour (see ``docs/decoding.md``).
    decode_policy : "attention" | "recent"
        CHOICE, used with ``decode_budget`` for methods that do not evict while decoding: ``"attention"`` evicts the
        entry with the least attention accumulated over the decode steps, outside a protected recent half (H2O's
        rule, with decode-time scores only); ``"recent"`` evicts the oldest entry after 4 attention sinks.
    reserve : int
        Slots reserved per store after prefill for appended tokens (grows by at least 64 when full).
    **params
        Parameters of the method's dataclass.

    A cache belongs to the model it was built for: a forward of another model, or of this model after its attention
    implementation changed, raises instead of attending to the new tokens only. Caches are not picklable; save one
    with :func:`modalkv.save_cache`.
    """

    def __init__(self, model, method="full", budget: float | int = 1.0, *, modality_caps: dict | str | None = None,
                 quantize=None, decode_budget: int | None = None, decode_policy: str = "attention",
                 reserve: int = 64, **params):
        self.method = make_method(method, **params)
        if isinstance(modality_caps, str):
            modality_caps = parse_caps(modality_caps)
        elif modality_caps is not None and not isinstance(modality_caps, dict):
            raise TypeError(f"modality_caps must be a dict like {{'image': 0.1}} or a string like 'image=0.1', "
                            f"got {type(modality_caps).__name__}")
        if decode_budget is not None:
            if isinstance(decode_budget, bool) or not isinstance(decode_budget, int) or decode_budget < 1:
                raise ValueError(f"decode_budget must be a positive int (entries per layer and KV head) or None, "
                                 f"got {decode_budget!r}")
        if decode_policy not in ("attention", "recent"):
            raise ValueError(f"decode_policy must be 'attention' or 'recent', got {decode_policy!r}")
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise ValueError(f"reserve must be an int >= 0, got {reserve!r}")
        self.budget = Budget(budget, dict(modality_caps or {}), decode_budget)
        self.decode_policy = decode_policy
        self.reserve = reserve
        self.quantizer = make_storage(quantize)
        self.method.check_budget(self.budget)
        # decode_budget for a method that does not evict while decoding: the cache evicts by decode_policy
        self.core_decode_eviction = (
            decode_policy if decode_budget is not None and not self.method.evicts_while_decoding else None
        )
        config = model.config.get_text_config(decoder=True)
        attention.check_supported(config)
        base = DynamicCache(config=config)
        layers, rank = [], 0
        for i, layer in enumerate(base.layers):
            if type(layer) is DynamicLayer:
                managed = CompressedLayer(self, i, rank)
                own = self.method.storage()
                if own is not None and self.quantizer is not None:
                    raise ValueError(f"{self.method.name} stores its own entry format; it cannot be combined with "
                                     f"quantize={quantize!r}")
                managed.storage = own if own is not None else self.quantizer
                layers.append(managed)
                rank += 1
            else:
                layers.append(layer)
        if rank == 0:
            kinds = sorted({type(layer).__name__ for layer in base.layers})
            raise ValueError(
                f"{type(model).__name__} has no full-attention KV layers modalkv can manage (layer kinds: {kinds})"
            )
        super().__init__(layers=layers)
        self.num_managed = rank
        self.config = config
        self._modality: torch.Tensor | None = None
        self.layout = None  # a ModalityLayout (visual grid coordinates) when set_modality was given one
        self.prune_index: torch.Tensor | None = None  # set during a pruned prompt forward (see pruning.py)
        self.prune_len = 0
        self.prune_real: torch.Tensor | None = None
        self.context_ids: torch.Tensor | None = None  # the token ids modalkv.prefill ran through the cache
        self.model_ref = weakref.ref(model)
        self.model_name = f"{type(model).__name__} {getattr(config, 'name_or_path', '') or config.model_type}".strip()
        self.module_ids = frozenset(id(m) for m in model.modules())
        attention.install(model)
        _install_modality_hook(model)
        self.method.setup(self)

    # -- the model the cache belongs to ----------------------------------------------------------------------
    def check_model(self) -> None:
        """Raise unless the model this cache was built for still exists and still routes attention through
        modalkv (called at the start of every forward)."""
        model = self.model_ref()
        if model is None:
            raise RuntimeError("the model this KVCache was built for no longer exists")
        text = getattr(model.config, "text_config", None)
        impl = (text if text is not None else model.config)._attn_implementation
        if impl not in attention.NAMES:
            raise RuntimeError(
                f"the model's attention implementation is {impl!r}, not modalkv's: it was changed after this "
                "KVCache was built (set_attn_implementation); build the cache after changing the implementation"
            )

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"layer {layer_idx} is beyond this KVCache's {len(self.layers)} layers: the cache was built for "
                f"another model ({self.model_name})"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def croppable(self) -> bool:
        """Can ``crop`` remove the last tokens exactly? (see :meth:`not_croppable_reason`)"""
        return self.not_croppable_reason() is None

    def not_croppable_reason(self) -> str | None:
        m = self.method
        if m.decodes or m.needs_decode_probs or m.has_readout:
            return "the method rescores or evicts entries while decoding, so removed tokens leave a trace"
        if m.storage() is not None or self.quantizer is not None:
            return "its entries are stored compressed while decoding"
        if self.budget.decode is not None:
            return "decode_budget evicts entries while decoding"
        return None

    def reset(self) -> None:
        """Empty the cache for a new prompt: entries, modality ids and method state all go."""
        super().reset()
        self._modality = None
        self.layout = None
        self.prune_index = None
        self.prune_len = 0
        self.prune_real = None
        self.context_ids = None
        self.method.reset(self)

    # -- saving: not by pickle -------------------------------------------------------------------------------
    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a modalkv KVCache cannot be pickled or torch.save()d (it is bound to its model); save it with "
            "modalkv.save_cache(cache, path) and load it with modalkv.load_cache(path, model)"
        )

    def fork(self) -> "KVCache":
        """An independent copy of this cache (only the kept bytes are copied): answer a question from a compressed
        context without changing it (see :func:`modalkv.prefill`)."""
        return copy.deepcopy(self)

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, copy.deepcopy(value, memo))
        for layer in new.managed_layers:
            layer._cache = weakref.ref(new)
        new.method.cache = new
        return new

    # -- batch operations (beam search, batch replication) ---------------------------------------------------
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices`` (in that order) everywhere: the head stores, the cache's per-row ids and
        the method's per-row state (:meth:`~modalkv.methods.base.Method.select_batch`)."""
        super().batch_select_indices(indices)
        self._select_rows(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.batch_size
        if batch is None:
            return
        self.batch_select_indices(torch.arange(batch).repeat_interleave(repeats))

    @property
    def batch_size(self) -> int | None:
        """Rows the cache holds (None before the first forward)."""
        for layer in self.managed_layers:
            if layer.heads:
                return layer.heads[0].batch
        return None

    def _select_rows(self, index: torch.Tensor) -> None:
        for name in ("_modality", "prune_index", "prune_real", "context_ids"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))
        if self.layout is not None:
            self.layout = self.layout.select_rows(index)
        self.method.select_batch(index)

    # -- modality -------------------------------------------------------------------------------------------
    def set_modality(self, mm_token_type_ids) -> None:
        """Give the cache the per-token modality ids of the prompt (``mm_token_type_ids``: [B, n]), or a
        :class:`~modalkv.modality.ModalityLayout` (ids plus visual grid coordinates, used by spatial methods)."""
        self.layout = mm_token_type_ids if isinstance(mm_token_type_ids, ModalityLayout) else None
        ids = self.layout.ids if self.layout is not None else torch.as_tensor(mm_token_type_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        self._modality = as_modality_ids(ids, ids.shape[0], ids.shape[1], ids.device)

    def modality_slice(self, start: int, length: int, batch: int, device) -> torch.Tensor:
        """Modality ids [B, length] of tokens start..start+length (tokens beyond the given ids are text)."""
        out = torch.full((batch, length), TEXT, dtype=torch.int8, device=device)
        if self._modality is not None:
            m = self._modality.to(device)
            if m.shape[0] != batch:
                raise ValueError(f"modality ids are for batch {m.shape[0]} but the input has batch {batch}")
            stop = min(start + length, m.shape[1])
            if stop > start:
                out[:, : stop - start] = m[:, start:stop]
        return out

    # -- accounting -----------------------------------------------------------------------------------------
    @property
    def managed_layers(self) -> list[CompressedLayer]:
        return [layer for layer in self.layers if isinstance(layer, CompressedLayer)]

    def memory_report(self) -> dict[str, Any]:
        """Bytes of the cache as stored now, against what a transformers ``DynamicCache`` would hold.

        ``full_bytes``: K+V bytes of a full cache for the tokens seen (padding included, as transformers stores it).
        ``kept_bytes``: logical bytes of the valid kept entries: K/V payload (``payload_bytes``) plus per-entry
        metadata (``meta_bytes``: positions, modality ids, validity, method scores, quantisation scales) plus
        per-sequence method state outside the entries (``state_bytes``: RetentiveKV's state-space memories).
        ``shared_bytes``: model-level constants of the method shared by every sequence (Spherical KV's codebooks),
        not in ``kept_bytes``.
        ``allocated_bytes``: every tensor the cache holds, reserve slots and padding included.
        ``compression_ratio`` = full_bytes / kept_bytes. Unmanaged layers (sliding windows) count in all three.
        """
        full = payload = meta = allocated = entries = state = 0
        slots = 0
        seen = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                seen = max(seen, layer.seen)
                if layer.heads:
                    state += self.method.state_bytes(layer)
                for store in layer.heads or []:
                    b = store.bytes()
                    payload += b["payload"]
                    meta += b["meta"]
                    allocated += b["allocated"]
                    entries += store.count()
                    full += store.batch * layer.seen * store.dense_bytes_per_entry()
                    slots += store.batch
            elif getattr(layer, "is_initialized", False) and getattr(layer, "keys", None) is not None:
                nbytes = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                full += nbytes
                payload += nbytes
                allocated += nbytes
        kept = payload + meta + state
        return {
            "full_bytes": full,
            "kept_bytes": kept,
            "payload_bytes": payload,
            "meta_bytes": meta,
            "state_bytes": state,
            "shared_bytes": self.method.shared_bytes(),
            "allocated_bytes": allocated + state,
            "compression_ratio": (full / kept) if kept else float("inf"),
            "tokens_seen": seen,
            "tokens_kept": (entries / slots) if slots else 0.0,
            "entries_kept": entries,
        }

    def __repr__(self) -> str:
        return f"KVCache(method={self.method!r}, budget={self.budget.value!r}, layers={len(self.layers)})"



def _modality_pre_hook(module, args, kwargs):
    """Give a fresh KVCache the prompt's modality ids from the forward's own inputs (pipelines, plain generate), unless
    they were set explicitly (``set_modality``)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, KVCache) or cache._modality is not None or cache.get_seq_length() > 0:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        cache.set_modality(detect_modality(module.config, ids, kwargs.get("mm_token_type_ids"),
                                           kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw")))
    return None


def _install_modality_hook(model) -> None:
    """Once per vision-language model: detect modality ids at the prompt forward (see :func:`_modality_pre_hook`)."""
    if getattr(model, "_modalkv_modality_hook", False) or not special_token_modalities(model.config):
        return
    model.register_forward_pre_hook(_modality_pre_hook, with_kwargs=True)
    model._modalkv_modality_hook = True


def cache_kwargs(model, cache) -> dict[str, Any]:
    """``{"cache": cache}`` on transformers versions whose models take ``cache=``, else ``{"past_key_values": cache}``.

    transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns); 5.5 only knows the old one.
    Works for both ``model(...)`` and ``model.generate(...)``.
    """
    params = inspect.signature(type(model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}

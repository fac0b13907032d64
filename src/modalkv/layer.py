"""A managed cache layer: a full-attention layer whose entries live in one :class:`~modalkv.store.HeadStore` per KV
head, so every (layer, KV head) keeps its own number of entries and evicted entries' bytes are released, not masked.

The layer takes the prompt's keys and values in ``update``, hands itself to modalkv's attention function
(:func:`modalkv.attention.hand_over`), and after the prompt attended asks the method which entries to keep
(:meth:`CompressedLayer.compress_prefill`). Later tokens are appended to every head store; the cache's own
``decode_budget`` eviction is :meth:`CompressedLayer.enforce_decode_budget`.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import attention, pruning
from .decoding import INF, DecodeStep, Extra, adopted_extras, layer_extra
from .modality import TEXT
from .protocol import PrefillContext
from .store import HeadStore

# the core's own per-entry score for decode_budget with decode_policy="attention"
DECODE_ATTENTION = Extra("decode_attention", "attention received over the decode steps (decode_budget's score)")


class CompressedLayer(DynamicLayer):
    """A full-attention layer whose entries live in per-KV-head :class:`HeadStore` objects.

    When the heads are dense stores of (nearly) the same size, their per-slot arrays are views into one layer buffer
    per array (``[B, H, cap, ...]``, :meth:`pack`), so decode attention runs over every head of the layer in one
    batched step (:func:`modalkv.attention.attend_packed`); otherwise each head keeps its own tensors.
    """

    storage = None  # the layer's StorageFormat (modalkv.storage); None: dense entries
    packed = False  # the heads' slot arrays are views into self.buffers (see pack())
    coded = None  # a KIVILayer when the heads' coded payloads and metadata are packed (see pack_coded())

    def __init__(self, cache: Cache, layer_idx: int, rank: int):
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
    def cache(self) -> Cache:
        """The :class:`~modalkv.cache.KVCache` this layer belongs to (held weakly)."""
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
            elif self._coded_ready(q):
                self._append_coded(key_states, value_states)
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
        need = max(store.n for store in heads) + q
        if need > cap:
            self._rebuffer(max(need, cap + max(HeadStore.growth, cap // 8)))
        b = self.buffers
        if any(store.n != n for store in heads):
            pos = torch.arange(self.seen, self.seen + q, device=keys.device, dtype=torch.int32).expand(B, q)
            mod = self.cache.modality_slice(self.seen, q, B, keys.device)
            for h, store in enumerate(heads):
                store.append(keys[:, h], values[:, h], pos, mod, True)
            return
        b["keys"][:, :, n : n + q] = keys
        b["values"][:, :, n : n + q] = values
        self._append_meta(n, q, B, keys.device)

    def _append_meta(self, n: int, q: int, B: int, device) -> None:
        """Write the metadata of q new entries at slots [n, n + q) of every head (one write per layer buffer) and
        count them."""
        heads, b = self.heads, self.buffers
        b["pos"][:, :, n : n + q] = torch.arange(self.seen, self.seen + q, device=device, dtype=torch.int32)
        if self.cache._modality is None:
            b["mod"][:, :, n : n + q] = TEXT
        else:
            b["mod"][:, :, n : n + q] = self.cache.modality_slice(self.seen, q, B, device)[:, None]
        b["valid"][:, :, n : n + q] = True
        adopted = adopted_extras(self)  # extras held as one layer buffer: one write for every head
        for buf in adopted.values():
            buf[:, :, n : n + q] = 0.0
        for store in heads:
            for name, t in store.extras.items():
                if name not in adopted:
                    t[:, n : n + q] = 0.0
            store.n = n + q

    def _coded_ready(self, q: int) -> bool:
        """Can this layer append q tokens with the coded layer-level append (:meth:`_append_coded`)? A Spherical KV
        layer whose packing a re-allocation ended packs again here (its heads' layouts are rewritten in place, so
        this is rare)."""
        if self.coded is not None and self.coded_intact():
            return q == 1 or not self.coded.ragged
        if q == 1 and self.heads and getattr(self.heads[0].payload, "repacks", False):
            self.pack_coded()
            return self.coded is not None
        return False

    def _append_coded(self, keys, values) -> None:
        """Append q entries to every head of a layer whose coded payloads are packed (:meth:`pack_coded`): the
        payloads' layer-level append and one metadata write per layer buffer (each head at its own slot when the
        heads hold different numbers of entries: Spherical KV, one token)."""
        B, _, q, _ = keys.shape
        sizes = [store.n for store in self.heads]
        cap = self.buffers["pos"].shape[2]
        if max(sizes) + q > cap:
            self._rebuffer(max(max(sizes) + q, cap + max(HeadStore.growth, cap // 8)), HeadStore.meta_arrays)
            self._adopt_extras()
        if self.coded.ragged:
            self.coded.append(keys, values, sizes)
            self._append_meta_ragged(sizes, B, keys.device)
        else:
            self.coded.append(keys, values, sizes[0])
            self._append_meta(sizes[0], q, B, keys.device)

    def _append_meta_ragged(self, sizes: list[int], B: int, device) -> None:
        """Write the metadata of one new entry at slot ``sizes[h]`` of every head h (one indexed write per layer
        buffer) and count it."""
        b, heads = self.buffers, self.coded.heads
        slot = torch.tensor(sizes, device=device)
        b["pos"][:, heads, slot] = self.seen
        if self.cache._modality is None:
            b["mod"][:, heads, slot] = TEXT
        else:
            b["mod"][:, heads, slot] = self.cache.modality_slice(self.seen, 1, B, device)
        b["valid"][:, heads, slot] = True
        adopted = adopted_extras(self)
        for buf in adopted.values():
            buf[:, heads, slot] = 0.0
        for store in self.heads:
            for name, t in store.extras.items():
                if name not in adopted:
                    t[:, store.n] = 0.0
            store.n += 1

    def _adopt_extras(self) -> None:
        """Hold every method extra the heads share as one layer buffer (zeroed once per buffer on append)."""
        for name in self.heads[0].extras:
            if all(name in store.extras for store in self.heads):
                layer_extra(self, name)

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
        self.coded = None
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
        self.coded = None
        if heads and not all(store.payload.packable for store in heads):
            self.pack_coded()
            return
        if not heads:
            return
        sizes = [store.n for store in heads]
        if (max(sizes) * len(sizes) - sum(sizes)) * 16 > max(sum(sizes), 1):
            return
        self._rebuffer(max(store.pos.shape[1] for store in heads))

    def pack_coded(self) -> None:
        """Pack a coded layer: the metadata into layer buffers ``[B, H, cap]`` (as :meth:`pack`; method extras too),
        the payloads' per-step parts into their layer buffers, so that appending a token is one write per buffer
        whatever the number of heads. KIVI (:class:`~modalkv.storage.kivi.KIVILayer`: residuals and codes) when the
        heads hold the same number of entries and quantized slots; Spherical KV
        (:class:`~modalkv.storage.spherical.SphericalLayer`: values and dense tails) whatever their sizes."""
        from .storage.kivi import KIVILayer, KIVIPayload
        from .storage.spherical import SphericalLayer, SphericalPayload

        heads = self.heads
        first = heads[0].payload
        self.coded = None
        if all(type(st.payload) is KIVIPayload and st.payload.format == first.format and st.n == heads[0].n
               and st.payload.nq == first.nq for st in heads):
            self._rebuffer(max(store.pos.shape[1] for store in heads), HeadStore.meta_arrays)
            self.coded = KIVILayer([st.payload for st in heads], heads[0].n)
        elif all(type(st.payload) is SphericalPayload for st in heads):
            self._rebuffer(max(store.pos.shape[1] for store in heads), HeadStore.meta_arrays)
            self._adopt_extras()
            self.coded = SphericalLayer([st.payload for st in heads])

    def coded_intact(self) -> bool:
        """Are the heads of a coded-packed layer still views of its buffers, holding the same number of entries?"""
        heads = self.heads
        ragged = self.coded.ragged
        for store, ptr in zip(heads, self._view_ptrs):
            if store.valid.data_ptr() != ptr or (store.n != heads[0].n and not ragged):
                self.coded = None
                return False
        if not self.coded.intact():
            self.coded = None
            return False
        return True

    def _rebuffer(self, cap: int, names=HeadStore.slot_arrays) -> None:
        """(Re)allocate the layer buffers of ``names`` with ``cap`` slots per head and point every head store at its
        slice (all per-slot arrays: a packed dense layer; the metadata only: a coded layer)."""
        heads = self.heads
        self.buffers = {}
        for name in names:
            first = getattr(heads[0], name)
            buf = first.new_zeros(first.shape[0], len(heads), cap, *first.shape[2:])
            for h, store in enumerate(heads):
                buf[:, h, : store.n] = getattr(store, name)[:, : store.n].detach()
                # views made with grad mode on (the buffers never require grad), so that later in-place writes are
                # allowed whether or not they run under no_grad
                with torch.enable_grad():
                    setattr(store, name, buf[:, h])
            self.buffers[name] = buf
        if names != HeadStore.slot_arrays:  # metadata only (a coded layer): not the dense packed step
            self._view_ptrs = [store.valid.data_ptr() for store in heads]
            self._fit_extras(cap)
            return
        self._view_ptrs = [(store.keys.data_ptr(), store.values.data_ptr(), store.valid.data_ptr()) for store in heads]
        self._fit_extras(cap)
        self.packed = True

    def _fit_extras(self, cap: int) -> None:
        heads = self.heads
        for store in heads:  # method extras stay per head, at the same capacity
            for name, t in list(store.extras.items()):
                if t.shape[1] != cap:
                    grown = t.new_zeros(t.shape[0], cap)
                    grown[:, : store.n] = t[:, : store.n]
                    store.extras[name] = grown

    def packed_intact(self) -> bool:
        """Are the head stores still views of the layer buffers (no store re-allocated its own tensors)?"""
        if not self.packed:
            return False
        for store, ptrs in zip(self.heads, self._view_ptrs):
            if (store.keys.data_ptr(), store.values.data_ptr(), store.valid.data_ptr()) != ptrs:
                self.packed = False
                return False
        return True

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for store in self.heads or []:
            store.select_batch(indices.to(store.pos.device))
        if self.packed or self.coded is not None:  # the stores now hold their own tensors: pack them again
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

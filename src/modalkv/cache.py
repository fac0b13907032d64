"""The compressed KV cache: a transformers ``Cache`` whose full-attention layers keep only what a method selects.

Each managed layer (a layer transformers would give a plain ``DynamicLayer``) is a
:class:`~modalkv.layer.CompressedLayer` holding one :class:`~modalkv.store.HeadStore` per KV head, so every
(layer, KV head) keeps its own number of entries and evicted entries' bytes are released, not masked;
``memory_report`` gives both the logical bytes (valid entries) and the allocated bytes.

Sliding-window layers (Gemma-3) and any other layer kind are left exactly as transformers built them.

The cache reports the true number of tokens seen (``get_seq_length``), so positions continue correctly in
``generate`` and in hand-written loops, and a second ``generate`` on the same cache works.

This module holds :class:`KVCache`, :func:`cache_kwargs` and the hook that gives a vision-language model's cache
its prompt's modality ids. The layer and the head store are in :mod:`modalkv.layer` and :mod:`modalkv.store`;
their names (and ``Selection``, :mod:`modalkv.protocol`) can still be imported from here.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from . import attention
from .budget import Budget, parse_caps
from .layer import DECODE_ATTENTION, CompressedLayer
from .modality import TEXT, ModalityLayout, as_modality_ids, detect_modality, special_token_modalities
from .protocol import Selection
from .registry import make_method
from .storage import make_storage
from .store import HeadStore

__all__ = ["KVCache", "cache_kwargs", "CompressedLayer", "HeadStore", "Selection", "DECODE_ATTENTION"]


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

    # -- replaying a captured prefill ----------------------------------------------------------------------
    def load_prefill(self, layers: dict, other_layers: dict, seen: int) -> None:
        """Fill this new cache as its own prefill would have: each managed layer compresses the (query, keys,
        values, real, scaling) captured for it; every other layer (e.g. a sliding window) is a copy of the captured
        one. Used to compress one captured prompt forward with many methods and budgets."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer, CompressedLayer):
                query, keys, values, real, scaling = layers[i]
                layer.lazy_initialization(keys, values)
                layer.seen = seen
                layer.compress_prefill(query, keys, values, real, scaling)
            else:
                self.layers[i] = copy.deepcopy(other_layers[i])

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

"""The method protocol: what a KV-cache compression method implements, and the context it is given.

A method is a dataclass. Its fields are its documented parameters (checked for type on construction); its
class variables say what it needs from the core:

``prefill(ctx) -> Selection``
    Called once per managed layer during the prompt forward, right after the layer attended over the whole
    prompt, with the layer's queries, keys and values (post-RoPE), positions, modality ids, padding mask and
    the per-row budget. Layers arrive in order, so a method may carry decisions from layer l to layer l+1.
``after_prefill(layer)``
    Called once the layer's head stores exist (attach per-entry state, record targets).
``decode(step)``
    Called after every later forward of a layer (decode steps) when ``decodes`` or ``needs_decode_probs`` is true,
    with a :class:`~modalkv.decoding.DecodeStep` (the layer, the step's attention rows when ``needs_decode_probs``).
    A method that evicts scores entries on ``step.groups()`` and calls :meth:`~modalkv.decoding.Group.evict`, the
    one eviction routine (with an ``on_evict`` hook when it needs the evicted entries before they go).
``extras``
    The per-entry float32 values the method keeps beside each stored entry, each declared as a
    :class:`~modalkv.decoding.Extra` (name, meaning, and whether it hides entries from attention).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..decoding import DecodeStep, Extra
from ..protocol import PrefillContext, Selection
from ..scoring import check_finite, select_topk


def last_real(real: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """[B, n] bool: the last ``count`` real tokens of each row (count: int or LongTensor [B])."""
    after = real.flip(-1).cumsum(-1).flip(-1)  # real tokens at or after each index
    count = torch.as_tensor(count, device=real.device).view(-1, 1)
    return real & (after <= count)


def first_real(real: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """[B, n] bool: the first ``count`` real tokens of each row."""
    count = torch.as_tensor(count, device=real.device).view(-1, 1)
    return real & (real.cumsum(-1) <= count)


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


@dataclass
class Method:
    """Base class: keeps every real prompt token (the full cache)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_decode_probs: ClassVar[bool] = False  # decode() wants the attention rows
    decodes: ClassVar[bool] = False  # decode() runs after every decode step
    replayable: ClassVar[bool] = True  # a captured full prefill (modalkv.replay) reproduces this method's cache
    lossy: ClassVar[bool] = False  # kept entries are approximated (codes), so budget 1.0 is not the full cache
    has_readout: ClassVar[bool] = False  # readout() replaces softmax(logits) @ V in decode attention
    evicts_while_decoding: ClassVar[bool] = False  # decode() keeps each head within Budget.decode_targets itself
    needs_context_pass: ClassVar[bool] = False  # finish_prefill() must run after the prompt forward (modalkv.prefill)
    extras: ClassVar[tuple[Extra, ...]] = ()  # per-entry values the method keeps beside each entry

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if not _type_ok(value, hints[f.name]):
                raise TypeError(
                    f"{type(self).__name__}.{f.name} must be {_describe(hints[f.name])}, "
                    f"got {type(value).__name__} {value!r}"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}.{f.name} must be a finite number, got {value}")
        self.validate()

    def validate(self) -> None:
        """Range checks of the parameters (override)."""

    def check_budget(self, budget) -> None:
        """Refuse a :class:`~modalkv.budget.Budget` this method cannot honour, with a clear error (override)."""

    def setup(self, cache) -> None:
        """Called when a cache is built around this method."""
        self.cache = cache

    @property
    def cache(self):
        """The :class:`~modalkv.cache.KVCache` this method serves (held weakly: no reference cycle)."""
        ref = self.__dict__.get("_cache_ref")
        return ref() if ref is not None else None

    @cache.setter
    def cache(self, cache) -> None:
        self.__dict__["_cache_ref"] = weakref.ref(cache) if cache is not None else None

    def finish_prefill(self, cache, model, input_ids, tokenizer=None, select: bool = True, **model_kwargs) -> None:
        """Called by :func:`modalkv.prefill` after the context's forward: methods that need passes of their own over
        the context (``needs_context_pass``, e.g. KVzip's reconstruction) run them here; with ``select=False`` they
        only score, and a later ``select(cache)`` evicts."""

    def reset(self, cache) -> None:
        """Called by ``KVCache.reset()``: forget per-prompt state (override when the method keeps any)."""

    def prefill(self, ctx: PrefillContext) -> Selection:
        scores = torch.zeros(ctx.real.shape[0], ctx.num_kv_heads, ctx.n, device=ctx.keys.device)
        return Selection(select_topk(scores, ctx.n_real, ctx.real))

    def top(self, ctx: PrefillContext, scores: torch.Tensor, k: torch.Tensor, force=None) -> torch.Tensor:
        """Top-k of per-KV-head scores [B, H, n] under the context's padding mask and modality caps."""
        check_finite(scores, self.name or type(self).__name__)
        return select_topk(scores, k, ctx.real, force=force, modality=ctx.modality, caps=ctx.caps)

    def after_prefill(self, layer) -> None:
        pass

    def storage(self):
        """The :class:`~modalkv.storage.StorageFormat` this method's entries are held in (None: dense entries)."""
        return None

    def readout(self, layer, h: int, query: torch.Tensor, logits: torch.Tensor, values: torch.Tensor):
        """Decode attention of head ``h`` when ``has_readout``: query [B, r, d] (scaled), logits [B, r, n] over the
        stored entries (invalid ones -inf), values [B, n, dv] -> (output [B, r, dv], probs [B, r, n])."""
        raise NotImplementedError

    def readout_layer(self, layer, query: torch.Tensor, logits: torch.Tensor, values: torch.Tensor):
        """Decode attention of every KV head of a packed layer at once when ``has_readout``: query [B, H, r, d]
        (scaled), logits [B, H, r, n] (invalid entries -inf), values [B, H, n, dv] -> (output [B, H, r, dv], probs
        [B, H, r, n]). Default: :meth:`readout` head by head; a method overrides it to attend in a fixed number of
        tensor ops whatever the number of heads."""
        pairs = [self.readout(layer, h, query[:, h], logits[:, h], values[:, h]) for h in range(query.shape[1])]
        return torch.stack([o for o, _ in pairs], 1), torch.stack([p for _, p in pairs], 1)

    def state_bytes(self, layer) -> int:
        """Bytes of per-sequence method state of ``layer`` outside the head stores (counted as kept memory)."""
        return 0

    def shared_bytes(self) -> int:
        """Bytes of model-level constants the method needs (codebooks), shared by every sequence."""
        return 0

    def state_dict(self, layer=None) -> dict[str, torch.Tensor]:
        """Per-sequence state outside the head stores that decoding relies on, as named tensors: of ``layer``, or
        with ``layer=None`` the state shared by all layers. :func:`modalkv.save_cache` writes it. Default: none
        (override when the method keeps such state)."""
        return {}

    def load_state_dict(self, layer, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned, on a cache rebuilt by :func:`modalkv.load_cache`: first with
        ``layer=None``, then for each managed layer once its head stores exist."""

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (in that order) of the per-row state this method holds outside the head stores
        (beam search, ``batch_repeat_interleave``); the cache has already done so for the stores. Default: none."""

    def decode(self, step: DecodeStep) -> None:
        pass

    def on_core_evict(self, group, victims: torch.Tensor, use: torch.Tensor | None) -> None:
        """Called by the cache's own ``decode_budget`` eviction (for a method that does not evict while decoding)
        with the entries it is about to evict, while they are still stored: the ``on_evict`` hook of
        :meth:`~modalkv.decoding.Group.evict` (LOOK-M merges them into kept entries). Default: nothing."""


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def check_range(cls_name: str, name: str, value, low=None, high=None, low_open=False) -> None:
    """Raise a ValueError naming the parameter when value is out of range."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{cls_name}.{name} must be a finite number, got {value}")
    bad = (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high)
    if bad:
        lo = "(" if low_open else "["
        raise ValueError(f"{cls_name}.{name} must be in {lo}{low}, {high}], got {value}")

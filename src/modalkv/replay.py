"""One prefill, many caches: compress the same prompt with several methods without re-running the model.

modalkv's prefill attention is exact (every method compresses a layer only after the layer attended over the whole
prompt), so the prompt's forward pass is the same whatever the method. :func:`capture_prefill` runs it once and
keeps each managed layer's queries, keys and values; :meth:`CapturedPrefill.build_cache` then gives, for any
method and budget, the cache that a normal prefill with that method would have produced (tested for equality).
Benchmarks use it to compare many methods and budgets on one long prompt for the price of one prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import KVCache, cache_kwargs
from .layer import CompressedLayer
from .methods.full import Full
from .modality import detect_modality, special_token_modalities
from .protocol import Selection


class _Capture(Full):
    """Keeps everything and records each layer's prefill tensors (internal)."""

    name = "capture"

    def prefill(self, ctx):
        self.captured[ctx.layer.layer_idx] = (ctx.query, ctx.keys, ctx.values, ctx.real, ctx.scaling)
        B, H = ctx.keys.shape[:2]
        return Selection(torch.empty(B, H, 0, dtype=torch.long, device=ctx.keys.device))  # store nothing twice


@dataclass
class CapturedPrefill:
    """The outcome of one prompt forward: its logits and what each managed layer saw."""

    logits: torch.Tensor  # [B, n, V] (the last position's only, to save memory)
    layers: dict  # layer_idx -> (query, keys, values, real, scaling)
    other_layers: dict = field(default_factory=dict)  # layer_idx -> transformers layer (sliding windows)
    seen: int = 0
    modality: torch.Tensor | None = None
    layout: object = None  # the prompt's ModalityLayout (visual grid coordinates) for a VLM
    hidden_states: tuple | None = None  # every layer's hidden states, when asked with output_hidden_states=True

    def build_cache(self, model, method="full", budget: float | int = 1.0, **kwargs) -> KVCache:
        """The cache a prefill with ``method`` at ``budget`` would leave (kwargs as for :class:`KVCache`)."""
        cache = KVCache(model, method, budget, **kwargs)
        if not cache.method.replayable and self.modality is not None and bool((self.modality != 0).any()):
            raise ValueError(
                f"{cache.method.name}: this configuration changes the prompt forward itself (e.g. HAE mode='prune' "
                "drops image tokens from later layers), so a captured full prefill cannot stand in for it; run a "
                "prefill with the method's cache instead"
            )
        cache._modality = self.modality
        cache.layout = self.layout
        cache.load_prefill(self.layers, self.other_layers, self.seen)
        return cache


@torch.no_grad()
def capture_prefill(model, input_ids, attention_mask=None, position_ids=None, **model_kwargs) -> CapturedPrefill:
    """Run the prompt once through ``model`` and keep what every managed layer needs to be compressed later."""
    cache = KVCache(model, _Capture())
    cache.method.captured = {}
    if special_token_modalities(model.config):  # a VLM: every method sees which entries are image tokens
        cache.set_modality(detect_modality(model.config, input_ids, model_kwargs.get("mm_token_type_ids"),
                                           model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw")))
    if attention_mask is not None and position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                **cache_kwargs(model, cache), **model_kwargs)
    others = {i: layer for i, layer in enumerate(cache.layers) if not isinstance(layer, CompressedLayer)}
    seen = max(layer.seen for layer in cache.managed_layers)
    return CapturedPrefill(out.logits[:, -1:], cache.method.captured, others, seen, cache._modality, cache.layout,
                           getattr(out, "hidden_states", None))

"""The types a method and the cache exchange at prefill: what the method is given (:class:`PrefillContext`) and what
it returns (:class:`Selection`).

This module imports neither the cache nor the methods, so both can depend on it. The decode-time counterpart, the
:class:`~modalkv.decoding.DecodeStep` a method's ``decode`` hook receives, is in :mod:`modalkv.decoding`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch


@dataclass
class Selection:
    """What a method keeps at prefill.

    indices : LongTensor [B, H, k] or a list of H LongTensors [B, k_h] (ragged per head): prompt indices to keep,
        -1 for an unused slot.
    extras : name -> float32 [B, H, n] per-token method state, gathered along with the kept entries.
    keys, values : optional [B, H, n, d] replacing the prompt's keys/values before the kept ones are gathered
        (methods that merge evicted entries into kept ones, e.g. LOOK-M).
    """

    indices: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]
    extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def head(self, h: int) -> torch.Tensor:
        return self.indices[h] if isinstance(self.indices, (list, tuple)) else self.indices[:, h]


class CacheLike(Protocol):
    """What a method may read of the cache a layer belongs to (:class:`~modalkv.cache.KVCache`)."""

    num_managed: int  # number of layers the cache manages
    model_ref: Callable[[], Any]  # weak reference to the model the cache was built for (None once it is gone)


class PrefillLayer(Protocol):
    """What a method may read of the layer being compressed (:class:`~modalkv.layer.CompressedLayer`)."""

    layer_idx: int  # index among all the model's layers
    rank: int  # index among the managed layers

    @property
    def cache(self) -> CacheLike: ...


@dataclass
class PrefillContext:
    """Everything a method sees at prefill for one layer (shapes: B batch, Hq query heads, H KV heads, n tokens)."""

    layer: PrefillLayer
    query: torch.Tensor  # [B, Hq, n, d] post-RoPE
    keys: torch.Tensor  # [B, H, n, d] post-RoPE
    values: torch.Tensor  # [B, H, n, d]
    scaling: float
    real: torch.Tensor  # [B, n] bool, False = padding
    modality: torch.Tensor  # [B, n] int8
    positions: torch.Tensor  # [n] original token indices ([B, n] when earlier layers pruned tokens)
    n_real: torch.Tensor  # [B] real prompt length
    budget_tokens: torch.Tensor  # [B] entries each (layer, head) may keep (the layer's average for pyramids)
    caps: dict[int, torch.Tensor]  # modality id -> LongTensor [B] caps

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def n(self) -> int:
        return self.keys.shape[2]

    @property
    def layer_rank(self) -> int:
        return self.layer.rank

    @property
    def num_layers(self) -> int:
        return self.layer.cache.num_managed

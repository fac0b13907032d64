"""Token pruning across layers at prefill: later decoder layers compute only over the tokens a method keeps.

A method may decide, while the first managed layer is compressed, that some prompt tokens are not needed by any
later layer (HAE's Dual-Attention Pruning). It then calls :func:`start` with the kept prompt indices per row. A
forward pre-hook on every decoder layer (installed once per model by :func:`install`) gathers, for the rest of
that prompt forward, the layer's hidden states, position embeddings, position ids and attention mask at those
indices, so each later layer runs on the kept tokens only, with their *original* positions (RoPE is applied with
the original position of every kept token; the cache stores original positions). The cache keeps counting the
full prompt length, so decoding continues at the right position. The prune state ends with the last managed
layer's compression (:func:`finish`).

Only the prompt forward is affected: the hooks do nothing when the cache has no prune state (decode steps, other
caches, models used without modalkv). The model's output then covers the kept tokens only (the last prompt
token is always kept by callers that generate).
"""

from __future__ import annotations

import torch


def start(cache, keep: torch.Tensor, full_len: int, n_real: torch.Tensor) -> None:
    """Prune the rest of this prompt forward to ``keep`` (LongTensor [B, m], ascending prompt indices)."""
    if keep.shape[1] >= full_len:
        return
    cache.prune_index = keep
    cache.prune_len = int(full_len)
    cache.prune_real = n_real


def finish(cache) -> None:
    cache.prune_index = None


def active(cache, n: int) -> bool:
    """Does a prompt chunk of ``n`` tokens arriving at a layer come from a pruned forward?"""
    idx = getattr(cache, "prune_index", None)
    return idx is not None and n == idx.shape[1]


def _take(t: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather ``t`` along ``seq_dim`` with per-row indices [B, m]; the batch dim is the one just before."""
    bdim = seq_dim - 1
    B, m = index.shape
    shape = list(t.shape)
    if shape[bdim] == 1 and B > 1:
        shape[bdim] = B
        t = t.expand(*shape)
    view = [1] * t.dim()
    view[bdim], view[seq_dim] = B, m
    idx = index.view(view)
    target = list(t.shape)
    target[seq_dim] = m
    return t.gather(seq_dim, idx.expand(target))


def _take_mask(mask: torch.Tensor, index: torch.Tensor, full: int) -> torch.Tensor:
    """A [B, h, q, k] mask restricted to the kept rows (when q is the prompt) and kept columns."""
    B, m = index.shape
    mask = mask.expand(B, *mask.shape[1:]) if mask.shape[0] == 1 and B > 1 else mask
    h, q, k = mask.shape[1:]
    if q == full:
        mask = mask.gather(2, index.view(B, 1, m, 1).expand(B, h, m, k))
        q = m
    return mask.gather(3, index.view(B, 1, 1, m).expand(B, h, q, m))


def _pre_hook(module, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    index = getattr(cache, "prune_index", None)
    if index is None:
        return None
    full = cache.prune_len
    hidden = args[0] if args else kwargs["hidden_states"]
    if hidden.shape[1] == full:
        hidden = _take(hidden, index, 1)
    elif hidden.shape[1] != index.shape[1]:
        return None
    kwargs = dict(kwargs)
    pe = kwargs.get("position_embeddings")
    if isinstance(pe, tuple) and pe and pe[0].shape[-2] == full:
        kwargs["position_embeddings"] = tuple(_take(t, index, t.dim() - 2) for t in pe)
    pid = kwargs.get("position_ids")
    if isinstance(pid, torch.Tensor) and pid.shape[-1] == full:
        kwargs["position_ids"] = _take(pid, index, pid.dim() - 1)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] == full:
        kwargs["attention_mask"] = _take_mask(mask, index, full)
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


def decoder_layers(model) -> list:
    """The language model's decoder layers (the modules whose attention has a ``layer_idx``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers to prune hidden states")
    return list(layers)


def install(model) -> None:
    """Register the pruning pre-hook on every decoder layer of ``model`` (once per model)."""
    if getattr(model, "_modalkv_pruning", False):
        return
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model._modalkv_pruning = True

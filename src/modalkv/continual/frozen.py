"""Forward passes through the frozen model for InduceKV: retrieval embeddings, likelihoods with memories placed
before the prompt, and the model's geometry and RoPE checks. Gradients may flow *through* the model (to memory
payloads, selection weights or the retrieval calibration), never into its weights."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..cache import cache_kwargs
from ..models import model_info
from ..rope import rotary_module


def geometry(model) -> tuple[int, int, int, int]:
    """(layers, KV heads, head dim, hidden size) of the language model."""
    info = model_info(model)
    hidden = model.config.get_text_config(decoder=True).hidden_size
    return info["num_layers"], info["num_kv_heads"], info["head_dim"], hidden


def check_full_attention(model) -> None:
    """Raise unless every layer of the language model uses full attention with one RoPE module: a memory placed
    before the prompt must be read by every layer (a sliding window would forget it) and is re-rotated."""
    info = model_info(model)
    kinds = set(info["layer_types"])
    if kinds != {"full_attention"}:
        raise ValueError(
            f"InduceKV: {info['model_type']} has {sorted(kinds - {'full_attention'})} layers; a memory must be read "
            "by every layer, so only models whose layers all use full attention are supported")
    rotary_module(model)


@contextlib.contextmanager
def no_weight_grads(model):
    """Gradients may flow *through* the model (to memory payloads or selection weights), never into its weights."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def forward(model, ids: torch.Tensor, cache=None, mask=None, **model_kwargs):
    """One forward of ``ids`` [1, n] with ``cache`` (memories, or None for no cache) and an optional 4-D mask."""
    # a peft wrapper's forward takes **kwargs: the cache keyword is named after the model it wraps
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = cache_kwargs(inner, cache) if cache is not None else {"use_cache": False}
    return model(input_ids=ids, attention_mask=mask, **kw, **model_kwargs)


@torch.no_grad()
def embed(model, ids: torch.Tensor, span: tuple[int, int] | None = None, layer: int = -1, **model_kwargs):
    """Retrieval embedding of one input: unit-norm mean of layer ``layer``'s hidden states over ``span``."""
    out = model(input_ids=ids.view(1, -1), output_hidden_states=True, use_cache=False, **model_kwargs)
    hs = out.hidden_states[layer][0]
    s, e = span if span is not None else (0, hs.shape[0])
    return F.normalize(hs[s:e].float().mean(0), dim=-1)


def memory_mask(bias: torch.Tensor, q: int, dtype) -> torch.Tensor:
    """[1, 1, q, M + q] additive mask: ``bias`` [M] on the memory columns, causal over the q live tokens."""
    live = torch.full((q, q), float("-inf"), dtype=dtype, device=bias.device).triu(1)
    return torch.cat([bias.to(dtype)[None, :].expand(q, -1), live], dim=1)[None, None]


def sequence_nll(model, cache, query: torch.Tensor, target: torch.Tensor, bias=None, **model_kwargs):
    """Mean NLL (nats per token) of ``target`` after ``query``, with ``cache`` (memory or None) before the query."""
    ids = torch.cat([query, target]).view(1, -1)
    mask = None
    if bias is not None:
        mask = memory_mask(bias, ids.shape[1], next(model.parameters()).dtype)
    logits = forward(model, ids, cache, mask, **model_kwargs).logits[0, query.numel() - 1 : -1]
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target.to(logits.device))

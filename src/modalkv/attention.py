"""modalkv's attention function, registered with transformers' AttentionInterface and AttentionMaskInterface.

Two implementations are registered: ``modalkv_sdpa`` and ``modalkv_eager``. For a layer whose cache is a modalkv
layer the function

* at prefill (empty layer): attends exactly like transformers' own ``sdpa`` / ``eager`` function over the full
  prompt, then hands queries, keys and values to the method, which selects what the layer keeps;
* afterwards (decode, or a further prompt chunk): attends over the layer's stored entries per KV head without
  copying K/V for every query head (grouped queries are batched against one key matrix), masking only invalid
  slots, and hands the attention rows to methods that need them (H2O-style scores).

Any other layer (sliding window, or a model used without a modalkv cache) goes to transformers' function.
The mask function registered beside it never skips mask creation (transformers would otherwise drop padding
masks and truncate keys in its SDPA path when a cache holds other than the last tokens).
"""

from __future__ import annotations

import sys
import threading
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .decoding import DecodeStep, hidden_entries

BASES = ("sdpa", "eager")
NAMES = {f"modalkv_{b}": b for b in BASES}

_HANDED_OVER = threading.local()  # the managed layer whose update() ran last: the attention function reads it


def hand_over(layer, key: torch.Tensor) -> None:
    """Called by a managed layer's ``update`` with the key tensor it returns: the attention call that receives that
    very tensor attends over ``layer``'s stores (see :func:`active_layer`)."""
    layer.returned_key = key
    _HANDED_OVER.layer = layer


def take_unread():
    """The layer handed over whose attention has not run yet (None if there is none); it is handed over no more."""
    layer = getattr(_HANDED_OVER, "layer", None)
    _HANDED_OVER.layer = None
    return layer


def active_layer(layer_idx: int, key: torch.Tensor | None = None, module=None):
    """The managed layer whose ``update`` just returned ``key`` for ``layer_idx`` (consumed once), else None.

    The key tensor is the handshake: a layer is handed to the attention function only for the very tensor its
    ``update`` returned, so a layer left behind by a forward that did not consume it can never be picked up by a
    later, unrelated forward (another cache, another model). A layer whose cache was built for another model than
    ``module``'s raises.
    """
    layer = getattr(_HANDED_OVER, "layer", None)
    if layer is None or layer.layer_idx != layer_idx or (key is not None and layer.returned_key is not key):
        return None
    _HANDED_OVER.layer = None
    layer.returned_key = None
    cache = layer.cache
    if module is not None and id(module) not in cache.module_ids:
        raise RuntimeError(
            f"this KVCache was built for another model ({cache.model_name}); a cache holds one model's keys and "
            "values and can only be used with the model it was built for"
        )
    return layer


def _sdpa_mask_no_skip(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def base_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' own attention for the base implementation of the model (sdpa or the model's eager)."""
    impl = NAMES.get(module.config._attn_implementation, module.config._attn_implementation)
    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward(
            module, query, key, value, attention_mask, **kwargs
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def modalkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = active_layer(getattr(module, "layer_idx", None), key, module)
    if layer is None:
        return base_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("modalkv does not support attention logit soft-capping (softcap) yet")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer.pending is not None:  # prefill on an empty layer: exact transformers attention, then compress
        keys, values = layer.pending
        layer.pending = None
        real = visible_keys(attention_mask, query.shape[0], keys.shape[-2], query.device)
        mask = attention_mask
        if (
            NAMES.get(module.config._attn_implementation) == "sdpa"
            and query.shape[-2] == keys.shape[-2]
            and bool(real.all())
            and _is_plain_causal(attention_mask)
        ):
            # a whole unpadded prompt on an empty full-attention layer: the mask is plain causal, so let SDPA use
            # its causal kernel (no n x n mask or attention matrix in memory)
            mask = None
        out = base_attention(module, query, keys, values, mask, scaling=scaling, dropout=dropout, **kwargs)
        layer.compress_prefill(query, keys, values, real, scaling)
        return out
    return attend_stored(layer, query, attention_mask, scaling), None


_CAUSAL_CHECK: dict = {}


def _is_plain_causal(mask) -> bool:
    """Is this [B, 1, n, n] mask exactly the causal mask? (Remembered for the mask object itself, through a weak
    reference, since all layers of one forward share one mask; a new mask is always checked again.)"""
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] != mask.shape[-2]:
        return False
    ref = _CAUSAL_CHECK.get("mask")
    if ref is None or ref() is not mask or _CAUSAL_CHECK.get("version") != mask._version:
        n = mask.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        _CAUSAL_CHECK.update(mask=weakref.ref(mask), version=mask._version, result=bool((mask == causal).all()))
    return _CAUSAL_CHECK["result"]


def visible_keys(mask, batch: int, n: int, device) -> torch.Tensor:
    """Which of the n new keys are real tokens, [B, n] bool, read off the last query row of the 4-D mask."""
    if mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    row = mask[:, 0, -1, -n:]
    row = row if row.dtype == torch.bool else row == 0
    return row.expand(batch, n).clone()


def _block_mask(mask, q: int) -> torch.Tensor | None:
    """[B, q, q] bool: causal + padding among the q new tokens (None when q == 1)."""
    if q == 1:
        return None
    m = mask[:, 0, :, -q:] if mask is not None else None
    if m is None:
        m = torch.ones(q, q, dtype=torch.bool).tril()[None]
    elif m.dtype != torch.bool:
        m = m == 0
    eye = torch.eye(q, dtype=torch.bool, device=m.device)[None]
    return m | eye  # a padding query attends to itself so its (unused) output stays finite


def _packable(layer, q: int) -> bool:
    """Can this step take the batched path (one set of ops for all heads)?"""
    if not layer.packed or not layer.packed_intact():
        return False
    heads = layer.heads
    if any(hidden_entries(layer.cache.method, st) is not None for st in heads):
        return False
    return q == 1 or all(st.n == heads[0].n for st in heads)


def _wants_probs(cache) -> bool:
    """Does this decode step need the attention rows (the method's decode hook, or decode_budget by attention)?"""
    return cache.method.needs_decode_probs or cache.core_decode_eviction == "attention"


def _after_step(layer, probs, q: int) -> None:
    """After a decode step attended: the method's decode hook, then the cache's decode_budget eviction, both given
    one :class:`~modalkv.decoding.DecodeStep` (``probs``: [B, H, G, q, n] for a packed layer, else per head)."""
    cache = layer.cache
    method = cache.method
    step = DecodeStep(layer, probs if isinstance(probs, torch.Tensor) or probs else None, q)
    if method.needs_decode_probs or method.decodes:
        method.decode(step)
    if cache.core_decode_eviction is not None:
        layer.enforce_decode_budget(step)


def attend_packed(layer, query: torch.Tensor, mask, scaling: float) -> torch.Tensor:
    """:func:`attend_stored` for a packed layer: one batched step over all KV heads (ragged sizes masked), a fixed
    number of tensor ops whatever the number of heads. Returns [B, q, Hq, d]."""
    B, Hq, q, d = query.shape
    heads = layer.heads
    H = len(heads)
    G = Hq // H
    cache = layer.cache
    method = cache.method
    want_probs = _wants_probs(cache)
    sizes = [st.n for st in heads]
    n = max(sizes)
    buf = layer.buffers
    block = _block_mask(mask, q)
    if block is not None:  # the new slots of a padded multi-token chunk (same slots in every head here)
        real_new = block[:, -1, :] if block.shape[0] == B else block[:, -1, :].expand(B, q)
        buf["valid"][:, :, n - q : n] &= real_new[:, None]
        if not bool(real_new.all()):
            for st in heads:
                st.all_valid = False
    qs = (query * scaling).reshape(B, H, G * q, d)
    K = buf["keys"][:, :, :n]
    V = buf["values"][:, :, :n]
    logits = torch.matmul(qs, K.transpose(-1, -2))  # [B, H, G*q, n]
    ragged = any(size != n for size in sizes)
    if ragged or not all(st.all_valid for st in heads):
        visible = buf["valid"][:, :, :n]
        if ragged:
            within = torch.arange(n, device=K.device)[None, :] < torch.tensor(sizes, device=K.device)[:, None]
            visible = visible & within[None]
        logits.masked_fill_(~visible[:, :, None, :], float("-inf"))
    if block is not None:
        allowed = torch.ones(B, q, n, dtype=torch.bool, device=logits.device)
        allowed[:, :, n - q :] = block
        logits = logits.view(B, H, G, q, n).masked_fill(~allowed[:, None, None], float("-inf")).view(B, H, G * q, n)
    if method.has_readout:  # the method adds its own terms to the attention (e.g. RetentiveKV's states)
        out, probs = method.readout_layer(layer, qs, logits, V)
    else:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(V.dtype)
        out = torch.matmul(probs, V)  # [B, H, G*q, dv]
    out = out.view(B, H, G, q, -1).permute(0, 3, 1, 2, 4).reshape(B, q, Hq, -1)
    _after_step(layer, probs.view(B, H, G, q, n) if want_probs else None, q)
    return out


def _coded_batchable(layer, q: int) -> bool:
    """Can this step read a quantized layer in one batched step (:func:`attend_coded`)?"""
    from .storage import kernels
    from .storage.kivi import KIVIPayload

    heads = layer.heads
    if layer.cache.method.has_readout or not heads or heads[0].pos.device.type != "cpu":
        return False
    first = heads[0].payload
    if not isinstance(first, KIVIPayload) or not first.fused or kernels.library() is None:
        return False
    return all(type(st.payload) is type(first) and st.n == heads[0].n and st.payload.nq == first.nq
               and hidden_entries(layer.cache.method, st) is None for st in heads)


def attend_coded(layer, query: torch.Tensor, mask, scaling: float) -> torch.Tensor:
    """:func:`attend_stored` for a KIVI layer whose heads hold the same number of entries: the codes of every
    (row, KV head) are read by one fused kernel call for the logits and one for the values, the full-precision
    residuals by one batched matmul each; a fixed number of tensor ops whatever the number of heads.
    Returns [B, q, Hq, d]."""
    from .storage import kernels
    from .storage.kivi import kivi_logits, kivi_mix

    B, Hq, q, d = query.shape
    heads = layer.heads
    H = len(heads)
    G = Hq // H
    want_probs = _wants_probs(layer.cache)
    payloads = [st.payload for st in heads]
    n, nq = heads[0].n, payloads[0].nq
    block = _block_mask(mask, q)
    if block is not None:  # the new slots of a padded multi-token chunk: mark padding invalid
        real_new = block[:, -1, :] if block.shape[0] == B else block[:, -1, :].expand(B, q)
        for store in heads:
            store.valid[:, n - q : n] &= real_new
            store.all_valid = store.all_valid and bool(real_new.all())
    lib = kernels.library()
    qs = (query.float() * scaling).reshape(B, H, G * q, d).contiguous()
    logits = qs.new_empty(B, H, G * q, n)
    if nq:
        kivi_logits(lib, payloads, qs, logits)
    coded = layer.coded if layer.coded is not None and layer.coded_intact() else None  # the heads' layer buffers
    if n > nq:
        if coded is not None:
            rk = coded.rk[:, :, : n - nq].float()
        else:
            rk = torch.stack([pl.rk[:, : n - nq] for pl in payloads], 1).float()  # [B, H, n - nq, d]
        logits[..., nq:] = torch.matmul(qs, rk.transpose(-1, -2))
    if not all(st.all_valid for st in heads):
        if coded is not None:
            visible = layer.buffers["valid"][:, :, :n]
        else:
            visible = torch.stack([st.valid[:, :n] for st in heads], 1)
        logits.masked_fill_(~visible[:, :, None, :], float("-inf"))
    if block is not None:
        allowed = torch.ones(B, q, n, dtype=torch.bool, device=logits.device)
        allowed[:, :, n - q :] = block
        logits = logits.view(B, H, G, q, n).masked_fill(~allowed[:, None, None], float("-inf")).view(B, H, G * q, n)
    probs = torch.softmax(logits, dim=-1).contiguous()
    out = probs.new_empty(B, H, G * q, payloads[0].dv)
    if nq:
        kivi_mix(lib, payloads, probs, out)
    else:
        out.zero_()
    if n > nq:
        if coded is not None:
            rv = coded.rv[:, :, : n - nq].float()
        else:
            rv = torch.stack([pl.rv[:, : n - nq] for pl in payloads], 1).float()
        out += torch.matmul(probs[..., nq:], rv)
    out = out.to(query.dtype).view(B, H, G, q, -1).permute(0, 3, 1, 2, 4).reshape(B, q, Hq, -1)
    _after_step(layer, probs.to(query.dtype).unflatten(2, (G, q)) if want_probs else None, q)
    return out


def _spherical_batchable(layer, q: int) -> bool:
    """Can this step read a Spherical KV layer in one batched step (:func:`attend_spherical`)? (Heads may hold
    different numbers of entries for one new token; a multi-token chunk needs them equal.)"""
    from .storage import kernels
    from .storage.spherical import SphericalPayload

    heads = layer.heads
    method = layer.cache.method
    if method.has_readout or not heads or heads[0].pos.device.type != "cpu":
        return False
    first = heads[0].payload
    if type(first) is not SphericalPayload or not first.fused or first.params.reference or first.books is None:
        return False
    if kernels.library() is None:
        return False
    return all(type(st.payload) is SphericalPayload and (q == 1 or st.n == heads[0].n) and st.payload.books is not None
               and st.payload.values.dtype == torch.float32 and st.payload.tail_keys.dtype == torch.float32
               and hidden_entries(method, st) is None for st in heads)


def attend_spherical(layer, query: torch.Tensor, mask, scaling: float) -> torch.Tensor:
    """:func:`attend_stored` for a Spherical KV layer: per tier one fused kernel call over every (row, head) section
    (each task forms its table ``T = <q_j, C_c>`` and reads the codes against it), one kernel call for every dense
    tail, and one for probabilities x values; a fixed number of tensor ops whatever the number of heads. Heads holding fewer
    entries than the largest are padded in the logits (masked) only. Returns [B, q, Hq, d]."""
    from .storage import kernels
    from .storage.spherical import spherical_logits, spherical_mix, spherical_tail_logits

    B, Hq, q, d = query.shape
    heads = layer.heads
    H = len(heads)
    G = Hq // H
    want_probs = _wants_probs(layer.cache)
    payloads = [st.payload for st in heads]
    params = payloads[0].params
    sizes = [st.n for st in heads]
    n, r = max(sizes), G * q
    block = _block_mask(mask, q)
    if block is not None:  # the new slots of a padded multi-token chunk: mark padding invalid
        real_new = block[:, -1, :] if block.shape[0] == B else block[:, -1, :].expand(B, q)
        for store in heads:
            store.valid[:, n - q : n] &= real_new
            store.all_valid = store.all_valid and bool(real_new.all())
    lib = kernels.library()
    qs = (query.float() * scaling).reshape(B, H, r, d).contiguous()
    logits = qs.new_empty(B, H, r, n)
    tiers = sorted({sec["tier"] for pl in payloads for sec in pl.sections if sec["width"]})
    if tiers:
        grouped = params.grouped(qs).contiguous()
        for t in tiers:  # the kernel forms the tables T = <q_j, C_c> itself
            spherical_logits(lib, payloads, t, grouped, logits)
    spherical_tail_logits(lib, payloads, qs, logits, sizes)
    if not all(st.all_valid for st in heads):
        visible = torch.stack([F.pad(st.valid[:, : st.n], (0, n - st.n)) for st in heads], 1)
        logits.masked_fill_(~visible[:, :, None, :], float("-inf"))
    elif any(size != n for size in sizes):
        within = torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]  # [H, n]
        logits.masked_fill_(~within[None, :, None, :], float("-inf"))
    if block is not None:
        allowed = torch.ones(B, q, n, dtype=torch.bool, device=logits.device)
        allowed[:, :, n - q :] = block
        logits = logits.view(B, H, G, q, n).masked_fill(~allowed[:, None, None], float("-inf")).view(B, H, r, n)
    probs = torch.softmax(logits, dim=-1).contiguous()
    coded = layer.coded if layer.coded is not None and layer.coded_intact() else None
    if coded is not None:  # the values of every head in one layer buffer: one batched matmul (padding has p = 0)
        out = torch.matmul(probs, coded.values[:, :, :n])
    else:
        out = probs.new_empty(B, H, r, payloads[0].dv)
        spherical_mix(lib, payloads, probs, out, sizes)
    out = out.to(query.dtype).view(B, H, G, q, -1).permute(0, 3, 1, 2, 4).reshape(B, q, Hq, -1)
    _after_step(layer, probs.to(query.dtype).unflatten(2, (G, q)) if want_probs else None, q)
    return out


def attend_stored(layer, query: torch.Tensor, mask, scaling: float) -> torch.Tensor:
    """Attention of ``query`` [B, Hq, q, d] over every head store of ``layer`` (new entries already appended).

    Returns [B, q, Hq, d] as transformers' attention functions do.
    """
    if _packable(layer, query.shape[2]):
        return attend_packed(layer, query, mask, scaling)
    if _coded_batchable(layer, query.shape[2]):
        return attend_coded(layer, query, mask, scaling)
    if _spherical_batchable(layer, query.shape[2]):
        return attend_spherical(layer, query, mask, scaling)
    B, Hq, q, d = query.shape
    heads = layer.heads
    H = len(heads)
    G = Hq // H
    cache = layer.cache
    method = cache.method
    want_probs = _wants_probs(cache)
    block = _block_mask(mask, q)
    if block is not None:  # the new slots of a padded multi-token chunk: mark padding invalid
        real_new = block[:, -1, :] if block.shape[0] == B else block[:, -1, :].expand(B, q)
        for store in heads:
            store.valid[:, store.n - q : store.n] &= real_new
            store.all_valid = store.all_valid and bool(real_new.all())
    out = query.new_empty(B, q, Hq, d)
    probs_per_head = []
    qs = (query * scaling).view(B, H, G * q, d) if query.is_contiguous() else (query * scaling).reshape(B, H, G * q, d)
    readout = method.readout if method.has_readout else None
    for h, store in enumerate(heads):
        logits = store.logits(qs[:, h])  # [B, G*q, n]
        n = logits.shape[-1]
        if not store.all_valid:
            logits.masked_fill_(~store.valid[:, None, :n], float("-inf"))
        if block is not None:
            allowed = torch.ones(B, q, n, dtype=torch.bool, device=logits.device)
            allowed[:, :, n - q :] = block
            logits = logits.view(B, G, q, n).masked_fill(~allowed[:, None], float("-inf")).view(B, G * q, n)
        hidden = hidden_entries(method, store)  # entries kept and scored but not read (HAE's bin_attend=False)
        scored = logits
        if hidden is not None:
            logits = logits.masked_fill(hidden[:, None, :n] > 0, float("-inf"))
        if readout is not None:  # the method adds its own terms to the attention (e.g. RetentiveKV's states)
            o, probs = readout(layer, h, qs[:, h], logits, store.kv()[1])
        else:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            o = store.mix(probs)
            probs = probs.to(o.dtype)
        out[:, :, h * G : (h + 1) * G] = o.view(B, G, q, d).transpose(1, 2)
        if want_probs:
            if hidden is not None:  # the method scores every stored entry, hidden ones included
                probs = torch.softmax(scored, dim=-1, dtype=torch.float32).to(o.dtype)
            probs_per_head.append(probs.view(B, G, q, n))
    _after_step(layer, probs_per_head, q)
    return out


def check_supported(config) -> None:
    """Refuse attention layouts modalkv cannot serve, with a message that names the problem."""
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(
            f"{config.model_type}: attention logit soft-capping is not supported by modalkv's attention yet"
        )
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        raise ValueError(f"{config.model_type}: multi-head latent attention (MLA) caches are not supported")
    if getattr(config, "num_attention_heads", None) is None:
        raise ValueError(f"{getattr(config, 'model_type', '?')}: config has no num_attention_heads; not a supported decoder")


def install(model) -> None:
    """Switch ``model``'s language model to modalkv's attention (keeps its sdpa/eager flavour for unmanaged
    layers). In a vision-language model only the text config changes; the vision tower keeps its attention."""
    text = getattr(model.config, "text_config", None)
    cfg = text if text is not None else model.config
    impl = cfg._attn_implementation
    if impl in NAMES:
        return
    if impl not in BASES:
        raise ValueError(
            f"attention implementation {impl!r} is not supported by modalkv; load the model with "
            "attn_implementation='sdpa' or 'eager'"
        )
    model.set_attn_implementation({"text_config": f"modalkv_{impl}"} if text is not None else f"modalkv_{impl}")


for _name, _base in NAMES.items():
    AttentionInterface.register(_name, modalkv_attention)
    AttentionMaskInterface.register(_name, _sdpa_mask_no_skip if _base == "sdpa" else eager_mask)

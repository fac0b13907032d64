"""Saved compressed caches: compress a long document once, reuse the compressed cache later.

``save_cache(cache, path)`` writes a :class:`~modalkv.cache.KVCache` that has seen a prompt to one safetensors file;
``load_cache(path, model)`` rebuilds it, bound to ``model``, so that generation continues exactly where it would
have continued from the original cache::

    cache = KVCache(model, "snapkv", 0.25)
    model(input_ids=document, **cache_kwargs(model, cache))        # compress once
    save_cache(cache, "doc.safetensors")
    ...
    cache = load_cache("doc.safetensors", model)                     # later, in another process
    out = model.generate(input_ids=document_and_question, **cache_kwargs(model, cache))

What the file holds
-------------------
Tensors (only what is kept, never the reserve slots):

* per managed layer and KV head, the store's slots ``[0, n)`` as they are stored: dense keys/values, or KIVI's
  packed codes, scales and full-precision residual, or Spherical KV's direction codes, radius codes, page scales
  and dense tail, with positions, modality ids, validity flags and per-entry method extras
  (:meth:`~modalkv.store.HeadStore.state`); nothing is dequantised;
* per managed layer, the prompt length, each row's real prompt length and each head's prefill count;
* the method's per-sequence state outside the stores (:meth:`~modalkv.methods.base.Method.state_dict`:
  RetentiveKV's memories, HAE's recycle-bin bookkeeping, Spherical KV's window query norms);
* unmanaged layers (Gemma-3's sliding windows and any other layer kind transformers builds) exactly as transformers
  holds them: their tensors (keys, values) and plain fields (e.g. ``cumulative_length``);
* the cache's modality ids and visual layout, and the token ids :func:`modalkv.prefill` ran through it (int32).

The stores' tensors are written one tensor per name (``S.keys``, ``S.pos``, ``S.kc``, ...: every store's slots
concatenated, layer by layer and head by head, with each store's length in the header), so the safetensors header
stays small. The header (safetensors metadata, JSON) also holds the method's name and parameters, the budget (value,
modality caps, decode budget, decode policy), the quantizer, the per-store scalars, a fingerprint of the model and a
SHA-256 of the header and every tensor in the file.

CHOICE (Spherical KV's calibrated codebooks): they are a model constant (``shared_bytes``), re-derived
deterministically from the model when the cache is rebuilt (``KVCache`` calibrates once per model and process), so
they are not written to every file (on the tiny test model they are larger than a 256-token prompt's kept entries);
the file holds their SHA-256 and loading refuses a model whose re-derived codebooks differ. Codebooks fitted on the
prompt (``codebooks="prompt"``) are per-sequence state and are saved.

A method that keeps per-sequence state outside its head stores declares it with ``Method.state_dict`` /
``load_state_dict`` (RetentiveKV, HAE and Spherical KV do); a storage format writes its payload with
``Payload.state`` / ``restore`` (:mod:`modalkv.storage`).

Loading refuses, with a ValueError naming the problem: a file that is not a modalkv cache, a truncated or
corrupted file (the safetensors header or the tensors' checksum), a file saved for another model (a different
architecture, number of layers, KV heads, head dimension, hidden size, vocabulary, dtype or layer kinds, or the same
shapes with different weights: the fingerprint hashes the input embeddings and the first and last decoder layers'
weights), and a ``method=`` that disagrees with the file's. The cache is built through ``KVCache(model, ...)``, so
it is bound to ``model`` and the model's attention is routed through modalkv, as for any new cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from .cache import KVCache
from .layer import CompressedLayer
from .methods import REGISTRY, Method, make_method
from .modality import ModalityLayout
from .pruning import decoder_layers
from .storage import format_from_saved
from .store import HeadStore

FORMAT = "modalkv-cache"
VERSION = 2  # 2: method extras renamed (accumulated_attention, in_recycle_bin, ...), storage payloads
_META_KEY = "modalkv.cache"


# --------------------------------------------------------------------------------------------------------------
# the model fingerprint
# --------------------------------------------------------------------------------------------------------------


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().contiguous().reshape(-1)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).cpu().numpy())


def model_fingerprint(model) -> dict[str, Any]:
    """Shapes and a weight hash that identify a model: a saved cache only fits the model it was made with."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    h = hashlib.sha256()
    _hash_tensor(h, model.get_input_embeddings().weight)
    try:
        layers = decoder_layers(model)
    except ValueError:
        layers = []
    for layer in (layers[0], layers[-1]) if layers else ():
        for _, p in sorted(layer.named_parameters()):
            _hash_tensor(h, p)
    return {
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "layer_kinds": [type(layer).__name__ for layer in DynamicCache(config=config).layers],
        "weights_sha256": h.hexdigest(),
    }


def _check_model(saved: dict, model, path) -> None:
    here = model_fingerprint(model)
    for key, value in here.items():
        if key == "weights_sha256":
            continue
        if saved.get(key) != value:
            raise ValueError(f"{path} was saved for another model: {key} is {saved.get(key)!r} in the file, "
                             f"{value!r} in this model")
    if saved.get("weights_sha256") != here["weights_sha256"]:
        raise ValueError(f"{path} was saved for another model: same shapes, but different weights (the hash of the "
                         "input embeddings and the first and last decoder layers differs)")


# --------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the cache file")
    return dtype


def _header_text(header: dict) -> str:
    """The header as written, without its checksum (which covers it)."""
    body = {key: value for key, value in header.items() if key != "sha256"}
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


def _digest(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the header (its checksum left out) and of every tensor, by name."""
    h = hashlib.sha256(_header_text(header).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        _hash_tensor(h, tensors[name])
    return h.hexdigest()


def _packed(t: torch.Tensor) -> torch.Tensor:
    """A compact copy (safetensors writes whole, unshared tensors)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _plain_fields(layer, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An unmanaged layer's fields: plain values (JSON) and tensors, as transformers holds them."""
    scalars, tensors = {}, {}
    for name, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, torch.dtype):
            scalars[name] = {"dtype": str(value)}
        elif isinstance(value, torch.device):
            continue  # restored as the model's device
        elif value is None or isinstance(value, (bool, int, float, str)):
            scalars[name] = value
        else:
            raise ValueError(f"cannot save {where} ({type(layer).__name__}): its field {name!r} is a "
                             f"{type(value).__name__}, not a tensor or plain value")
    return scalars, tensors


def _pack_stores(states: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The head stores' tensors (all [B, slots, ...]), one tensor per name: each name's tensors of every store
    (layer by layer, head by head) concatenated along the slot dimension, with each store's length (-1: the store
    has no tensor of that name). Few tensors keep the file's header small. A name whose tensors do not line up is
    saved store by store (``S<index>.<name>``)."""
    packed, lengths = {}, {}
    for name in sorted({name for state in states for name in state}):
        parts = [state.get(name) for state in states]
        present = [t for t in parts if t is not None]
        first = present[0]
        if all(t.dim() >= 2 and t.dtype == first.dtype and t.shape[0] == first.shape[0]
               and t.shape[2:] == first.shape[2:] for t in present):
            packed["S." + name] = torch.cat(present, 1)
            lengths[name] = [-1 if t is None else t.shape[1] for t in parts]
        else:
            packed.update({f"S{i}.{name}": t for i, t in enumerate(parts) if t is not None})
    return packed, lengths


def _unpack_stores(tensors: dict[str, torch.Tensor], lengths: dict[str, list[int]], count: int
                   ) -> list[dict[str, torch.Tensor]]:
    """Inverse of :func:`_pack_stores`."""
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for name, lens in lengths.items():
        if len(lens) != count:
            raise ValueError(f"the file's header lists {len(lens)} stores for {name!r}, its layers {count}")
        pieces = iter(tensors["S." + name].split([n for n in lens if n >= 0], 1))
        for state, n in zip(states, lens):
            if n >= 0:
                state[name] = next(pieces).contiguous()
    for key, t in tensors.items():
        index, dot, name = key.partition(".")
        if dot and index[:1] == "S" and index[1:].isdigit():
            states[int(index[1:])][name] = t
    return states


# --------------------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------------------


def save_cache(cache: KVCache, path) -> None:
    """Write ``cache`` (a :class:`~modalkv.cache.KVCache` that has seen a prompt) to the safetensors file ``path``.

    The file holds the kept entries as stored (see the module docstring); load it with :func:`load_cache`. Saving
    does not change the cache.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"save_cache takes a modalkv KVCache, got {type(cache).__name__}")
    managed = cache.managed_layers
    if not any(layer.heads for layer in managed):
        raise ValueError("this KVCache holds no prompt yet: run the prompt through the model with the cache first")
    if cache.prune_index is not None:
        raise ValueError("cannot save a KVCache in the middle of a pruned prompt forward")
    context_ids = getattr(cache, "context_ids", None)
    if getattr(cache.method, "needs_context_pass", False) and context_ids is None:
        raise ValueError(f"{cache.method.name} compresses the context in a pass after its forward, which has not run: "
                         "build the context with modalkv.prefill(model, cache, input_ids, ...) before saving")
    model = cache.model_ref()
    if model is None:
        raise RuntimeError("the model this KVCache was built for no longer exists")
    method = cache.method
    params = {f.name: getattr(method, f.name) for f in _init_fields(method)}
    tensors: dict[str, torch.Tensor] = {}
    layers, store_states = [], []
    for i, layer in enumerate(cache.layers):
        prefix = f"L{i}."
        if isinstance(layer, CompressedLayer):
            info: dict[str, Any] = {"kind": "managed", "seen": layer.seen}
            if layer.heads:
                info.update(prompt_len=int(layer.prompt_len), dtype=str(layer.dtype), stores=[])
                tensors[prefix + "prompt_real"] = layer.prompt_real
                tensors[prefix + "prefill_kept"] = torch.stack(list(layer.prefill_kept))
                for store in layer.heads:
                    store_tensors, scalars = store.state()
                    scalars["extras"] = list(store.extras)
                    info["stores"].append(scalars)
                    store_states.append(store_tensors)
                tensors.update({f"{prefix}M.{name}": t for name, t in method.state_dict(layer).items()})
        else:
            scalars, fields = _plain_fields(layer, f"layer {i}")
            info = {"kind": "other", "type": type(layer).__name__, "fields": scalars, "tensors": sorted(fields)}
            tensors.update({prefix + name: t for name, t in fields.items()})
        layers.append(info)
    packed, lengths = _pack_stores(store_states)
    tensors.update(packed)
    tensors.update({f"M.{name}": t for name, t in method.state_dict(None).items()})
    if cache._modality is not None:
        tensors["modality"] = cache._modality
    if cache.layout is not None:
        for name in ("ids", "item", "frame", "row", "col"):
            tensors[f"layout.{name}"] = getattr(cache.layout, name)
    if context_ids is not None:  # the ids modalkv.prefill ran through the cache (a later turn is checked against them)
        tensors["context_ids"] = context_ids.to(torch.int32)
    tensors = {name: _packed(t) for name, t in tensors.items()}
    q = cache.quantizer
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_fingerprint(model),
        "method": {"name": method.name, "params": params},
        "budget": {"value": cache.budget.value, "modality_caps": dict(cache.budget.modality_caps),
                   "decode": cache.budget.decode},
        "decode_policy": cache.decode_policy,
        "reserve": cache.reserve,
        "quantize": None if q is None else {"name": q.name, **q.params()},
        "layers": layers,
        "store_lengths": lengths,
        "has_layout": cache.layout is not None,
    }
    try:
        header["sha256"] = _digest(header, tensors)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot save this cache: a parameter of {method.name} or of its budget is not a plain "
                         f"value ({e})") from None
    text = json.dumps(header, separators=(",", ":"))
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, _META_KEY: text})
    os.replace(tmp, path)


def _init_fields(obj) -> list:
    return [f for f in dataclasses.fields(obj) if f.init]


# --------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------


def _read(path, device) -> tuple[dict, dict[str, torch.Tensor]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no cache file at {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or _META_KEY not in meta:
                raise ValueError(f"{path} is a safetensors file but not a modalkv cache (no {FORMAT!r} header); "
                                 "save caches with modalkv.save_cache")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None
    try:
        header = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the modalkv header is corrupted ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: the modalkv header is corrupted")
    if header.get("version") != VERSION:
        raise ValueError(f"{path} is a modalkv cache of format version {header.get('version')!r}; this modalkv "
                         f"reads version {VERSION}")
    if _digest(header, tensors) != header.get("sha256"):
        raise ValueError(f"{path} is corrupted: the checksum of its header and tensors does not match the one saved "
                         "with them")
    return header, tensors


def _check_method(wanted, spec: dict, path) -> None:
    if wanted is None:
        return
    if isinstance(wanted, str):
        cls = REGISTRY.get(wanted.lower())
        name = cls.name if cls is not None else wanted.lower()
        if name != spec["name"]:
            raise ValueError(f"{path} holds a {spec['name']!r} cache, not {wanted!r}")
        return
    if not isinstance(wanted, Method):
        raise TypeError(f"method must be a method name or a Method instance, got {type(wanted).__name__}")
    if wanted.name != spec["name"]:
        raise ValueError(f"{path} holds a {spec['name']!r} cache, not {wanted.name!r}")
    differ = [f"{f.name}={getattr(wanted, f.name)!r} (file: {spec['params'].get(f.name)!r})"
              for f in _init_fields(wanted) if getattr(wanted, f.name) != spec["params"].get(f.name)]
    if differ:
        raise ValueError(f"{path} holds a {spec['name']} cache with other parameters: {', '.join(differ)}")


def load_cache(path, model, *, method=None) -> KVCache:
    """Rebuild the :class:`~modalkv.cache.KVCache` saved at ``path`` for ``model`` (the model it was saved with).

    ``method`` (a name or a Method instance), when given, must agree with the file's method (and, for an instance,
    its parameters). The cache is built with ``KVCache(model, ...)`` (so the model's attention is routed through
    modalkv) and continues exactly as the saved cache would have: the next forward or ``generate`` takes the tokens
    after those it has seen.
    """
    device = next(model.parameters()).device
    header, tensors = _read(path, device)
    _check_model(header["model"], model, path)
    spec = header["method"]
    _check_method(method, spec, path)
    if spec["name"] not in REGISTRY:
        raise ValueError(f"{path} holds a cache of method {spec['name']!r}, which is not registered here")
    q = header["quantize"]
    try:
        quantize = None if q is None else format_from_saved(q.get("name"), {k: v for k, v in q.items() if k != "name"})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    budget = header["budget"]
    cache = KVCache(model, make_method(spec["name"], **spec["params"]), budget["value"],
                    modality_caps=budget["modality_caps"] or None, quantize=quantize, decode_budget=budget["decode"],
                    decode_policy=header["decode_policy"], reserve=header["reserve"])
    if len(header["layers"]) != len(cache.layers):
        raise ValueError(f"{path} has {len(header['layers'])} cache layers, this model {len(cache.layers)}")

    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}

    cache.method.load_state_dict(None, under("M."))
    n_stores = sum(len(info.get("stores", [])) for info in header["layers"])
    store_states = iter(_unpack_stores(tensors, header["store_lengths"], n_stores))
    for i, (info, layer) in enumerate(zip(header["layers"], cache.layers)):
        prefix = f"L{i}."
        if info["kind"] == "managed":
            if not isinstance(layer, CompressedLayer):
                raise ValueError(f"{path}: layer {i} is a full-attention layer in the file, a "
                                 f"{type(layer).__name__} in this model")
            layer.seen = int(info["seen"])
            if "stores" not in info:
                continue
            layer.dtype, layer.device = _dtype(info["dtype"]), device
            layer.is_initialized = True
            layer.prompt_len = int(info["prompt_len"])
            layer.prompt_real = tensors[prefix + "prompt_real"]
            layer.prefill_kept = list(tensors[prefix + "prefill_kept"].unbind(0))
            heads = []
            for scalars in info["stores"]:
                own = next(store_states)
                extras = [own.pop("extra." + name) for name in scalars["extras"]]
                own.update({"extra." + name: t for name, t in zip(scalars["extras"], extras)})
                heads.append(HeadStore.from_state(own, scalars, cache.reserve, layer.storage))
            layer.heads = heads
            layer._row_targets = None
            layer.pack()  # the batched decode layout, as after a prefill
            cache.method.load_state_dict(layer, under(prefix + "M."))
        else:
            if type(layer).__name__ != info["type"]:
                raise ValueError(f"{path}: layer {i} is a {info['type']} in the file, a {type(layer).__name__} "
                                 "in this model")
            for name, value in info["fields"].items():
                setattr(layer, name, _dtype(value["dtype"]) if isinstance(value, dict) else value)
            for name in info["tensors"]:
                setattr(layer, name, tensors[prefix + name])
            if getattr(layer, "is_initialized", False) and hasattr(layer, "device"):
                layer.device = device
    if "modality" in tensors:
        cache._modality = tensors["modality"]
    if "context_ids" in tensors:
        cache.context_ids = tensors["context_ids"].cpu().long()
    if header.get("has_layout"):
        cache.layout = ModalityLayout(*(tensors[f"layout.{name}"] for name in ("ids", "item", "frame", "row", "col")))
    return cache

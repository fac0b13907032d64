"""The model's own rotary position embedding, for methods that move queries or keys between positions."""

from __future__ import annotations

import torch


def rotary_module(model):
    """The language model's rotary embedding module (``rotary_emb`` of the decoder), or a clear error."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rot = getattr(decoder, "rotary_emb", None)
    if rot is None:
        raise ValueError(f"{type(model).__name__}: no rotary embedding module (rotary_emb) found; this method needs "
                         "a RoPE model")
    return rot


def cos_sin(model, layer_idx: int, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, n, d] (attention scaling included) of the rotary embedding layer ``layer_idx`` uses at
    ``positions`` [B, n]."""
    rot = rotary_module(model)
    if hasattr(rot, "layer_types"):  # one embedding per layer kind (Gemma-3)
        config = model.config.get_text_config(decoder=True)
        cos, sin = rot(like, positions, config.layer_types[layer_idx])
    else:
        cos, sin = rot(like, positions)
    return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo ``x * cos + rotate_half(x) * sin`` (the scaling folded into cos/sin is divided out too)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The mean over positions of the rotation matrices ``R = cos I + sin P`` (``P x = rotate_half(x)``):
    cos, sin [B, n, d] -> [B, d, d]."""
    d = cos.shape[-1]
    eye = torch.eye(d, dtype=cos.dtype, device=cos.device)
    P = rotate_half(eye).T  # P @ x == rotate_half(x) for a column vector x
    c, s = cos.mean(1), sin.mean(1)  # [B, d]
    return c[:, :, None] * eye + s[:, :, None] * P

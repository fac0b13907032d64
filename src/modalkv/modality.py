"""Modality ids carried by every cache entry.

The ids follow transformers' ``mm_token_type_ids`` convention (0 text, 1 image, 2 video, 3 audio), so a
processor's output can be handed to the cache unchanged. Detection for vision-language families arrives with
the multimodal work; text models are all ``TEXT``.
"""

from __future__ import annotations

import torch

TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3
MODALITY_IDS = {"text": TEXT, "image": IMAGE, "video": VIDEO, "audio": AUDIO}
MODALITY_NAMES = {v: k for k, v in MODALITY_IDS.items()}


def as_modality_ids(ids: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Validate ``mm_token_type_ids``-style ids of shape [B, n] (None means all text) and return int8 ids."""
    if ids is None:
        return torch.zeros(batch, length, dtype=torch.int8, device=device)
    ids = torch.as_tensor(ids, device=device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if tuple(ids.shape) != (batch, length):
        raise ValueError(
            f"modality ids have shape {tuple(ids.shape)} but the prompt is {(batch, length)} (batch, tokens): "
            "the number of image/video tokens does not match the input ids"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > max(MODALITY_NAMES)):
        raise ValueError(f"modality ids must be in {sorted(MODALITY_NAMES)}, got values outside that range")
    return ids.to(torch.int8)

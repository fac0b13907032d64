"""Modality ids carried by every cache entry.

The ids follow transformers' ``mm_token_type_ids`` convention (0 text, 1 image, 2 video, 3 audio), so a
processor's output can be handed to the cache unchanged. :func:`detect_modality` finds them for the
vision-language families (LLaVA, Qwen2-VL/2.5-VL, Idefics3/SmolVLM, Gemma-3) from the config's placeholder token
ids, with grid coordinates of every visual token; text models are all ``TEXT``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


# -- detection for vision-language families -------------------------------------------------------------------

_TOKEN_FIELDS = {  # config attribute -> modality; transformers 5.x names and their *_index aliases
    "image_token_id": IMAGE, "image_token_index": IMAGE,
    "video_token_id": VIDEO, "video_token_index": VIDEO,
    "audio_token_id": AUDIO, "audio_token_index": AUDIO,
}


def special_token_modalities(config) -> dict[int, int]:
    """Token id -> modality for the placeholder ids a VLM config declares (LLaVA, Qwen2-VL/2.5-VL, Idefics3 /
    SmolVLM, Gemma-3, ...). Text-only configs give an empty dict."""
    out: dict[int, int] = {}
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for field, modality in _TOKEN_FIELDS.items():
            value = getattr(cfg, field, None)
            if isinstance(value, int) and value >= 0:
                if out.get(value, modality) != modality:
                    raise ValueError(f"config declares token id {value} for two modalities")
                out[value] = modality
    return out


def tokens_per_image(config) -> int | None:
    """Visual tokens one image becomes when the family fixes it (LLaVA ``image_seq_length``, Gemma-3
    ``mm_tokens_per_image``, Idefics3/SmolVLM per tile); None where it depends on the image (Qwen2-VL)."""
    for field in ("mm_tokens_per_image", "image_seq_length"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    vision, scale = getattr(config, "vision_config", None), getattr(config, "scale_factor", None)
    if vision is not None and scale and getattr(config, "model_type", "") in ("idefics3", "smolvlm"):
        return (vision.image_size // vision.patch_size) ** 2 // scale**2
    return None


@dataclass
class ModalityLayout:
    """Per-position modality and, for visual tokens, where they sit: ``item`` (image/video index in the row, -1
    for text), ``frame``, ``row``, ``col`` (in the LLM-token grid after any patch merging). All [B, n]."""

    ids: torch.Tensor
    item: torch.Tensor
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor

    def counts(self) -> dict[str, int]:
        return {MODALITY_NAMES[int(m)]: int((self.ids == m).sum()) for m in torch.unique(self.ids)}

    def select_rows(self, index: torch.Tensor) -> "ModalityLayout":
        """The layout of batch rows ``index`` (in that order)."""
        return ModalityLayout(*(t.index_select(0, index.to(t.device)) for t in (self.ids, self.item, self.frame,
                                                                               self.row, self.col)))


def mask_runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-D bool tensor."""
    x = torch.cat([torch.zeros(1, dtype=torch.int8), mask_row.to(torch.int8), torch.zeros(1, dtype=torch.int8)])
    d = torch.diff(x)
    starts, stops = torch.nonzero(d == 1).flatten(), torch.nonzero(d == -1).flatten()
    return [(int(a), int(b - a)) for a, b in zip(starts, stops)]


def detect_modality(config, input_ids: torch.Tensor, mm_token_type_ids=None, image_grid_thw=None,
                    video_grid_thw=None) -> ModalityLayout:
    """Modality ids and visual grid coordinates of a prompt.

    The ids come from the config's placeholder token ids (the processor expands each image into that many
    copies of one id, which the model fills with visual features); a processor's ``mm_token_type_ids`` is
    checked against them and must agree. Grids: Qwen2-VL/2.5-VL from ``image_grid_thw`` / ``video_grid_thw``
    (patches; one LLM token per ``spatial_merge_size``² patches; video frames after temporal merging);
    otherwise each image is ``tokens_per_image(config)`` consecutive tokens laid out as a square (runs of adjacent
    images are split by that count); Idefics3/SmolVLM tiles count as images. A run that cannot be split that way
    is an error naming the mismatch.
    """
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    B, n = input_ids.shape
    table = special_token_modalities(config)
    ids = torch.zeros(B, n, dtype=torch.int8)
    for token, modality in table.items():
        ids[input_ids.cpu() == token] = modality
    if mm_token_type_ids is not None:
        given = as_modality_ids(mm_token_type_ids, B, n, "cpu")
        if table and not torch.equal(given, ids):
            bad = int((given != ids).sum())
            raise ValueError(f"mm_token_type_ids disagree with the config's image/video token ids at {bad} "
                             "position(s): the image tokens in input_ids do not match the processor's ids")
        ids = given
    layout = ModalityLayout(ids, *(torch.full((B, n), -1, dtype=torch.int32) for _ in range(4)))
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", None) or 1
    grids = {IMAGE: _as_grids(image_grid_thw, merge), VIDEO: _as_grids(video_grid_thw, merge)}
    per_image = tokens_per_image(config)
    for b in range(B):
        for modality in (IMAGE, VIDEO):
            runs = mask_runs(ids[b] == modality)
            if not runs:
                continue
            if grids[modality] is not None:
                _place_grids(layout, b, runs, grids[modality], modality)
            else:
                place_square(layout, b, runs, per_image, modality)
    return layout


def _as_grids(grid_thw, merge: int) -> list[tuple[int, int, int]] | None:
    if grid_thw is None:
        return None
    grid = torch.as_tensor(grid_thw).reshape(-1, 3).tolist()
    return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid]


def _place_grids(layout, b, runs, grids, modality) -> None:
    """Qwen2-VL: images (or videos) in order, each t*h*w LLM tokens, possibly spread over several runs."""
    positions = torch.cat([torch.arange(s, s + n) for s, n in runs])
    need = sum(t * h * w for t, h, w in grids)
    if positions.numel() != need:
        raise ValueError(f"{positions.numel()} {MODALITY_NAMES[modality]} tokens in the prompt but the grids "
                         f"({grids}) need {need}: the number of image tokens does not match the pixel inputs")
    at = 0
    for item, (t, h, w) in enumerate(grids):
        k = torch.arange(t * h * w)
        pos = positions[at: at + t * h * w]
        layout.item[b, pos] = item
        layout.frame[b, pos] = (k // (h * w)).to(torch.int32)
        layout.row[b, pos] = ((k % (h * w)) // w).to(torch.int32)
        layout.col[b, pos] = (k % w).to(torch.int32)
        at += t * h * w


def place_square(layout: ModalityLayout, b: int, runs, per_image: int | None, modality: int) -> None:
    """Fill row ``b`` of ``layout`` for the visual ``runs`` ((start, length) pairs): each image is ``per_image``
    consecutive tokens (a whole run when None) numbered in order, laid out row by row on a square grid (one row of
    ``per_image`` columns when that is not a square)."""
    item = 0
    for start, length in runs:
        size = per_image or length
        if length % size:
            raise ValueError(f"a run of {length} {MODALITY_NAMES[modality]} tokens at position {start} is not a "
                             f"whole number of images of {size} tokens: the image tokens do not match the config")
        side = math.isqrt(size)
        for s in range(start, start + length, size):
            k = torch.arange(size)
            pos = torch.arange(s, s + size)
            layout.item[b, pos] = item
            layout.frame[b, pos] = 0
            layout.row[b, pos] = (k // side).to(torch.int32) if side * side == size else 0
            layout.col[b, pos] = (k % side).to(torch.int32) if side * side == size else k.to(torch.int32)
            item += 1

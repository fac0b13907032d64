"""Budgets: how many prompt entries each (layer, KV head) may keep.

A budget is either a ratio of the prompt length in (0, 1] or an absolute number of tokens (an int >= 1),
optionally with per-modality caps (``{"image": 0.1}`` keeps at most 10 % of the image tokens). Budgets are
resolved per batch row against that row's real (non-padding) prompt length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .modality import MODALITY_IDS

MAX_TOKENS = 2**40  # an absolute budget above this is refused (no context is that long; keeps int64 arithmetic safe)


@dataclass(frozen=True)
class Budget:
    """A prompt budget.

    Parameters
    ----------
    value : float | int
        A float in (0, 1] is a ratio of the prompt length; an int >= 1 is an absolute token count per
        (layer, KV head). ``1`` (int) means one token; ``1.0`` (float) means the whole prompt.
    modality_caps : dict[str, float | int]
        Optional caps per modality name (``text``, ``image``, ``video``, ``audio``): a ratio of that
        modality's tokens or an absolute count. Applied inside the method's top-k selection.
    decode : int, optional
        A bound on the entries per (layer, KV head) while decoding (``KVCache(decode_budget=...)``).

    An absolute budget larger than the prompt keeps the whole prompt and then acts as a window: methods that evict
    while decoding let the cache grow up to ``value`` entries before they start evicting.
    """

    value: float | int
    modality_caps: dict = field(default_factory=dict)
    decode: int | None = None

    def __post_init__(self) -> None:
        check_budget_value(self.value, "budget")
        if self.decode is not None:
            check_budget_value(self.decode, "decode_budget")
            if isinstance(self.decode, float):
                raise TypeError(f"decode_budget must be an int token count, got {self.decode!r}")
        if not isinstance(self.modality_caps, dict):
            raise TypeError(f"modality_caps must be a dict like {{'image': 0.1}}, got {type(self.modality_caps).__name__}")
        for name, cap in self.modality_caps.items():
            if name not in MODALITY_IDS:
                raise ValueError(f"unknown modality {name!r} in modality_caps; known: {sorted(MODALITY_IDS)}")
            check_budget_value(cap, f"modality cap for {name!r}")

    @property
    def is_ratio(self) -> bool:
        return isinstance(self.value, float)

    @property
    def is_full(self) -> bool:
        """The whole prompt: ratio 1.0 without modality caps."""
        return self.is_ratio and self.value == 1.0 and not self.modality_caps

    def tokens(self, n_real: torch.Tensor) -> torch.Tensor:
        """Entries to keep per batch row, given each row's real prompt length ``n_real`` (LongTensor [B])."""
        return resolve(self.value, n_real)

    def decode_targets(self, prefill_kept: torch.Tensor, seen: torch.Tensor, prompt_real: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Entries per row a decode-time evicting method keeps after ``seen`` real tokens ([B] each).

        CHOICE: a ratio budget stays a ratio of everything seen (``ceil(ratio * seen)``, never below the prefill
        size), so budget 1.0 never evicts; an absolute budget stays fixed at the prefill size (a streaming cache), or
        at the budget itself when the prompt was shorter (a window that fills up first). ``decode`` caps either.
        """
        if self.is_ratio:
            target = torch.maximum(prefill_kept, torch.ceil(seen.double() * self.value - 1e-9).long())
        elif prompt_real is not None:
            target = prefill_kept + (self.value - prompt_real).clamp(min=0)
        else:
            target = prefill_kept
        if self.decode is not None:
            target = target.clamp(max=self.decode)
        return target

    def decode_target(self, prefill_kept: int, seen: int, prompt_real: int | None = None) -> int:
        """:meth:`decode_targets` for one row, in Python integers (no device round trip)."""
        if self.is_ratio:
            target = max(prefill_kept, math.ceil(seen * self.value - 1e-9))
        elif prompt_real is not None:
            target = prefill_kept + max(0, self.value - prompt_real)
        else:
            target = prefill_kept
        return target if self.decode is None else min(target, self.decode)

    def caps(self, modality: torch.Tensor, real: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-row caps {modality id: LongTensor [B]} for the capped modalities present."""
        out = {}
        for name, cap in self.modality_caps.items():
            mid = MODALITY_IDS[name]
            count = ((modality == mid) & real).sum(-1)
            out[mid] = resolve(cap, count)
        return out


def parse_caps(text: str) -> dict[str, float]:
    """Per-modality caps written ``"image=0.1,text=0.5"`` (ratios of each modality's prompt tokens) -> a dict."""
    caps: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not eq or name not in MODALITY_IDS:
            raise ValueError(f"modality cap {part!r}: write <modality>=<ratio> with modality one of "
                             f"{', '.join(MODALITY_IDS)}, e.g. image=0.1")
        try:
            cap = float(value)
        except ValueError:
            raise ValueError(f"modality cap {part!r}: {value!r} is not a number") from None
        check_budget_value(cap, f"modality cap for {name!r}")
        caps[name] = cap
    return caps


def check_budget_value(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a float ratio in (0, 1] or an int token count, got {type(value).__name__}")
    if isinstance(value, float):
        if math.isnan(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"{what} ratio must be in (0, 1], got {value}")
    elif value < 1:
        raise ValueError(f"{what} as a token count must be >= 1, got {value}")
    elif value > MAX_TOKENS:
        raise ValueError(f"{what} of {value} tokens is beyond any context length (at most {MAX_TOKENS})")


def resolve(value: float | int, n: torch.Tensor) -> torch.Tensor:
    """Token counts per row for a ratio or an absolute value, never more than ``n`` and at least 1 when n > 0."""
    if isinstance(value, float):
        k = torch.ceil(n.double() * value).long()
    else:  # larger than the prompt: the whole prompt (the rest is a window for decoding, see Budget)
        k = torch.full_like(n, value)
    return torch.minimum(k.clamp(min=1), n)

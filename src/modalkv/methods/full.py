"""The full cache: every prompt and generated token is kept (the reference every method is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method


@dataclass
class Full(Method):
    """Keep everything; stored in modalkv's per-head layout, so it measures the layout's own cost and speed.

    Its logits equal transformers' ``DynamicCache`` (tested). Combine it with ``quantize="kivi-4"`` for KIVI alone.
    See docs/methods/full.md.
    """

    name = "full"
    summary = "Keep every token (reference; identical logits to transformers' DynamicCache)"

    def check_budget(self, budget) -> None:
        if budget.value != 1.0 or budget.modality_caps:
            raise ValueError(f"full keeps every prompt token: its budget is 1.0 without modality caps (got "
                             f"{budget.value!r}{', caps ' + str(budget.modality_caps) if budget.modality_caps else ''}"
                             "); use decode_budget to bound it while decoding, or an evicting method")

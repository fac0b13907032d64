"""The full cache: every prompt and generated token is kept (the reference every method is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method


@dataclass
class Full(Method):
    """Keep everything; stored in modalkv's per-head layout, so it measures the layout's own cost and speed.

    Its logits equal transformers' ``DynamicCache`` (tested). Combine it with ``quantize="kivi-4"`` for KIVI alone.
    """

    name = "full"
    summary = "Keep every token (reference; identical logits to transformers' DynamicCache)"

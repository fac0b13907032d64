"""H2O: heavy hitters (accumulated attention) plus recent tokens, evicting one entry per decode step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .base import Method, PrefillContext, check_range, last_real
from ..decoding import INF, DecodeStep, Extra
from ..protocol import Selection
from ..scoring import accumulated_scores, group_reduce


ACC = Extra("accumulated_attention", "attention received over every prompt query and every decode step so far")


@dataclass
class H2O(Method):
    """Heavy-Hitter Oracle.

    Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
    NeurIPS 2023 (arXiv 2306.14048). Score of an entry: its accumulated attention over every prompt and then every
    decode query. The budget ``B`` splits into ``B_rec`` recent tokens and ``B - B_rec`` heavy hitters; after each
    decode step the non-recent entry with the smallest score is evicted.

    Parameters
    ----------
    recent_ratio : float
        Share of the budget given to recent tokens (paper: half).
    gqa_reduce : "mean" | "max"
        How the query heads of one KV group combine their scores.
    evict_during_decode : bool
        Keep evicting while decoding, down to the budget.

    CHOICE: see docs/methods/h2o.md (GQA, decode targets, order within a step).
    """

    recent_ratio: float = 0.5
    gqa_reduce: Literal["mean", "max"] = "mean"
    evict_during_decode: bool = True

    name = "h2o"
    summary = "Heavy hitters by accumulated attention + recent window, evicting while decoding (Zhang et al., 2023)"
    needs_decode_probs = True
    extras = (ACC,)

    @property
    def decodes(self) -> bool:  # type: ignore[override]
        return self.evict_during_decode

    @property
    def evicts_while_decoding(self) -> bool:  # type: ignore[override]
        return self.evict_during_decode

    def validate(self) -> None:
        check_range(type(self).__name__, "recent_ratio", self.recent_ratio, 0.0, 1.0)

    def prefill(self, ctx: PrefillContext) -> Selection:
        acc = accumulated_scores(ctx.query, ctx.keys, ctx.scaling, ctx.real)
        acc = group_reduce(acc, ctx.num_kv_heads, self.gqa_reduce)
        k = ctx.budget_tokens
        recent = last_real(ctx.real, torch.ceil(k.double() * self.recent_ratio).long())
        return Selection(self.top(ctx, acc, k, force=recent), extras={ACC.name: acc})

    def decode(self, step: DecodeStep) -> None:
        for g in step.groups():
            acc = g.extra(ACC.name)
            acc += g.received(self.gqa_reduce)
            over = g.over()
            if isinstance(over, int) and over <= 0:
                continue
            # the recent window: a share of what each (row, head) keeps after this eviction
            kept = g.kept_after(over)
            recent = math.ceil(kept * self.recent_ratio) if isinstance(kept, int) else torch.ceil(
                kept.double() * self.recent_ratio).long()
            g.evict(acc.masked_fill(g.newer_than(recent), INF), over)

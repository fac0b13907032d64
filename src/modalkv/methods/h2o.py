"""H2O: heavy hitters (accumulated attention) plus recent tokens, evicting one entry per decode step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .base import Method, PrefillContext, check_range, last_real
from ..cache import Selection
from ..scoring import accumulated_scores, group_reduce


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
        return Selection(self.top(ctx, acc, k, force=recent), extras={"acc": acc})

    def decode(self, layer, probs) -> None:
        for h, store in enumerate(layer.heads):
            p = probs[h]  # [B, G, q, n]
            col = p.amax(1) if self.gqa_reduce == "max" else p.mean(1)
            store.extras["acc"][:, : store.n] += col.sum(1).float()
            over = layer.over_budget(h)
            if isinstance(over, int):  # one sequence, no holes: decided without a device round trip
                if over <= 0:
                    continue
                if over == 1:  # the newest entry is the token just appended (position seen - 1)
                    recent = math.ceil((store.n - 1) * self.recent_ratio)
                    score = store.extras["acc"][0, : store.n].masked_fill(
                        store.pos[0, : store.n] > layer.seen - 1 - recent, float("inf"))
                    store.remove(score.argmin().view(1))
                    continue
                over = torch.tensor([over], device=store.pos.device)
            elif not bool(over.any()):
                continue
            target = layer.decode_targets(h)
            valid = store.valid[:, : store.n]
            recent = torch.ceil(target.double() * self.recent_ratio).long()[:, None]
            pos = store.pos[:, : store.n]
            newest = pos.masked_fill(~valid, -1).amax(-1, keepdim=True)
            is_recent = pos > newest - recent
            store.evict_lowest(store.extras["acc"][:, : store.n].masked_fill(is_recent, float("inf")), over)

"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, PrefillContext, check_range, first_real, last_real
from ..decoding import DecodeStep
from ..protocol import Selection


@dataclass
class StreamingLLM(Method):
    """Keep the first ``n_sink`` tokens and the most recent ones, at prefill and after every decode step.

    Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453).
    The budget ``B`` per (layer, KV head) is ``n_sink`` sinks plus ``B - n_sink`` recent tokens.

    Parameters
    ----------
    n_sink : int
        Number of initial tokens always kept (paper: 4).
    evict_during_decode : bool
        Keep evicting the oldest non-sink entries while decoding (an absolute budget stays fixed, a ratio budget stays
        that ratio of all tokens seen).

    CHOICE: see docs/methods/streaming.md (decode targets, budgets not above ``n_sink``, original positions kept).
    """

    n_sink: int = 4
    evict_during_decode: bool = True

    name = "streamingllm"
    summary = "Attention sinks + most recent tokens (Xiao et al., 2024)"

    @property
    def decodes(self) -> bool:  # type: ignore[override]
        return self.evict_during_decode

    @property
    def evicts_while_decoding(self) -> bool:  # type: ignore[override]
        return self.evict_during_decode

    def validate(self) -> None:
        check_range(type(self).__name__, "n_sink", self.n_sink, 0)

    def check_budget(self, budget) -> None:
        for what, value in (("budget", budget.value), ("decode_budget", budget.decode)):
            if isinstance(value, int) and not isinstance(value, bool) and value <= self.n_sink:
                raise ValueError(f"StreamingLLM: an absolute {what} of {value} tokens leaves no room beside "
                                 f"n_sink={self.n_sink} attention sinks; use a larger {what} or a smaller n_sink")

    def prefill(self, ctx: PrefillContext) -> Selection:
        k = ctx.budget_tokens
        sinks = first_real(ctx.real, torch.minimum((k - 1).clamp(min=0), torch.full_like(k, self.n_sink)))
        recent = last_real(ctx.real, (k - sinks.sum(-1)).clamp(min=0))
        keep = sinks | recent
        scores = keep.float()[:, None, :].expand(-1, ctx.num_kv_heads, -1)
        return Selection(self.top(ctx, scores, k, force=keep))

    def decode(self, step: DecodeStep) -> None:
        for g in step.groups():
            over = g.over()
            if isinstance(over, int) and over <= 0:
                continue
            # the oldest entries after the sinks go; the sinks (the smallest positions) never take the newest
            # token's slot: at most kept - 1 of them
            kept = g.kept_after(over)
            sinks = min(self.n_sink, max(0, kept - 1)) if isinstance(kept, int) else (kept - 1).clamp(0, self.n_sink)
            g.evict(g.pos.float(), over, skip=sinks)

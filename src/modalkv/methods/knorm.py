"""KNorm: keep the keys with the smallest L2 norm, at prefill and while decoding."""

from __future__ import annotations

from dataclasses import dataclass

from ..decoding import DecodeStep, Extra
from ..protocol import Selection
from ..scoring import key_norm_scores
from .base import Method, PrefillContext

KEY_NORM = Extra("key_norm", "L2 norm of the entry's (post-RoPE) key")


@dataclass
class KNorm(Method):
    """Key-norm eviction.

    Paper: Devoto, Zhao, Scardapane, Minervini, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", EMNLP 2024 (arXiv 2406.11430). Keys with a low L2 norm draw high attention, so each (layer, KV
    head) keeps the ``budget`` entries whose keys have the smallest norm; no attention scores are needed.

    Parameters
    ----------
    evict_during_decode : bool
        CHOICE (default true; the paper compresses a given context): after each decode step evict the entries with
        the largest key norm down to the decode targets (as H2O: an absolute budget stays fixed, a ratio budget
        stays that ratio of all tokens seen). False keeps every generated token.

    Notes
    -----
    CHOICE: norms of the cached keys (after RoPE, which preserves norms). Memory: one float32 per kept entry.
    """

    evict_during_decode: bool = True

    name = "knorm"
    summary = "Keep the keys of smallest L2 norm, at prefill and while decoding (Devoto et al., 2024)"
    extras = (KEY_NORM,)

    @property
    def decodes(self) -> bool:  # type: ignore[override]
        return self.evict_during_decode

    @property
    def evicts_while_decoding(self) -> bool:  # type: ignore[override]
        return self.evict_during_decode

    def prefill(self, ctx: PrefillContext) -> Selection:
        score = key_norm_scores(ctx.keys)  # -||k||
        return Selection(self.top(ctx, score, ctx.budget_tokens), extras={KEY_NORM.name: -score})

    def decode(self, step: DecodeStep) -> None:
        for g in step.groups():
            norm = g.extra(KEY_NORM.name)
            keys, _ = g.keys_values()
            norm[..., g.n - step.q :] = keys[:, :, g.n - step.q :].float().norm(dim=-1)  # the new entries
            g.evict(-norm, g.over())

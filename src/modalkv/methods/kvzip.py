"""KVzip: query-agnostic eviction, each KV pair scored by how much the model needs it to reconstruct the context."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch

from .base import Method, PrefillContext, check_range
from ..cache import cache_kwargs
from ..decoding import Extra
from ..layer import CompressedLayer
from ..modality import special_token_modalities
from ..protocol import Selection
from ..scoring import apply_caps, check_finite

SCORE = Extra("kvzip", "the largest attention the entry received from a reconstruction query of its KV group")


@dataclass
class KVzip(Method):
    """Score every cached KV pair by the attention it receives while the model repeats the context, keep the best.

    Paper: Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", NeurIPS 2025
    (arXiv 2505.23416). After the prefill, the model is teacher-forced through the cache on ``repeat_prompt`` and the
    context, chunk by chunk; a pair's importance is the largest attention it receives from a reconstruction query of
    its KV group. Runs in :func:`modalkv.prefill` (about one more forward over the context, counted as compression).

    Parameters
    ----------
    repeat_prompt : str
        Instruction placed after the context before it is repeated (paper: "Repeat the previous context:").
    chunk : int
        Context tokens reconstructed per forward.
    allocation : "global" | "layer" | "head"
        One ranking over the whole cache (the paper), per layer, or the same count per (layer, KV head).
    n_sink : int
        First tokens always kept (0, as the paper).
    images : "reconstruct" | "text"
        How a vision-language context is repeated (with its pixels, or text only).

    CHOICE: see docs/methods/kvzip.md.
    """

    repeat_prompt: str = "Repeat the previous context:"
    chunk: int = 512
    allocation: Literal["global", "layer", "head"] = "global"
    n_sink: int = 0
    images: Literal["reconstruct", "text"] = "reconstruct"

    name = "kvzip"
    summary = "Query-agnostic: pairs scored by attention while the model repeats the context (Kim et al., 2025)"
    needs_context_pass = True  # modalkv.prefill runs finish_prefill (the reconstruction) after the forward
    extras = (SCORE,)

    def validate(self) -> None:
        cls = type(self).__name__
        check_range(cls, "chunk", self.chunk, 1)
        check_range(cls, "n_sink", self.n_sink, 0)
        if not self.repeat_prompt.strip():
            raise ValueError(f"{cls}.repeat_prompt must not be empty")

    @property
    def needs_decode_probs(self) -> bool:  # type: ignore[override]
        return bool(self.__dict__.get("_scoring", False))

    @property
    def decodes(self) -> bool:  # type: ignore[override]
        """Only until the context is scored: decode() then refuses a cache that skipped modalkv.prefill."""
        return not self.__dict__.get("_finished", True)

    # -- the context's forward keeps everything ----------------------------------------------------------------
    def prefill(self, ctx: PrefillContext) -> Selection:
        if ctx.real.shape[0] != 1:
            raise ValueError("kvzip compresses one context at a time (batch 1)")
        self.__dict__["_finished"] = False
        return super().prefill(ctx)

    def after_prefill(self, layer) -> None:
        for store in layer.heads:
            store.add_extra(SCORE.name, 0.0)

    # -- scoring by reconstruction ----------------------------------------------------------------------------
    def decode(self, step) -> None:
        layer, probs = step.layer, [step.probs_of(h) for h in range(len(step.heads))]
        if not self.__dict__.get("_scoring", False):
            raise ValueError("kvzip compresses the context in a scoring pass after its forward: build the context "
                             "with modalkv.prefill(model, cache, input_ids, tokenizer=tokenizer) before generating")
        for h, store in enumerate(layer.heads):
            n_ctx = self.__dict__["_n_ctx"][layer.rank][h]
            best = probs[h][..., :n_ctx].float().amax(dim=(1, 2))  # [B, n_ctx]: over the group and the queries
            score = store.extras[SCORE.name][:, :n_ctx]
            torch.maximum(score, best, out=score)

    def _chunks(self, model, ids: torch.Tensor, prompt: torch.Tensor, model_kwargs: dict):
        """(repeat prompt + context chunk, its model inputs) for every chunk of the context."""
        visual = special_token_modalities(model.config)
        is_visual = torch.zeros_like(ids[0], dtype=torch.bool)
        for token in visual:
            is_visual |= ids[0] == token
        pixels = model_kwargs.get("pixel_values")
        runs = []  # [start, end) of each image's placeholder run, in order
        if bool(is_visual.any()):
            edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), is_visual.to(torch.int8),
                                          torch.zeros(1, dtype=torch.int8)]))
            runs = list(zip((edges == 1).nonzero().view(-1).tolist(), (edges == -1).nonzero().view(-1).tolist()))
        with_pixels = (self.images == "reconstruct" and pixels is not None and runs
                       and pixels.shape[0] == len(runs))
        n, c0 = ids.shape[1], 0
        while c0 < n:
            c1 = min(n, c0 + self.chunk)
            for a, b in runs:  # never split an image
                if a < c1 < b:
                    c1 = b if with_pixels else c1
            piece = ids[:, c0:c1]
            extra = {}
            inside = [i for i, (a, b) in enumerate(runs) if c0 <= a < c1]
            if with_pixels and inside:
                extra["pixel_values"] = pixels[inside[0] : inside[-1] + 1]
            elif runs:  # repeat the text only
                piece = piece[:, ~is_visual[c0:c1]]
            if piece.shape[1]:
                yield torch.cat([prompt.to(ids.device), piece], 1), extra
            c0 = c1

    @torch.no_grad()
    def finish_prefill(self, cache, model, input_ids: torch.Tensor, tokenizer=None, select: bool = True,
                       **model_kwargs) -> None:
        """Reconstruct the context through the cache, chunk by chunk, then keep the best-scored pairs.

        With ``select=False`` the scores are left in the cache's entries and nothing is evicted: call
        :meth:`select` later (e.g. on several ``cache.fork()`` copies with different budgets — the scores do not
        depend on the budget)."""
        if tokenizer is None:
            raise ValueError("kvzip builds its reconstruction prompt with the tokenizer: call "
                             "modalkv.prefill(model, cache, input_ids, tokenizer=tokenizer)")
        layers = cache.managed_layers
        if input_ids.shape[0] != 1:
            raise ValueError("kvzip compresses one context at a time (batch 1)")
        prompt = tokenizer(self.repeat_prompt, add_special_tokens=False, return_tensors="pt").input_ids
        ids = input_ids.to(prompt.device)  # everything the cache has seen (a later chat turn: the whole history)
        if ids.shape[1] != layers[0].seen:
            raise ValueError(f"kvzip: input_ids has {ids.shape[1]} tokens but the cache has seen {layers[0].seen}")
        for layer in layers:
            for store in layer.heads:
                store.extras[SCORE.name][:, : store.n] = 0.0
        self.__dict__["_n_ctx"] = {layer.rank: [s.n for s in layer.heads] for layer in layers}
        start = layers[0].seen
        others = {i: copy.deepcopy(layer) for i, layer in enumerate(cache.layers) if not isinstance(layer, CompressedLayer)}
        kw = cache_kwargs(model, cache)
        core = cache.core_decode_eviction
        cache.core_decode_eviction = None  # nothing is evicted while scoring
        self.__dict__["_scoring"] = True
        try:
            for piece, extra in self._chunks(model, ids, prompt, model_kwargs):
                q = piece.shape[1]
                pos = torch.arange(start, start + q, device=piece.device)[None]
                model(input_ids=piece, position_ids=pos, **extra, **kw)
                for layer in layers:  # drop the reconstruction's own entries
                    for store in layer.heads:
                        store.n -= q
                    layer.seen -= q
                for i, layer in others.items():  # sliding-window layers: back to the context's window
                    cache.layers[i] = copy.deepcopy(layer)
        finally:
            self.__dict__["_scoring"] = False
            cache.core_decode_eviction = core
        if select:
            self.select(cache)
        self.__dict__["_finished"] = True

    def select(self, cache) -> None:
        """Keep the best-scored pairs of a scored cache under ``cache.budget`` (the allocation's grouping)."""
        layers = cache.managed_layers
        first = layers[0]
        real = first.prompt_real + (first.seen - first.prompt_len)  # [1] every real token seen
        per_head = cache.budget.tokens(real)  # [1] entries per (layer, head)
        H = len(first.heads)
        L = len(layers)
        width = max(s.n for layer in layers for s in layer.heads)
        scores = torch.full((L, H, width), float("-inf"))
        for li, layer in enumerate(layers):
            for h, store in enumerate(layer.heads):
                s = store.extras[SCORE.name][0, : store.n].float()
                check_finite(s, self.name)
                s = s.masked_fill(~store.valid[0, : store.n], float("-inf"))
                if self.n_sink:
                    rank = store.pos[0, : store.n].argsort().argsort()
                    s = s.masked_fill(rank < self.n_sink, float("inf"))
                scores[li, h, : store.n] = s
        if cache.budget.modality_caps:  # each head's cap over its own entries (all of the prompt's, before selection)
            for li, layer in enumerate(layers):
                for h, store in enumerate(layer.heads):
                    mod = store.mod[:, : store.n]
                    caps = cache.budget.caps(mod, store.valid[:, : store.n])
                    scores[li, h, : store.n] = apply_caps(scores[li, h, None, None, : store.n], mod, caps)[0, 0]
        # every (layer, head) keeps its best entry; the rest of the budget goes by allocation
        best = scores.argmax(-1)
        keep = torch.zeros(L, H, width, dtype=torch.bool)
        keep.scatter_(-1, best[..., None], True)
        k = int(per_head[0])
        if self.allocation == "head":
            groups = scores.view(L * H, width)
            counts = torch.full((L * H,), k)
        elif self.allocation == "layer":
            groups = scores.view(L, H * width)
            counts = torch.full((L,), k * H)
        else:
            groups = scores.view(1, L * H * width)
            counts = torch.full((1,), k * H * L)
        flat_keep = keep.view(groups.shape)
        for g in range(groups.shape[0]):
            room = int(counts[g]) - int(flat_keep[g].sum())
            if room <= 0:
                continue
            s = groups[g].masked_fill(flat_keep[g], float("-inf"))
            m = min(room, int((s > float("-inf")).sum()))
            if m:
                flat_keep[g, s.topk(m).indices] = True
        for li, layer in enumerate(layers):
            for h, store in enumerate(layer.heads):
                slots = keep[li, h, : store.n].nonzero().view(1, -1)
                store.keep_slots(slots)
                store.shrink(cache.reserve)
            layer.prefill_kept = [s.valid[:, : s.n].sum(-1) for s in layer.heads]
            layer.prompt_real = layer.prompt_real + (layer.seen - layer.prompt_len)
            layer.prompt_len = layer.seen  # the compressed history is the new prompt
            layer._row_targets = None

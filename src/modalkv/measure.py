"""Timing and memory measurement shared by the CLI and the benchmarks.

Decoding is timed with a hand-written greedy loop (one forward per token, no sampling machinery) so that the
per-token time is the model's and the cache's, not ``generate``'s bookkeeping.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from .cache import KVCache, cache_kwargs


def pin_threads(n: int | None) -> int:
    """Pin torch's intra-op threads (and the BLAS env defaults for child processes). Returns the count in use."""
    if n:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(n)
        torch.set_num_threads(n)
    return torch.get_num_threads()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count of this process (Linux: ``5`` into ``/proc/self/clear_refs``), so that
    :func:`window_peak_rss_bytes` measures one phase alone. Returns False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def window_peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (Linux ``VmHWM``); elsewhere the process peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def cache_bytes(cache) -> dict:
    """``memory_report()`` of a modalkv cache, or the same fields for a transformers cache (nothing evicted)."""
    if isinstance(cache, KVCache):
        return cache.memory_report()
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return {
        "full_bytes": total, "kept_bytes": total, "payload_bytes": total, "meta_bytes": 0,
        "allocated_bytes": total, "compression_ratio": 1.0, "tokens_seen": cache.get_seq_length(),
    }


@dataclass
class GenResult:
    tokens: list[list[int]]  # generated ids per batch row (stopped at EOS, EOS excluded)
    prefill_s: float
    step_ms: list[float] = field(default_factory=list)  # wall time of each decode step after the first token

    @property
    def decode_ms(self) -> float:
        """Median decode step time (ms/token); NaN when fewer than two tokens were generated."""
        return statistics.median(self.step_ms) if self.step_ms else float("nan")


@torch.no_grad()
def greedy_generate(model, input_ids, attention_mask, cache, max_new_tokens: int, eos_ids=(), **prefill_kwargs) -> GenResult:
    """Greedy decoding with a timed prefill and timed decode steps (the first generated token comes from prefill).
    ``prefill_kwargs`` go to the prompt's forward only (a VLM's ``pixel_values``)."""
    eos = set(int(e) for e in eos_ids)
    B, n = input_ids.shape
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    kw = cache_kwargs(model, cache)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kw,
                **prefill_kwargs)
    prefill_s = time.perf_counter() - t0
    next_ids = out.logits[:, -1].argmax(-1)
    tokens: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    step_ms: list[float] = []
    last_pos = positions[:, -1]
    for step in range(max_new_tokens):
        for b in range(B):
            if not done[b]:
                t = int(next_ids[b])
                if t in eos:
                    done[b] = True
                else:
                    tokens[b].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=-1)
        last_pos = last_pos + 1
        t0 = time.perf_counter()
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=last_pos[:, None], use_cache=True, **kw)
        next_ids = out.logits[:, -1].argmax(-1)
        step_ms.append((time.perf_counter() - t0) * 1e3)
    return GenResult(tokens, prefill_s, step_ms)

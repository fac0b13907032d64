"""A memo for the O(n^2) accumulated attention scores while one captured prefill is replayed many times.

The benchmark builds every method's cache at every budget from one captured prefill (:mod:`modalkv.replay`), so H2O,
LOOK-M and HAE would otherwise recompute the same column sums once per budget. :class:`ScoreMemo` remembers them per
query tensor object; :meth:`ScoreMemo.active` installs it for :func:`modalkv.scoring.accumulated_scores`.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from contextlib import contextmanager

import torch

from ..scoring import accumulated_memo


class ScoreMemo:
    """Accumulated scores per query tensor, keyed by ``id()`` and confirmed by weak references and version counters
    (a dict keyed by tensors would compare them with ``==``). An entry dies with its query tensor, the memo holds at
    most ``size`` entries (oldest dropped first), and every hit is returned as a copy (callers may modify it)."""

    def __init__(self, size: int = 256):
        self.size = size
        self.entries: OrderedDict[int, tuple] = OrderedDict()

    def __call__(self, compute, query, keys, scaling: float, real, chunk: int) -> torch.Tensor:
        tensors = (query, keys, real)
        stamp = (float(scaling), chunk, tuple(t._version for t in tensors))
        hit = self.entries.get(id(query))
        if hit is not None:
            refs, stamp0, cached = hit
            if all(r() is t for r, t in zip(refs, tensors)) and stamp0 == stamp:
                return cached.clone()
        out = compute(query, keys, scaling, real, chunk)
        self.entries[id(query)] = (tuple(weakref.ref(t) for t in tensors), stamp, out)
        weakref.finalize(query, self.entries.pop, id(query), None)  # the entry dies with its query (no stale scores)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return out.clone()

    @contextmanager
    def active(self):
        """Use this memo for every accumulated-score computation inside the ``with`` block."""
        token = accumulated_memo.set(self)
        try:
            yield self
        finally:
            accumulated_memo.reset(token)

"""Beam search and batch replication move every per-row piece of a cache: reordering the rows of a prefilled cache
(``reorder_cache``, ``batch_select_indices``) or repeating them (``batch_repeat_interleave``) and then decoding gives
the same logits as a cache prefilled in that row order in the first place — for every method, including the state
methods keep outside the head stores (HAE's sink limits, RetentiveKV's memories, Spherical KV's query norms)."""

import pytest
import torch

from helpers import SMALL, left_pad, prompt, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.methods import REGISTRY

# per-row state outside the stores is what these tests are about: make the methods keep some
PARAMS = {
    **{name: dict(SMALL.get(name, {})) for name in REGISTRY},
    "retentivekv": {"window": 4, "n_sink": 2, "tau": 0.0, "states_in_budget": False},  # the states absorb tokens
    "sphericalkv": {"window": 8, "n_sink": 2, "recent": 8, "refresh": 2, "page_size": 16, "calib_tokens": 256},
}
METHODS = [name for name in REGISTRY if not getattr(REGISTRY[name], "needs_context_pass", False)]
STEPS = 6


def _cache(model, method):
    return KVCache(model, method, 1.0 if method == "full" else 0.4, **PARAMS[method])


@torch.no_grad()
def _decode(model, cache, ids, mask, order=None, repeats=None, steps=STEPS):
    """Prefill ``ids``; optionally reorder/repeat the cache's rows; then greedy-decode ``steps`` tokens.
    Returns the decode logits [B, steps, V]."""
    out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
    nxt = out.logits[:, -1:].argmax(-1)
    if order is not None:
        cache.reorder_cache(order)
        mask, nxt = mask[order], nxt[order]
    if repeats is not None:
        cache.batch_repeat_interleave(repeats)
        mask, nxt = mask.repeat_interleave(repeats, 0), nxt.repeat_interleave(repeats, 0)
    logits = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        out = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(model, cache))
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits, 1)


@pytest.mark.parametrize("method", METHODS)
def test_reordered_cache_decodes_as_if_prefilled_in_that_order(method):
    model = tiny_llama()
    a, b = prompt(40, seed=3)[0], prompt(29, seed=4)[0]  # different lengths: the rows' padding and sinks differ
    ids, mask = left_pad([a, b])
    got = _decode(model, _cache(model, method), ids, mask, order=torch.tensor([1, 0]))
    ids_r, mask_r = left_pad([b, a])
    want = _decode(model, _cache(model, method), ids_r, mask_r)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["hae", "retentivekv", "sphericalkv", "snapkv"])
def test_repeated_cache_decodes_as_if_prefilled_repeated(method):
    model = tiny_llama()
    a, b = prompt(40, seed=3)[0], prompt(29, seed=4)[0]
    ids, mask = left_pad([a, b])
    got = _decode(model, _cache(model, method), ids, mask, repeats=2)
    ids_r, mask_r = left_pad([a, a, b, b])
    want = _decode(model, _cache(model, method), ids_r, mask_r)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_batch_size_follows_the_rows():
    model = tiny_llama()
    cache = KVCache(model, "snapkv", 0.5, window=4, kernel=3)
    assert cache.batch_size is None
    ids, mask = left_pad([prompt(20, seed=3)[0], prompt(12, seed=4)[0]])
    modality = torch.zeros(2, 20, dtype=torch.int8)
    modality[1, 10:14] = 1  # row 1 holds image tokens
    cache.set_modality(modality)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
    cache.batch_repeat_interleave(3)
    assert cache.batch_size == 6
    cache.batch_select_indices(torch.tensor([5, 0]))
    assert cache.batch_size == 2
    # the per-row modality ids moved with the rows (new tokens' ids are read from them while decoding)
    assert torch.equal(cache.modality_slice(0, 20, 2, "cpu"), modality[[1, 0]])

"""Short soaks (the long ones: benchmarks/soak.py): memory stays flat over a long decode, and a server's caches are
freed as soon as a request ends, without the cyclic garbage collector."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from helpers import VOCAB, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.methods.kivi import KIVI

PROMPT, BUDGET, DECODE_BUDGET = 64, 16, 24

# name -> (method, KVCache keywords, the most entries a (layer, KV head) may hold while decoding)
SOAKS = {
    "streamingllm": ("streamingllm", {"n_sink": 2}, BUDGET),
    "h2o": ("h2o", {}, BUDGET),
    "snapkv+decode_budget": ("snapkv", {"window": 4, "kernel": 3, "decode_budget": DECODE_BUDGET}, DECODE_BUDGET),
    # a residual and group small enough that H2O evicts from quantized groups (holes), repacked every 4 holes
    "h2o+kivi-4": ("h2o", {"quantize": KIVI(bits=4, group_size=4, residual=4)}, BUDGET),
}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


def max_entries(cache) -> int:
    return max(int(s.valid[:, : s.n].sum(-1).max()) for layer in cache.managed_layers for s in layer.heads)


@torch.no_grad()
def soak(model, cache, steps: int, every: int = 100) -> list[tuple[int, int, int]]:
    """Greedy decode ``steps`` tokens after a random prompt: (step, allocated bytes, most entries) every ``every``."""
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    token = model(input_ids=ids, **cache_kwargs(model, cache)).logits[:, -1].argmax(-1)
    samples = []
    for step in range(1, steps + 1):
        pos = torch.tensor([[PROMPT + step - 1]])
        token = model(input_ids=token[:, None], position_ids=pos, **cache_kwargs(model, cache)).logits[:, -1].argmax(-1)
        if step % every == 0:
            samples.append((step, cache.memory_report()["allocated_bytes"], max_entries(cache)))
    return samples


@pytest.mark.parametrize("name", list(SOAKS))
def test_allocated_bytes_flat_over_a_long_decode(model, name):
    method, kwargs, bound = SOAKS[name]
    cache = KVCache(model, method, BUDGET, **kwargs)
    samples = soak(model, cache, 2000)
    assert all(entries <= bound for _, _, entries in samples), samples
    # the stores grow once (the decode-time appends fill the reserve) and then never again
    warm = [alloc for step, alloc, _ in samples if step >= 300]
    assert warm and all(alloc == warm[0] for alloc in warm), f"allocated bytes moved after step 300: {samples}"
    assert cache.managed_layers[0].seen == PROMPT + 2000


@torch.no_grad()
def test_sequential_requests_free_their_caches_without_the_garbage_collector(model):
    """A server's loop: a new cache per request, generate, drop it. With the cyclic GC off, reference counting alone
    must free the cache and its stores at once (no cycle through layers or method), whatever the method."""
    g = torch.Generator().manual_seed(4)
    names = list(SOAKS)
    allocated = []
    gc.collect()
    gc.disable()
    try:
        for r in range(30):
            method, kwargs, _ = SOAKS[names[r % len(names)]]
            ids = torch.randint(0, VOCAB, (1, int(torch.randint(100, 201, (1,), generator=g))), generator=g)
            cache = KVCache(model, method, BUDGET, **kwargs)
            model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                           **cache_kwargs(model, cache))
            allocated.append(cache.memory_report()["allocated_bytes"])
            refs = [weakref.ref(cache), weakref.ref(cache.method), weakref.ref(cache.managed_layers[0]),
                    weakref.ref(cache.managed_layers[0].heads[0])]
            del cache
            assert [ref() is None for ref in refs] == [True] * 4, f"request {r}: the cache outlived its request"
    finally:
        gc.enable()
    # every request of one configuration holds the same bytes whatever its prompt length (budgets are absolute)
    for i in range(len(names)):
        assert len(set(allocated[i :: len(names)])) == 1, allocated

"""Eviction is exact: a compressed cache gives the logits of the full cache with the evicted positions masked."""

import pytest
import torch
from transformers import DynamicCache

from helpers import EVICTING, SMALL, Recorder, left_pad, masked_reference, prompt, run_steps, tiny_gemma3, tiny_llama
from modalkv import KVCache

STEPS = 8


@pytest.mark.parametrize("budget", [0.5, 0.25])
@pytest.mark.parametrize("method", EVICTING)
def test_eviction_equals_masked_full_cache(method, budget, impl):
    model = tiny_llama(impl)
    ids = prompt(48)
    cache = KVCache(model, method, budget, **SMALL[method])
    with Recorder() as rec:
        got, fed = run_steps(model, ids, None, cache, STEPS)
    want = masked_reference(model, ids, None, rec.records, fed)
    unmasked = masked_reference(model, ids, None, None, fed)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4
    # the check has teeth: eviction really changed the logits relative to the unmasked full cache
    assert max(float((g - u).abs().max()) for g, u in zip(got, unmasked)) > 1e-2
    # and something was really evicted in every managed layer
    for layer in cache.managed_layers:
        assert all(s.count() < layer.seen for s in layer.heads)


@pytest.mark.parametrize("method", EVICTING)
def test_left_padded_batch_is_exact(method, impl):
    model = tiny_llama(impl)
    ids, mask = left_pad([prompt(40, seed=2)[0], prompt(29, seed=3)[0]])
    cache = KVCache(model, method, 0.5, **SMALL[method])
    with Recorder() as rec:
        got, fed = run_steps(model, ids, mask, cache, STEPS)
    want = masked_reference(model, ids, mask, rec.records, fed)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["full", *EVICTING])
def test_budget_one_equals_dynamic_cache(method, impl):
    model = tiny_llama(impl)
    ids = prompt(40)
    params = {k: v for k, v in SMALL.get(method, {}).items()}
    got, fed = run_steps(model, ids, None, KVCache(model, method, 1.0, **params), STEPS)
    want, _ = run_steps(model, ids, None, DynamicCache(config=model.config), STEPS, feed=fed)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_gemma3_sliding_layers_untouched_and_exact(method, impl):
    model = tiny_gemma3(impl)
    ids = prompt(40)
    cache = KVCache(model, method, 0.5, **SMALL[method])
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds[1] == kinds[3] == "CompressedLayer"
    assert kinds[0] == kinds[2] != "CompressedLayer"
    with Recorder() as rec:
        got, fed = run_steps(model, ids, None, cache, STEPS)
    want = masked_reference(model, ids, None, rec.records, fed)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4
    # the sliding layers are transformers' own: the first holds exactly what a DynamicCache run holds (later
    # ones see hidden states changed by the eviction below them), and all keep transformers' window length
    ref = DynamicCache(config=model.config)
    run_steps(model, ids, None, ref, STEPS, feed=fed)
    assert torch.equal(cache.layers[0].keys, ref.layers[0].keys)
    assert torch.equal(cache.layers[0].values, ref.layers[0].values)
    assert cache.layers[2].keys.shape == ref.layers[2].keys.shape
    assert type(cache.layers[2]) is type(ref.layers[2])


def test_gemma3_budget_one_equals_dynamic_cache(impl):
    model = tiny_gemma3(impl)
    ids = prompt(40)
    got, fed = run_steps(model, ids, None, KVCache(model, "full", 1.0), STEPS)
    want, _ = run_steps(model, ids, None, DynamicCache(config=model.config), STEPS, feed=fed)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5

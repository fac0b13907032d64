"""The cache contract (KVCache, CompressedLayer, HeadStore): the transformers layer methods, positions that continue
after prefill, the per-head budget, the memory report, reset and fork."""

import pytest
import torch

from helpers import prompt, run_steps, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv import attention
from modalkv.cache import CompressedLayer

REPORT_KEYS = {"full_bytes", "kept_bytes", "payload_bytes", "meta_bytes", "state_bytes", "shared_bytes",
               "allocated_bytes", "compression_ratio", "tokens_seen", "tokens_kept", "entries_kept"}


@torch.no_grad()
def _prefill(model, cache, n=40, batch=2):
    ids = prompt(n, batch=batch)
    return model(input_ids=ids, **cache_kwargs(model, cache)).logits[:, -1]


@torch.no_grad()
def _step(model, cache, token=5, batch=2):
    ids = torch.full((batch, 1), token)
    return model(input_ids=ids, **cache_kwargs(model, cache)).logits[:, -1]


def test_layer_contract_seq_length_and_mask_sizes():
    model = tiny_llama()
    cache = KVCache(model, "snapkv", 0.5, window=4)
    layers = cache.managed_layers
    assert len(layers) == 3 and all(isinstance(layer, CompressedLayer) for layer in layers)
    assert cache.get_seq_length() == 0 and all(layer.heads is None for layer in layers)
    _prefill(model, cache, n=40)
    # the sequence length counts every token seen, not the entries kept
    assert cache.get_seq_length() == 40 and all(layer.get_seq_length() == 40 for layer in layers)
    # the mask transformers builds covers only the new tokens; stored entries are masked by their own validity
    assert layers[0].get_mask_sizes(1) == (1, 40) and layers[0].get_mask_sizes(3) == (3, 40)
    _step(model, cache)
    assert cache.get_seq_length() == 41 and layers[0].get_mask_sizes(1) == (1, 41)


def test_update_returns_the_new_states_and_appends_them_to_every_head():
    model = tiny_llama()
    cache = KVCache(model, "full")
    _prefill(model, cache, n=10)
    layer = cache.managed_layers[1]
    k = torch.randn(2, 2, 1, 16)
    v = torch.randn(2, 2, 1, 16)
    out_k, out_v = layer.update(k, v)
    assert out_k is k and out_v is v and layer.seen == 11
    for h, store in enumerate(layer.heads):
        keys, values = store.kv()
        assert store.n == 11 and torch.equal(keys[:, -1], k[:, h, 0]) and torch.equal(values[:, -1], v[:, h, 0])
        assert store.pos[:, 10].tolist() == [10, 10]
    attention.take_unread()  # no attention read this layer: leave no stale handshake for the next test


def test_positions_continue_after_a_compressed_prefill():
    model = tiny_llama()
    cache = KVCache(model, "snapkv", 0.25, window=4)
    _prefill(model, cache, n=40)
    for t in range(3):
        _step(model, cache, token=7 + t)
    for layer in cache.managed_layers:
        for store in layer.heads:
            pos = store.pos[:, : store.n]
            assert store.n == 10 + 3
            assert (pos[:, :10] < 40).all()  # the kept prompt entries keep their original positions
            assert pos[:, 10:].tolist() == [[40, 41, 42]] * 2  # generated tokens continue after the whole prompt
            assert len(set(pos[0].tolist())) == store.n


@pytest.mark.parametrize("budget, kept", [(0.25, 10), (12, 12), (1.0, 40), (100, 40)])
def test_budget_of_a_fresh_cache(budget, kept):
    model = tiny_llama()
    cache = KVCache(model, "snapkv", budget, window=4)
    assert cache.budget.value == budget
    report = cache.memory_report()
    assert report["kept_bytes"] == 0 and report["entries_kept"] == 0 and report["tokens_seen"] == 0
    _prefill(model, cache, n=40)
    for layer in cache.managed_layers:
        assert [store.count() for store in layer.heads] == [2 * kept, 2 * kept]  # per row and KV head
        assert layer.budget_entries() == 2 * 2 * kept


def test_memory_report_keys_and_sums():
    model = tiny_llama()
    cache = KVCache(model, "h2o", 16)
    _prefill(model, cache, n=40)
    _step(model, cache)
    report = cache.memory_report()
    assert set(report) == REPORT_KEYS
    stores = [store for layer in cache.managed_layers for store in layer.heads]
    payload = sum(store.bytes()["payload"] for store in stores)
    meta = sum(store.bytes()["meta"] for store in stores)
    assert report["payload_bytes"] == payload and report["meta_bytes"] == meta
    assert report["kept_bytes"] == payload + meta + report["state_bytes"]
    assert report["state_bytes"] == 0  # H2O keeps no state outside its entries
    # 16 entries per (row, layer, KV head), dense float32 keys and values of 16 dims
    assert payload == 3 * 2 * 2 * 16 * (16 + 16) * 4
    assert report["full_bytes"] == 3 * 2 * 2 * 41 * (16 + 16) * 4  # what a DynamicCache would hold for 41 tokens
    assert report["tokens_seen"] == 41 and report["entries_kept"] == 3 * 2 * 2 * 16
    assert report["compression_ratio"] == report["full_bytes"] / report["kept_bytes"]
    assert report["allocated_bytes"] >= report["kept_bytes"]


def test_reset_empties_the_cache_for_a_new_prompt():
    model = tiny_llama()
    cache = KVCache(model, "snapkv", 0.5, window=4)
    _prefill(model, cache, n=40)
    _step(model, cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and all(layer.heads is None for layer in cache.managed_layers)
    assert cache.memory_report()["kept_bytes"] == 0
    # the reset cache behaves exactly as a fresh one
    again, _ = run_steps(model, prompt(30, seed=3, batch=2), None, cache, 3)
    fresh, _ = run_steps(model, prompt(30, seed=3, batch=2), None, KVCache(model, "snapkv", 0.5, window=4), 3)
    for a, b in zip(again, fresh):
        assert torch.equal(a, b)


def test_fork_is_independent():
    model = tiny_llama()
    cache = KVCache(model, "h2o", 16)
    twin = KVCache(model, "h2o", 16)
    _prefill(model, cache)
    _prefill(model, twin)
    fork = cache.fork()
    before = [store.pos[:, : store.n].clone() for layer in cache.managed_layers for store in layer.heads]
    for t in range(4):  # the fork evicts and grows ...
        _step(model, fork, token=t)
    assert fork.get_seq_length() == 44 and cache.get_seq_length() == 40
    after = [store.pos[:, : store.n] for layer in cache.managed_layers for store in layer.heads]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # ... the original does not move
    assert all(layer.cache is fork for layer in fork.managed_layers)
    # and the original continues exactly as a cache that was never forked
    assert torch.equal(_step(model, cache, token=9), _step(model, twin, token=9))

"""Budgets, positions, per-head memory, determinism, batching: the cache's invariants on tiny models."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from helpers import EVICTING, SMALL, left_pad, prompt, run_steps, tiny_gemma3, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.methods.pyramidkv import pyramid_budgets
from modalkv.scoring import largest_remainder, select_topk


def kept_positions(cache):
    """{(layer, head): sorted list of valid positions} per batch row 0."""
    out = {}
    for layer in cache.managed_layers:
        for h, s in enumerate(layer.heads):
            p = s.pos[0, : s.n][s.valid[0, : s.n]]
            out[layer.layer_idx, h] = sorted(p.tolist())
    return out


@pytest.mark.parametrize("method", EVICTING)
@pytest.mark.parametrize("budget", [0.25, 0.5, 10])
def test_prefill_keeps_at_most_the_budget(method, budget):
    model = tiny_llama()
    n = 60
    cache = KVCache(model, method, budget, **SMALL[method])
    with torch.no_grad():
        model(prompt(n), **cache_kwargs(model, cache))
    k = math.ceil(n * budget) if isinstance(budget, float) else budget
    counts = {key: len(v) for key, v in kept_positions(cache).items()}
    L, H = cache.num_managed, 2
    if method == "madakv":  # per-head and per-layer counts, exactly the global total
        assert sum(counts.values()) == L * H * k
        assert len(set(counts.values())) > 1
    elif method == "pyramidkv":  # per-layer budgets, same total
        assert sum(counts.values()) == L * H * k
        per_layer = [counts[l, 0] for l in range(L)]
        assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > per_layer[-1]
    elif method == "adakv":  # per-head budgets, same total per layer, and stores of different sizes
        for l in range(L):
            assert counts[l, 0] + counts[l, 1] == H * k
        assert any(counts[l, 0] != counts[l, 1] for l in range(L))
        for layer in cache.managed_layers:  # the store itself is that small: memory freed per head
            for s in layer.heads:
                assert s.n == s.count()
    else:
        assert all(c == k for c in counts.values())


def test_adakv_frees_memory_per_head():
    model = tiny_llama()
    cache = KVCache(model, "adakv", 0.25, reserve=0, **SMALL["adakv"])
    with torch.no_grad():
        model(prompt(80), **cache_kwargs(model, cache))
    rep = cache.memory_report()
    per_entry = 2 * 16 * 4  # K + V, head_dim 16, fp32
    assert rep["payload_bytes"] == rep["entries_kept"] * per_entry
    kv_alloc = sum(s.keys.numel() * 4 + s.values.numel() * 4 for l in cache.managed_layers for s in l.heads)
    assert kv_alloc == rep["payload_bytes"]  # nothing padded to the largest head
    assert rep["entries_kept"] == 3 * 2 * 20


@pytest.mark.parametrize("method", ["streamingllm", "h2o"])
def test_decode_eviction_holds_budget(method):
    model = tiny_llama()
    cache = KVCache(model, method, 12, **SMALL[method])  # absolute budget: a fixed-size streaming cache
    run_steps(model, prompt(40), None, cache, 10)
    for layer in cache.managed_layers:
        for s in layer.heads:
            assert s.count() == 12
    assert cache.get_seq_length() == 50
    ratio = KVCache(model, method, 0.25, **SMALL[method])  # a ratio budget stays a ratio of what was seen
    run_steps(model, prompt(40), None, ratio, 20)
    for layer in ratio.managed_layers:
        for s in layer.heads:
            assert s.count() == math.ceil(0.25 * 60)


def test_streamingllm_keeps_sinks_and_recent():
    model = tiny_llama()
    cache = KVCache(model, "streamingllm", 10, n_sink=4)
    run_steps(model, prompt(40), None, cache, 5)
    for pos in kept_positions(cache).values():
        assert pos == [0, 1, 2, 3] + list(range(39, 45))


def test_snapkv_keeps_window():
    model = tiny_llama()
    cache = KVCache(model, "snapkv", 0.25, window=6)
    with torch.no_grad():
        model(prompt(40), **cache_kwargs(model, cache))
    for pos in kept_positions(cache).values():
        assert pos[-6:] == list(range(34, 40)) and len(pos) == 10


def test_positions_continue_and_seq_length_is_true_count():
    model = tiny_llama()
    ids = prompt(30)
    cache = KVCache(model, "snapkv", 0.5, window=4)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 30 + 6 - 1  # the last generated token is not fed back
    # generate's positions (from the attention mask) and the hand-written loop's agree token for token
    again = KVCache(model, "snapkv", 0.5, window=4)
    _, fed = run_steps(model, ids, None, again, 5)
    assert torch.equal(torch.stack(fed, 1), out[:, 30:35])


def test_multi_token_chunk_after_prefill():
    """A second chunk of several tokens is appended uncompressed and attends causally (== masked reference)."""

    model = tiny_llama()
    ids = prompt(44)
    cache = KVCache(model, "snapkv", 0.5, window=4)
    with torch.no_grad():
        model(ids[:, :36], **cache_kwargs(model, cache))
        got = model(ids[:, 36:], position_ids=torch.arange(36, 44)[None], **cache_kwargs(model, cache)).logits
    assert cache.get_seq_length() == 44
    kept = {k: set(v) for k, v in kept_positions(cache).items()}
    assert all(set(range(36, 44)) <= v for v in kept.values())
    # reference: full cache, each head restricted to its kept prompt entries plus the causal chunk
    from transformers import DynamicCache
    import helpers

    ref = helpers.clone_model(model, "masked_ref")
    vis = {}
    for layer in cache.managed_layers:
        m = torch.zeros(1, 2, 44, dtype=torch.bool)
        for h in range(2):
            m[0, h, sorted(kept[layer.layer_idx, h])] = True
        vis[layer.layer_idx] = m
    c = DynamicCache(config=ref.config)
    helpers._REF.update(step=0, records=None)
    with torch.no_grad():
        ref(ids[:, :36], **cache_kwargs(ref, c))
        helpers._REF.update(step=1, records=[vis])
        try:
            want = ref(ids[:, 36:], position_ids=torch.arange(36, 44)[None], **cache_kwargs(ref, c)).logits
        finally:
            helpers._REF.update(step=0, records=None)
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["full", *EVICTING])
def test_left_padded_batch_matches_singles(method):
    model = tiny_llama()
    a, b = prompt(40, seed=4)[0], prompt(27, seed=5)[0]
    ids, mask = left_pad([a, b])
    budget = 1.0 if method == "full" else 0.5
    batch_logits, batch_fed = run_steps(model, ids, mask, KVCache(model, method, budget, **SMALL.get(method, {})), 6)
    for row, single in enumerate((a, b)):
        logits, fed = run_steps(model, single[None], None, KVCache(model, method, budget, **SMALL.get(method, {})), 6)
        assert [int(t[0]) for t in fed] == [int(t[row]) for t in batch_fed]
        for g, w in zip(logits, batch_logits):
            assert (g[0] - w[row]).abs().max() < 1e-4


@pytest.mark.parametrize("method", EVICTING)
def test_deterministic(method):
    runs = []
    for _ in range(2):
        model = tiny_llama(seed=3)
        cache = KVCache(model, method, 0.3, **SMALL[method])
        logits, fed = run_steps(model, prompt(50, seed=9), None, cache, 4)
        runs.append((kept_positions(cache), torch.stack(logits)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_memory_really_freed():
    model = tiny_llama()
    n = 400
    cache = KVCache(model, "snapkv", 0.25, window=8, reserve=0)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt(n), **cache_kwargs(model, cache))
        model(prompt(n), **cache_kwargs(model, full))
    rep = cache.memory_report()
    dense = sum(l.keys.numel() * 4 + l.values.numel() * 4 for l in full.layers)
    assert rep["full_bytes"] == dense
    # the tensors the cache holds scale with what it kept, not with the prompt
    assert rep["allocated_bytes"] == rep["kept_bytes"]
    assert rep["payload_bytes"] == dense // 4
    assert 3.5 < rep["compression_ratio"] <= 4.0  # 4x on K/V, less the per-entry metadata
    assert rep["tokens_seen"] == n and rep["tokens_kept"] == n // 4


def test_gemma3_budget_counts_only_full_layers():
    model = tiny_gemma3()
    cache = KVCache(model, "snapkv", 0.25, window=4)
    assert cache.num_managed == 2
    with torch.no_grad():
        model(prompt(40), **cache_kwargs(model, cache))
    assert all(len(v) == 10 for v in kept_positions(cache).values())


# --- properties of the shared selection helpers ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 40), st.data())
def test_select_topk_properties(B, H, n, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    scores = torch.rand(B, H, n, generator=g)
    pad = data.draw(st.lists(st.integers(0, n - 1), min_size=B, max_size=B))
    real = torch.arange(n)[None, :] >= torch.tensor(pad)[:, None]
    n_real = real.sum(-1)
    k = torch.minimum(torch.tensor(data.draw(st.lists(st.integers(1, n), min_size=B, max_size=B))), n_real)
    idx = select_topk(scores, k, real)
    for b in range(B):
        for h in range(H):
            row = idx[b, h]
            chosen = row[row >= 0]
            assert len(chosen) == int(k[b])
            assert torch.equal(chosen, chosen.sort().values) and len(set(chosen.tolist())) == len(chosen)
            assert bool(real[b, chosen].all())  # padding never selected
            assert bool((row[len(chosen):] == -1).all())  # unused slots trail
            # they are the best real scores
            best = scores[b, h].masked_fill(~real[b], -1).topk(int(k[b])).values.min()
            assert bool((scores[b, h, chosen] >= best).all())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=12), st.integers(0, 500))
def test_largest_remainder_sums_exactly(weights, total):
    w = torch.tensor([weights], dtype=torch.float64) + 1e-3
    shares = largest_remainder(w, torch.tensor([total]))
    assert int(shares.sum()) == total and bool((shares >= 0).all())
    exact = w / w.sum() * total
    assert bool(((shares - exact).abs() < 1 + 1e-9).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.integers(1, 32), st.integers(1, 40))
def test_pyramid_budgets_sum_and_decrease(avg, layers, extra):
    limit = avg + extra
    b = pyramid_budgets(torch.tensor([avg]), torch.tensor([limit]), layers, 20.0)[0]
    assert int(b.sum()) == avg * layers
    assert bool((b <= limit).all()) and bool((b >= 0).all())
    assert bool((b[:-1] >= b[1:]).all())


def test_growth_beyond_reserve_is_exact():
    model = tiny_llama()
    ids = prompt(40)
    ref, fed = run_steps(model, ids, None, DynamicCache(config=model.config), 70)
    cache = KVCache(model, "full", 1.0, reserve=0)
    got, _ = run_steps(model, ids, None, cache, 70, feed=fed)
    assert max(float((g - r).abs().max()) for g, r in zip(got, ref)) < 1e-5
    store = cache.layers[0].heads[0]
    assert store.n == 110 and store.pos.shape[1] >= 110


def test_causal_fast_path_only_for_plain_causal_masks():
    from modalkv.attention import _is_plain_causal

    m = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    assert _is_plain_causal(m) and _is_plain_causal(m)
    other = m.clone()
    other[0, 0, 1, 4] = True  # e.g. a bidirectional image block: must not take the causal kernel
    assert not _is_plain_causal(other)
    m[0, 0, 0, 5] = True  # the same tensor changed in place is checked again
    assert not _is_plain_causal(m)


def test_peak_rss_window_restarts():
    """After reset_peak_rss the window's peak forgets an earlier, larger allocation (Linux)."""
    import sys

    from modalkv.measure import reset_peak_rss, window_peak_rss_bytes

    if not sys.platform.startswith("linux"):
        pytest.skip("VmHWM reset is Linux-only")
    big = torch.ones(400 * 2**20 // 4)  # 400 MiB, touched
    before = window_peak_rss_bytes()
    del big
    assert reset_peak_rss()
    assert window_peak_rss_bytes() < before - 300 * 2**20


@pytest.mark.parametrize("method", ["h2o", "hae", "retentivekv"])
def test_appended_entries_start_with_fresh_method_state(method):
    """An entry appended while decoding starts with zero accumulated attention, even in a slot an evicted entry
    used before (slots are reused after swap-with-last evictions)."""
    model = tiny_llama()
    cache = KVCache(model, method, 12, **SMALL[method])
    seen = []
    original = cache.method.decode

    def spy(step):
        layer = step.layer
        for store in layer.heads:
            if "accumulated_attention" in store.extras:  # HAE keeps one score per layer, on its first head store
                newest = store.pos[0, : store.n] == layer.seen - 1
                seen.append(float(store.extras["accumulated_attention"][0, : store.n][newest].sum()))
        return original(step)

    cache.method.decode = spy
    run_steps(model, prompt(30), None, cache, 12)
    assert len(seen) > 0 and max(seen) == 0.0

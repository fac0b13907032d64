"""Spherical KV: lookup-table logits equal the dense reconstruction's, the byte budget holds at every step, the
allocator is the rate-distortion greedy, pages are tier-homogeneous, and the top tier is close to the full cache."""

import heapq
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from helpers import prompt, run_steps, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.methods.spherical import (
    SphericalHeadStore,
    greedy_allocate,
    pack_codes,
    spherical_kmeans,
    unpack_codes,
)

SMALL = {"window": 8, "n_sink": 2, "recent": 8, "refresh": 4, "page_size": 16, "calib_tokens": 256}


@torch.no_grad()
def _prefilled(budget=0.3, n=120, **kw):
    model = tiny_llama()
    cache = KVCache(model, "sphericalkv", budget, **{**SMALL, **kw})
    model(prompt(n), **cache_kwargs(model, cache))
    return model, cache


@given(bits=st.integers(1, 8), groups=st.integers(1, 40), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_pack_unpack_roundtrip(bits, groups, seed):
    codes = torch.randint(0, 1 << bits, (3, 5, groups), generator=torch.Generator().manual_seed(seed))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == math.ceil(groups * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, groups), codes)


def test_spherical_kmeans_finds_clusters():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    x = centres.repeat(50, 1) + 0.01 * torch.randn(200, 6)
    x = torch.nn.functional.normalize(x, dim=-1)[None]
    c = spherical_kmeans(x, 4, iters=20)
    assert torch.allclose(c.norm(dim=-1), torch.ones(1, 4), atol=1e-5)
    assert float((centres @ c[0].T).max(-1).values.min()) > 0.99  # every true centre is found


def test_lut_logits_equal_dense_reconstruction():
    model, cache = _prefilled(0.4)
    torch.manual_seed(1)
    checked = 0
    for layer in cache.managed_layers:
        for store in layer.heads:
            assert isinstance(store, SphericalHeadStore) and len(store.sections) >= 2
            q = torch.randn(1, 3, store.d)
            lut, v1 = store.logits_values(q)
            K, v2 = store.kv()  # dense reconstruction
            dense = q @ K.transpose(1, 2)
            assert torch.allclose(lut, dense, atol=1e-4, rtol=1e-4)
            assert torch.equal(v1, v2)
            checked += 1
    assert checked == cache.num_managed * 2


def test_lut_and_reference_paths_give_the_same_logits_end_to_end():
    model = tiny_llama()
    ids = prompt(100)
    got, fed = run_steps(model, ids, None, KVCache(model, "sphericalkv", 0.3, **SMALL), 10)
    ref, _ = run_steps(model, ids, None, KVCache(model, "sphericalkv", 0.3, reference=True, **SMALL), 10, feed=fed)
    for g, r in zip(got, ref):
        assert (g - r).abs().max() < 1e-4


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.6, 40])
@pytest.mark.parametrize("price", ["kv", "keys"])
@torch.no_grad()
def test_byte_budget_is_never_exceeded(budget, price):
    model = tiny_llama()
    n = 120
    cache = KVCache(model, "sphericalkv", budget, price=price, **SMALL)
    model(prompt(n), **cache_kwargs(model, cache))
    for step in range(30):
        for layer in cache.managed_layers:
            seen = layer.seen
            tokens = budget * seen if isinstance(budget, float) else budget
            kept = 0
            for s in layer.heads:
                b = s.bytes()
                if price == "kv":  # everything the store holds: codes, radii, scales, page headers, values, metadata
                    kept += b["payload"] + b["meta"]
                    allowed_per_head = tokens * s.dense_bytes_per_entry()
                else:  # the authors' pricing: key bytes only
                    el = s.tail_keys.element_size()
                    kept += s.section_bytes() + (s.n - s.tail_start) * s.d * el
                    allowed_per_head = tokens * s.d * el
            assert kept <= allowed_per_head * len(layer.heads), (step, layer.layer_idx, kept)
        model(input_ids=torch.tensor([[step + 5]]), **cache_kwargs(model, cache))
    rep = cache.memory_report()
    assert rep["shared_bytes"] > 0  # the codebooks, reported beside the per-sequence bytes
    if price == "kv" and isinstance(budget, float):
        assert rep["kept_bytes"] <= budget * rep["full_bytes"]


@torch.no_grad()
def test_pages_are_tier_homogeneous_and_sorted():
    model, cache = _prefilled(0.4)
    P = SMALL["page_size"]
    for layer in cache.managed_layers:
        for s in layer.heads:
            tiers = s.tiers()
            for sec in s.sections:
                a, w = sec["start"], sec["width"]
                assert bool((tiers[:, a : a + w] == sec["tier"]).all())
                pos = s.pos[0, a : a + w]
                assert torch.equal(pos, pos.sort().values)  # by position within the section
                assert sec["scale"].shape[1] == math.ceil(w / P)  # one float32 scale per page and group
                assert sec["codes"].shape[-1] == math.ceil(sec["G"] * sec["bits"] / 8)  # packed bits
            # sinks and the recent window are at the top tier
            valid = s.valid[0, : s.n]
            pos = s.pos[0, : s.n]
            protected = (pos < 2) | (pos >= layer.seen - SMALL["recent"])
            assert bool((tiers[0][protected & valid] == 1).all())


@torch.no_grad()
def test_periodic_refresh_encodes_the_dense_tail():
    model, cache = _prefilled(0.3)
    layer = cache.managed_layers[0]
    for step in range(SMALL["refresh"] - 1):
        model(input_ids=torch.tensor([[step + 5]]), **cache_kwargs(model, cache))
        assert layer.heads[0].n - layer.heads[0].tail_start == step + 1  # dense until the refresh
    model(input_ids=torch.tensor([[9]]), **cache_kwargs(model, cache))
    assert all(s.n == s.tail_start for s in layer.heads)  # refreshed: everything coded again


def test_top_tier_everywhere_is_close_to_the_full_cache():
    model = tiny_llama()
    ids = prompt(100)
    full, fed = run_steps(model, ids, None, DynamicCache(config=model.config), 10)
    got, _ = run_steps(model, ids, None, KVCache(model, "sphericalkv", 1.0, mode="top", **SMALL), 10, feed=fed)
    scale = max(float(f.abs().max()) for f in full)
    err = max(float((g - f).abs().max()) for g, f in zip(got, full))
    assert err < 0.01 * scale
    low, _ = run_steps(model, ids, None, KVCache(model, "sphericalkv", 0.15, **SMALL), 10, feed=fed)
    assert max(float((g - f).abs().max()) for g, f in zip(low, full)) > err  # the check has teeth


def _heap_greedy(D, C, start, movable, budget, chain):
    """The authors' Algorithm 1 with a heap: the reference for the vectorised solver."""
    tiers = start.clone()
    pos_in = {t: i for i, t in enumerate(chain)}
    total = float(C.gather(1, start[:, None]).sum())
    heap = []

    def push(i):
        cur = pos_in[int(tiers[i])]
        if cur + 1 < len(chain):
            a, b = chain[cur], chain[cur + 1]
            dc = float(C[i, a] - C[i, b])
            heapq.heappush(heap, ((float(D[i, b] - D[i, a]) / dc) if dc > 0 else float("-inf"), i, cur))

    for i in range(D.shape[0]):
        if movable[i]:
            push(i)
    while total > budget and heap:
        _, i, cur = heapq.heappop(heap)
        a, b = chain[cur], chain[cur + 1]
        total -= float(C[i, a] - C[i, b])
        tiers[i] = b
        push(i)
    return tiers


@given(seed=st.integers(0, 10_000), frac=st.floats(0.0, 1.0))
@settings(max_examples=60, deadline=None)
def test_vectorised_greedy_equals_the_heap_greedy(seed, frac):
    g = torch.Generator().manual_seed(seed)
    N = 30
    d_keep = torch.rand(N, 3, generator=g).sort(-1).values  # distortion grows as precision falls
    D = torch.cat([d_keep[:, -1:] + torch.rand(N, 1, generator=g), d_keep], 1)  # column 0 = dropped
    D = D.double()
    C = torch.tensor([0.0, 7.0, 6.0, 3.0]).double().expand(N, 4)
    start = torch.ones(N, dtype=torch.long)
    movable = torch.rand(N, generator=g) > 0.2
    budget = frac * float(C[:, 1].sum())
    chain = (1, 2, 3, 0)
    got = greedy_allocate(D, C, start, movable, budget, chain)
    want = _heap_greedy(D, C, start, movable, budget, chain)
    assert torch.equal(got, want)
    assert float(C.gather(1, got[:, None]).sum()) <= max(budget, float(C[:, 1][~movable].sum())) + 1e-9


@pytest.mark.parametrize("mode, allowed", [("quant_only", {1, 2, 3}), ("keep_drop", {0, 1})])
@torch.no_grad()
def test_ablation_modes_use_only_their_tiers(mode, allowed):
    model, cache = _prefilled(0.2, mode=mode)
    seen = set()
    for layer in cache.managed_layers:
        for s in layer.heads:
            seen |= set(s.tiers()[0].tolist())
            if mode == "quant_only":
                assert s.count() == layer.seen  # nothing dropped
    assert seen <= allowed


@torch.no_grad()
def test_prompt_codebooks_are_counted_per_sequence():
    model, cache = _prefilled(0.5, codebooks="prompt", tiers="16:4,16:2")
    rep = cache.memory_report()
    assert rep["shared_bytes"] == 0 and rep["state_bytes"] > 0
    assert rep["kept_bytes"] <= 0.5 * rep["full_bytes"]


@pytest.mark.parametrize("kw, message", [
    ({"tiers": "16x6"}, "group:bits"),
    ({"tiers": "16:9"}, "bits in 1..8"),
    ({"page_size": 0}, "page_size"),
])
def test_bad_parameters_are_named(kw, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        KVCache(model, "sphericalkv", 0.3, **kw)


def test_too_small_budget_and_quantize_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="cannot hold one top-tier entry"):
        _prefilled(1, n=60, calib_tokens=128)
    with pytest.raises(ValueError, match="own entry format"):
        KVCache(model, "sphericalkv", 0.3, quantize="kivi-4")


@torch.no_grad()
def test_left_padded_batch_matches_single_rows():
    """Rows of a left-padded batch get the same codes and logits as each row alone (padding never kept)."""
    from helpers import left_pad

    model = tiny_llama()
    rows = [prompt(90, seed=2)[0], prompt(70, seed=3)[0]]
    ids, mask = left_pad(rows)
    batch = KVCache(model, "sphericalkv", 1.0, mode="top", **SMALL)
    got, fed = run_steps(model, ids, mask, batch, 3)
    for b, row in enumerate(rows):
        single = KVCache(model, "sphericalkv", 1.0, mode="top", **SMALL)
        want, _ = run_steps(model, row[None], None, single, 3, feed=[f[b : b + 1] for f in fed])
        for g, w in zip(got, want):
            assert (g[b] - w[0]).abs().max() < 1e-3
    for layer in batch.managed_layers:
        for s in layer.heads:
            assert int(s.valid[1, : s.n].sum()) == 70 + 3  # row 1: its 70 real tokens and 3 new ones


@torch.no_grad()
def test_small_budget_refreshes_sooner_and_still_holds():
    """A short prompt at a small budget: the room for 16 dense decode steps would not fit, so the layer re-allocates
    more often, and the byte budget still holds at every step."""
    model = tiny_llama()
    cache = KVCache(model, "sphericalkv", 0.1, **{**SMALL, "refresh": 16})
    model(prompt(80), **cache_kwargs(model, cache))
    assert min(cache.method._every.values()) < 16
    for step in range(24):
        model(input_ids=torch.tensor([[step + 5]]), **cache_kwargs(model, cache))
        rep = cache.memory_report()
        assert rep["kept_bytes"] <= 0.1 * rep["full_bytes"]

"""Spherical KV: lookup-table logits equal the dense reconstruction's, the byte budget holds at every step, the
allocator is the rate-distortion greedy, pages are tier-homogeneous, and the top tier is close to the full cache."""

import heapq
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from helpers import prompt, run_steps, tiny_llama, undeclared_extras
from modalkv import KVCache, cache_kwargs
from modalkv.storage.spherical import SphericalPayload
from modalkv.methods.spherical import (
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
            assert isinstance(store.payload, SphericalPayload) and len(store.payload.sections) >= 2
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
    cache = KVCache(model, "sphericalkv", budget, price=price, allocation="layer", **SMALL)  # per-layer shares
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
                    el = s.payload.tail_keys.element_size()
                    kept += s.payload.section_bytes() + (s.n - s.payload.tail_start) * s.d * el
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
            tiers = s.payload.tiers(s.n)
            for sec in s.payload.sections:
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
def test_the_extras_spherical_kv_keeps_are_declared():
    model = tiny_llama()
    cache = KVCache(model, "sphericalkv", 0.3, **SMALL)
    run_steps(model, prompt(120), None, cache, 6)
    assert not undeclared_extras(cache) and {e.name for e in cache.method.extras} == {"tier", "omega"}


def test_periodic_refresh_encodes_the_dense_tail():
    model, cache = _prefilled(0.3)
    layer = cache.managed_layers[0]
    for step in range(SMALL["refresh"] - 1):
        model(input_ids=torch.tensor([[step + 5]]), **cache_kwargs(model, cache))
        assert layer.heads[0].n - layer.heads[0].payload.tail_start == step + 1  # dense until the refresh
    model(input_ids=torch.tensor([[9]]), **cache_kwargs(model, cache))
    assert all(s.n == s.payload.tail_start for s in layer.heads)  # refreshed: everything coded again


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
            seen |= set(s.payload.tiers(s.n)[0].tolist())
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


# -- the rate-distortion allocation: proxies, global budget, re-encoding -------------------------------------------


def _ordering_problem(proxy: str, seed: int = 0):
    """Tokens that differ only in their attention p (equal key radii, equal ||v - o_bar||), in shuffled order."""
    from modalkv.methods.spherical import SphericalKV

    m = SphericalKV(tiers="2:6,2:4,4:6", proxy=proxy)
    m._pair_order = None  # contiguous groups (set by setup() on a cache)
    g = torch.Generator().manual_seed(seed)
    n, d = 40, 16
    p = torch.linspace(0.9, 0.12, n)[torch.randperm(n, generator=g)]  # above the paper proxy's 0.1 floor
    values = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)  # ||v - 0|| = 1 for all
    keys = torch.nn.functional.normalize(torch.randn(n, d // 2, 2, generator=g), dim=-1).flatten(1)  # radius 1
    qbar = [torch.full((d // gs,), 0.5) for gs, _ in m.tier_spec]
    chord = [torch.full((d // gs,), e) for (gs, _), e in zip(m.tier_spec, (0.05, 0.15, 0.8))]
    D = m._distortion(p, values, keys, qbar, chord, torch.zeros(d))
    return m, p, D


@pytest.mark.parametrize("proxy, chain, frac", [("rms", (1, 2, 3, 0), 0.4), ("bound", (1, 2, 3, 0), 0.4),
                                                ("paper", (1, 2, 3), 0.55)])
def test_high_attention_tokens_get_higher_tiers(proxy, chain, frac):
    """The proxy's ordering: among tokens that differ only in attention, a more attended token never gets a lower
    tier (b1 > b2 > b3 > dropped) than a less attended one. The paper's decode proxy is checked without drops: its
    drop penalty is one constant for every token, so it drops the *most* attended b3 tokens first (documented)."""
    m, p, D = _ordering_problem(proxy)
    n = p.shape[0]
    C = torch.tensor([0.0, 10.0, 6.0, 3.0]).expand(n, -1)  # costs that make every step worth taking somewhere
    tiers = greedy_allocate(D, C, torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.bool),
                            frac * float(C[0, 1]) * n, chain)
    quality = torch.tensor([0, 3, 2, 1])[tiers]  # dropped < b3 < b2 < b1
    assert len(set(quality.tolist())) >= 3  # the budget forces several tiers
    order = p.argsort(descending=True)
    assert bool((quality[order][:-1] >= quality[order][1:]).all()), (p[order], quality[order])


@pytest.mark.parametrize("proxy", ["rms", "paper"])
@pytest.mark.parametrize("budget", [0.15, 0.4, 48])
@torch.no_grad()
def test_global_allocation_respects_the_byte_budget_at_every_step(proxy, budget):
    """allocation="global": one budget for all layers (the sum of the layers' budgets) holds after prefill and after
    every decode step (re-allocations included), and with the RMS proxy layers really get unequal shares."""
    model = tiny_llama()
    n = 120
    cache = KVCache(model, "sphericalkv", budget, allocation="global", proxy=proxy, **SMALL)
    model(prompt(n), **cache_kwargs(model, cache))
    uneven = False
    for step in range(25):
        per_layer, allowed = [], 0.0
        for layer in cache.managed_layers:
            tokens = budget * layer.seen if isinstance(budget, float) else budget
            per_layer.append(sum(s.bytes()["payload"] + s.bytes()["meta"] for s in layer.heads))
            allowed += tokens * layer.heads[0].dense_bytes_per_entry() * len(layer.heads)
        assert sum(per_layer) <= allowed, (step, per_layer, allowed)
        share = allowed / len(per_layer)
        uneven |= max(per_layer) > share  # some layer holds more than an equal per-layer share
        model(input_ids=torch.tensor([[step + 5]]), **cache_kwargs(model, cache))
    if proxy == "rms":  # (the paper's proxy moves every token to b3 before it drops any: even shares at 0.4)
        assert uneven
    rep = cache.memory_report()
    if isinstance(budget, float):
        assert rep["kept_bytes"] <= budget * rep["full_bytes"]


@torch.no_grad()
def test_reencoding_does_not_compound_error_over_500_decode_steps():
    """Every refresh re-encodes kept entries from their reconstruction. Over 500 decode steps (125 refreshes) an entry
    that keeps its tier keeps its direction codes, and each group radius stays within 8 quantisation steps (largest
    page scale / 255 of its section) of its value after prefill. Rounding to the nearest code is unbiased, so the
    radii wander like a random walk (measured: 4.0 steps after 100 decode steps, 5.8 after 500); a biased rounding
    (floor) compounds to 24 and 100 steps."""
    from modalkv.methods.spherical import unpack_codes

    model = tiny_llama(layers=2)
    cache = KVCache(model, "sphericalkv", 0.5, allocation="layer", **SMALL)

    def snapshot():
        out = {}
        for layer in cache.managed_layers:
            for h, s in enumerate(layer.heads):
                for sec in s.payload.sections:
                    r = s.payload.radii(sec)[0]
                    codes = unpack_codes(sec["codes"], sec["bits"], sec["G"])[0]
                    step = sec["scale"][0].amax(0) / 255
                    for j in range(sec["width"]):
                        a = sec["start"] + j
                        if s.valid[0, a]:
                            out[(layer.layer_idx, h, int(s.pos[0, a]))] = (sec["tier"], r[j].clone(), codes[j], step)
        return out

    def drift(now, then):
        worst, compared = 0.0, 0
        for key, (tier, r, codes, _) in now.items():
            if key in then and then[key][0] == tier:
                assert torch.equal(codes, then[key][2])  # direction codes never move
                worst = max(worst, float(((r - then[key][1]).abs() / then[key][3]).max()))
                compared += 1
        return worst, compared

    model(prompt(100), **cache_kwargs(model, cache))
    first = snapshot()
    for step in range(500):
        model(input_ids=torch.tensor([[step % 50 + 5]]), **cache_kwargs(model, cache))
    worst, compared = drift(snapshot(), first)
    assert compared > 100  # most prompt entries survive with their tier
    assert worst <= 8.0, worst


def test_paper_preset_sets_the_papers_regime():
    model = tiny_llama()
    cache = KVCache(model, "sphericalkv", 0.3, preset="paper", **SMALL)
    m = cache.method
    assert (m.tiers, m.proxy, m.allocation) == ("paper", "paper", "global")
    changed = KVCache(model, "sphericalkv", 0.3, preset="paper", tiers="16:4,32:3", proxy="bound", **SMALL).method
    assert (changed.tiers, changed.proxy, changed.allocation) == ("16:4,32:3", "bound", "global")  # changed ones win
    # an explicit value wins even when it equals the non-preset default
    rms = KVCache(model, "sphericalkv", 0.3, preset="paper", proxy="rms", allocation="layer", **SMALL).method
    assert (rms.tiers, rms.proxy, rms.allocation) == ("paper", "rms", "layer")
    plain = KVCache(model, "sphericalkv", 0.3, **SMALL).method
    assert (plain.tiers, plain.proxy, plain.allocation) == ("2:6,2:4,4:6", "rms", "global")
    with pytest.raises(TypeError, match="preset"):
        KVCache(model, "sphericalkv", 0.3, preset="fast")


def test_prompt_beyond_the_calibrated_positions_is_warned():
    """Keys are coded after RoPE, so positions past the calibration text's rotate channel pairs to directions the
    codebooks never saw: a prompt longer than calib_tokens gets a warning naming the setting, once per cache."""
    with pytest.warns(UserWarning, match=r"calib_tokens=64.*position 120") as record:
        _prefilled(0.5, n=120, calib_tokens=64)
    assert len([w for w in record if "calib_tokens" in str(w.message)]) == 1  # not once per layer
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _prefilled(0.5, n=120, calib_tokens=128)  # within the calibrated positions: silent


def test_calib_span_spreads_the_calibration_over_the_positions():
    """calib_span > calib_tokens runs the calibration text in chunks whose positions spread over [0, calib_span):
    the keys the codebooks are fitted on then carry the RoPE rotations of the whole span (here 4 chunks of 64 tokens
    at 0, 256, 512, 768); a prompt within the span does not warn."""
    import warnings

    from modalkv.methods.spherical.codebooks import calibrate

    model = tiny_llama()
    seen = []
    forward = model.forward

    def recording(*args, **kw):
        seen.append(kw["position_ids"][0].tolist())
        return forward(*args, **kw)

    model.forward = recording
    with torch.no_grad():
        books = calibrate(model, ((2, 6),), tokens=256, iters=2, span=1024)
    assert [p[0] for p in seen] == [0, 256, 512, 768] and all(len(p) == 64 for p in seen)
    assert all(p == list(range(p[0], p[0] + 64)) for p in seen)
    with torch.no_grad():
        plain = calibrate(model, ((2, 6),), tokens=256, iters=2)
    assert seen[-1] == list(range(256))  # span 0: one sequence at positions 0..tokens-1, as before
    assert not torch.equal(books.books[0][0], plain.books[0][0])  # different keys, different codebooks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _prefilled(0.5, n=120, calib_tokens=64, calib_span=128)

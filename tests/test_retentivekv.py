"""RetentiveKV: the states read back what eviction removed, absorb nothing when told to, and stay one size.

The shared suites run RetentiveKV with tau > 1 (its states absorb no text token): exactly the masked full cache
(test_exactness), within budget (test_invariants), replayable (test_replay)."""

import types

import pytest
import torch
from transformers import DynamicCache

from helpers import prompt, run_steps, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.methods.retentivekv import RetentiveKV, normalised_entropy_score

STEPS = 8
SMALL = {"window": 4, "n_sink": 2}


def _exact_attention(q, K, V):
    p = torch.softmax(q @ K.transpose(-1, -2), -1)
    return p @ V


@pytest.mark.parametrize("second_order", [False, True])
def test_softmax_readout_reads_one_absorbed_token_exactly(second_order):
    """The first-order moment readout is exact for a state holding one token (or tokens with equal keys), at any
    decay scale: attention over the kept entries + the state == exact attention over kept + absorbed."""
    torch.manual_seed(0)
    B, d, n, r = 2, 8, 5, 3
    m = RetentiveKV(second_order=second_order)
    m.setup(None)
    st = m._empty_states(B, 1, d, d, "cpu")
    k_abs, v_abs = torch.randn(B, 1, 1, d), torch.randn(B, 1, 1, d)
    m._absorb(st, 1, torch.full((B, 1, 3), 1.0), k_abs.expand(B, 1, 3, d), v_abs.expand(B, 1, 3, d))
    st["scale"][:, 0, 1] = 0.5  # a decayed state: its three identical tokens now weigh 1.5
    m._states = {0: st}
    q, K, V = torch.randn(B, r, d), torch.randn(B, n, d), torch.randn(B, n, d)
    out, probs = m.readout(types.SimpleNamespace(rank=0, heads=[None]), 0, q, q @ K.transpose(1, 2), V)
    K2 = torch.cat([K, k_abs[:, 0]], 1)
    logits = torch.cat([q @ K.transpose(1, 2), q @ k_abs[:, 0].transpose(1, 2) + torch.log(torch.tensor(1.5))], -1)
    want = torch.softmax(logits, -1) @ torch.cat([V, v_abs[:, 0]], 1)
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(B, r))  # probs over the cached entries, for scoring
    assert K2.shape[1] == n + 1


@pytest.mark.parametrize("readout", ["softmax", "linear"])
def test_states_that_absorb_nothing_give_exactly_the_eviction(readout):
    model = tiny_llama()
    ids = prompt(48)
    plain = KVCache(model, "retentivekv", 0.4, state_readout="none", **SMALL)
    want, fed = run_steps(model, ids, None, plain, STEPS)
    empty = KVCache(model, "retentivekv", 0.4, state_readout=readout, tau=2.0, **SMALL)
    got, _ = run_steps(model, ids, None, empty, STEPS, feed=fed)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    st = empty.method._states[0]
    assert float(st["m" if readout == "softmax" else "z"].abs().sum()) == 0.0  # nothing was absorbed
    assert empty.memory_report()["state_bytes"] > 0  # the (empty) states still count


def test_states_read_back_evicted_tokens():
    """Reactivation at the model level: with the states, logits stay far closer to the full cache than plain
    eviction of the same entries at the same budget (the same entries are kept: selection ignores the states)."""
    model = tiny_llama()
    ids = prompt(64)
    full, fed = run_steps(model, ids, None, DynamicCache(config=model.config), STEPS)

    def error(**kw):
        cache = KVCache(model, "retentivekv", 0.3, **SMALL, **kw)
        got, _ = run_steps(model, ids, None, cache, STEPS, feed=fed)
        return sum(float((g - f).abs().mean()) for g, f in zip(got, full))

    e_none = error(state_readout="none")
    e_soft = error()
    e_single = error(states="single")
    assert e_soft < 0.2 * e_none and e_single < 0.2 * e_none
    assert e_none > 0.05  # eviction alone really changed the logits
    # the prompt forward is exact, so the states do not change which entries the prefill keeps
    caches = [KVCache(model, "retentivekv", 0.3, state_readout=r, **SMALL) for r in ("none", "softmax")]
    with torch.no_grad():
        for cache in caches:
            model(ids, **cache_kwargs(model, cache))
    for a, b in zip(*(c.managed_layers for c in caches)):
        for s, t in zip(a.heads, b.heads):
            assert torch.equal(s.pos[:, : s.n], t.pos[:, : t.n])


@torch.no_grad()
def test_decode_evictions_are_absorbed():
    model = tiny_llama()
    cache = KVCache(model, "retentivekv", 0.3, tau=0.0, **SMALL)
    with torch.no_grad():
        model(prompt(40), **cache_kwargs(model, cache))
    before = cache.method._states[0]["m"][:, :, 1].clone() * cache.method._states[0]["scale"][:, :, 1]
    for t in range(6):
        model(input_ids=torch.tensor([[t + 3]]), **cache_kwargs(model, cache))
    st = cache.method._states[0]
    after = st["m"][:, :, 1] * st["scale"][:, :, 1]
    # tau = 0 absorbs every text victim; decay (h >= h_min = 0.9 per step) cannot undo 6 absorptions of weight 1
    assert bool((after > before * 0.9**6 + 1).all())
    for layer in cache.managed_layers:
        for h, s in enumerate(layer.heads):
            assert s.count() <= int(layer.decode_targets(h).max())


def test_state_memory_is_constant_in_length_and_images():
    model = tiny_llama()
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    H, L = cfg.num_key_value_heads, cfg.num_hidden_layers
    sizes = []
    for n, images in [(40, 0), (160, 0), (80, 1), (160, 4)]:
        cache = KVCache(model, "retentivekv", 0.25, **SMALL)
        ids = prompt(n)
        if images:
            mod = torch.zeros(1, n, dtype=torch.long)
            for i in range(images):
                mod[0, 8 + 20 * i : 8 + 20 * i + 16] = 1  # 4 x 4 images
            cache.set_modality(mod)
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
        for t in range(3):
            model(input_ids=torch.tensor([[t + 3]]), **cache_kwargs(model, cache))
        rep = cache.memory_report()
        sizes.append(rep["state_bytes"])
        assert rep["kept_bytes"] == rep["payload_bytes"] + rep["meta_bytes"] + rep["state_bytes"]
    # two states per (layer, KV head): m, s, u, M and the lazy decay scale, float32
    assert sizes == [L * H * 2 * (1 + d + d + d * d + 1) * 4] * 4


def test_visual_tokens_go_to_the_visual_state_with_spatial_weights():
    model = tiny_llama()
    n = 48
    mod = torch.zeros(1, n, dtype=torch.long)
    mod[0, 4:29] = 1  # one 5 x 5 image
    cache = KVCache(model, "retentivekv", 0.25, gamma_s=0.5, **SMALL)
    cache.set_modality(mod)
    with torch.no_grad():
        model(prompt(n), **cache_kwargs(model, cache))
    st = cache.method._states[0]
    assert bool((st["m"][:, :, 0] > 0).all())  # evicted image tokens are in S_V
    # spatial weights: 1 at the root, gamma_s ** Manhattan distance elsewhere
    layer = cache.managed_layers[0]
    for s in layer.heads:
        vis = s.mod[0, : s.n] == 1
        w = s.extras["spatial_weight"][0, : s.n][vis]
        assert bool(((w > 0) & (w <= 1)).all())
        logs = torch.log2(w)
        assert torch.allclose(logs, logs.round(), atol=1e-5)  # integer distances


def test_spatial_weights_follow_the_manhattan_distance_to_the_root():
    m = RetentiveKV(gamma_s=0.5)
    m.setup(type("Cache", (), {"layout": None})())  # a stand-in cache without a layout (held weakly)
    mod = torch.zeros(1, 12, dtype=torch.int8)
    mod[0, 2:11] = 1  # a 3 x 3 image at positions 2..10
    ctx = types.SimpleNamespace(modality=mod, positions=torch.arange(12))
    R = torch.zeros(1, 1, 12)
    R[0, 0, 2 + 4] = 1.0  # the centre (row 1, col 1) is the root
    w = m._spatial_weights(ctx, R)[0, 0]
    grid = w[2:11].view(3, 3)
    want = torch.tensor([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]])
    assert torch.allclose(grid, want)
    assert float(w[:2].abs().sum() + w[11:].abs().sum()) == 0.0


def test_retention_score_rewards_dominant_and_uncertain_tokens():
    alpha = torch.tensor([[0.60, 0.30, 0.05, 0.05, 0.0]])
    group = torch.tensor([[True, True, True, True, False]])
    R = normalised_entropy_score(alpha, group, 0.5)
    assert float(R[0, 4]) == 0.0
    assert float(R[0, 0]) > float(R[0, 2]) and float(R[0, 1]) > float(R[0, 2])  # -p log p peaks near 1/e
    # the entropy term reorders: B (p = 0.37, near the peak of -p log p) outranks the more attended A (p = 0.55)
    # once the score weighs uncertainty (lam = 0.2), and not by attention alone (lam = 1)
    alpha = torch.tensor([[0.55, 0.37, 0.08]])
    group = torch.ones(1, 3, dtype=torch.bool)
    mixed = normalised_entropy_score(alpha, group, 0.2)
    assert float(mixed[0, 1]) > float(mixed[0, 0])
    attention_only = normalised_entropy_score(alpha, group, 1.0)
    assert float(attention_only[0, 0]) > float(attention_only[0, 1])


@pytest.mark.parametrize("bad, message", [({"lam": 1.5}, "lam"), ({"gamma_s": 0.0}, "gamma_s"),
                                          ({"state_readout": "cubic"}, "state_readout"), ({"window": 0}, "window")])
def test_bad_parameters_are_named(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RetentiveKV(**bad)


def test_generate_works_with_states():
    model = tiny_llama()
    ids = prompt(40)
    cache = KVCache(model, "retentivekv", 0.3, **SMALL)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(model, cache))
    assert out.shape[1] == 46
    assert cache.memory_report()["state_bytes"] > 0


@pytest.mark.parametrize("kw", [{}, {"state_readout": "linear"}, {"states": "single", "absorb_by_attention": True}])
def test_one_sequence_fast_path_equals_the_batched_path(kw):
    """The layer-vectorised one-sequence step (_decode_one) and the per-head path give the same logits: a batch of
    two identical rows takes the per-head path."""
    model = tiny_llama()
    ids = prompt(56)
    one, fed = run_steps(model, ids, None, KVCache(model, "retentivekv", 0.3, tau=0.0, **SMALL, **kw), STEPS)
    two, _ = run_steps(model, ids.repeat(2, 1), None, KVCache(model, "retentivekv", 0.3, tau=0.0, **SMALL, **kw),
                       STEPS, feed=[f.repeat(2) for f in fed])
    for a, b in zip(one, two):
        assert (a[0] - b[0]).abs().max() < 1e-4 and (a[0] - b[1]).abs().max() < 1e-4

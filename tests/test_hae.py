"""HAE: Dual-Attention Pruning (the rule, index broadcast, prune vs kv_only, original positions) and the recycle bin
(capacity + bin bound, batched emptying, restoring, soft vs hard delete). Exactness of the decode-time eviction against
the masked full cache and the budget invariants are in test_exactness / test_invariants (hae is in EVICTING)."""

import pytest
import torch
from transformers import AttentionInterface, CLIPVisionConfig, DynamicCache, LlamaConfig, LlavaConfig
from transformers import LlavaForConditionalGeneration

from helpers import Recorder, masked_reference, prompt, run_steps, tiny_gemma3, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.modality import TEXT, detect_modality
from test_modality import IMG, TXT, llava_inputs

DAP = dict(thresholds="absolute", tau_g=0.0302, tau_i=0.0415)  # thresholds that evict part of the (near-uniformly attended) random image


def llava3(impl="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=32, patch_size=8,
                                                     projection_dim=32),
                      text_config=LlamaConfig(**dict(TXT, num_hidden_layers=3)), image_token_index=IMG,
                      image_seq_length=16, vision_feature_layer=-1)
    cfg.text_config._attn_implementation = impl
    cfg.vision_config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # sharper first-layer attention than random weights give, so thresholds can split
        attn = model.model.language_model.layers[0].self_attn
        attn.q_proj.weight *= 6
        attn.k_proj.weight *= 6
    return model


def hae_cache(model, ids, budget=1.0, **params):
    cache = KVCache(model, "hae", budget, **params)
    cache.set_modality(detect_modality(model.config, ids).ids)
    return cache


def kept(cache):
    """layer -> head -> sorted kept positions."""
    return {l.layer_idx: [sorted(s.pos[0, : s.n][s.valid[0, : s.n]].tolist()) for s in l.heads]
            for l in cache.managed_layers}


@pytest.mark.parametrize("mode", ["prune", "kv_only"])
def test_thresholds_that_evict_nothing_give_the_full_cache(mode):
    model = llava3()
    ids, extra = llava_inputs(images=2)
    cache = hae_cache(model, ids, tau_g=0.0, tau_i=0.0, mode=mode)
    got, fed = run_steps(model, ids, None, cache, 6, extra=extra)
    assert int(cache.method.dap_evicted.sum()) == 0 and int(cache.method.dap_visual.sum()) == 32
    want, _ = run_steps(model, ids, None, DynamicCache(config=model.config.text_config), 6, feed=fed, extra=extra)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5


def _dap_by_hand(model, ids, extra, tau_g, tau_i):
    """The DAP rule computed from transformers' own layer-0 attention (eager, output_attentions)."""
    ref = llava3("eager")
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        att = ref(input_ids=ids, **extra, output_attentions=True).attentions[0][0].mean(0)  # [n, n] head mean
    lay = detect_modality(model.config, ids).ids[0]
    vis = torch.nonzero(lay != TEXT).flatten()
    rows = torch.nonzero((lay == TEXT) & (torch.arange(len(lay)) > vis.max())).flatten()
    a = att[rows][:, vis].double()
    g, m = a.sum(0), a.amax(0)
    return set(vis[(g < tau_g * g.sum()) & (m < tau_i)].tolist()), set(vis.tolist())


@pytest.mark.parametrize("mode", ["prune", "kv_only"])
def test_dap_rule_decided_once_and_broadcast_to_every_layer_and_head(mode):
    model = llava3()
    ids, extra = llava_inputs(images=2)
    evicted, visual = _dap_by_hand(model, ids, extra, DAP["tau_g"], DAP["tau_i"])
    assert 0 < len(evicted) < len(visual)  # the thresholds split the image tokens
    cache = hae_cache(model, ids, mode=mode, **DAP)
    with torch.no_grad():
        model(input_ids=ids, **extra, **cache_kwargs(model, cache))
    assert int(cache.method.dap_evicted[0]) == len(evicted)
    for heads in kept(cache).values():
        for positions in heads:
            assert set(positions) & visual == visual - evicted  # the same visual set everywhere
            assert set(range(ids.shape[1])) - visual <= set(positions)  # text is never evicted at prefill


def test_relative_thresholds_are_multiples_of_the_visual_means():
    """The default rule: evict a visual token whose global attention and peak are both below tau times the visual
    tokens' means (checked against transformers' own layer-0 attention)."""
    model = llava3()
    ids, extra = llava_inputs(images=2)
    ref = llava3("eager")
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        att = ref(input_ids=ids, **extra, output_attentions=True).attentions[0][0].mean(0)
    lay = detect_modality(model.config, ids).ids[0]
    vis = torch.nonzero(lay != TEXT).flatten()
    rows = torch.nonzero((lay == TEXT) & (torch.arange(len(lay)) > vis.max())).flatten()
    a = att[rows][:, vis].double()
    g, m = a.sum(0), a.amax(0)
    for tau_g, tau_i in [(1.0, 1.0), (1.1, 1.3), (0.9, 2.0)]:
        want = set(vis[(g < tau_g * g.mean()) & (m < tau_i * m.mean())].tolist())
        assert 0 < len(want) < len(vis)
        cache = hae_cache(model, ids, tau_g=tau_g, tau_i=tau_i)
        with torch.no_grad():
            model(input_ids=ids, **extra, **cache_kwargs(model, cache))
        got = set(vis.tolist()) - set(kept(cache)[0][0])
        assert got == want, (tau_g, tau_i)


@pytest.mark.parametrize("mode", ["prune", "kv_only"])
def test_text_is_never_evicted_at_prefill_when_the_budget_holds_it(mode):
    """Below budget 1.0 the prefill trims visual tokens only, as long as the budget holds every text token (image
    tokens inside the sink or recent windows are not protected against text)."""
    model = llava3()
    ids, extra = llava_inputs(images=2)  # 63 tokens: 32 image, 31 text
    text = set(torch.nonzero(detect_modality(model.config, ids).ids[0] == TEXT).flatten().tolist())
    for budget in (40, 0.6, 31):
        cache = hae_cache(model, ids, budget=budget, mode=mode)
        with torch.no_grad():
            model(input_ids=ids, **extra, **cache_kwargs(model, cache))
        for heads in kept(cache).values():
            for positions in heads:
                assert text <= set(positions), budget
                assert len(positions) == (budget if isinstance(budget, int) else int(budget * 63 + 0.999))


_PRUNED = {"evicted": None}


def _prune_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Full attention, except that the evicted tokens are invisible to layers after the first and, once the
    prompt is read, to the first layer too."""
    B, Hq, q, d = query.shape
    G = Hq // key.shape[1]
    k, v = key.repeat_interleave(G, 1).double(), value.repeat_interleave(G, 1).double()
    logits = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    n = key.shape[-2]
    allowed = torch.ones(q, n, dtype=torch.bool).tril(n - q)
    if module.layer_idx > 0 or q < n:  # the first layer's prefill saw everything; its cache then drops them too
        ev = torch.zeros(n, dtype=torch.bool)
        ev[: len(_PRUNED["evicted"])] = _PRUNED["evicted"]
        allowed &= ~ev
        allowed[torch.arange(q), torch.arange(n - q, n)] = True  # an evicted query still sees itself (unused)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    return torch.matmul(probs, v).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("hae_prune_ref", _prune_reference)


def test_prune_mode_runs_later_layers_on_kept_tokens_at_their_original_positions():
    model = llava3()
    ids, extra = llava_inputs(images=2)
    n = ids.shape[1]
    cache = hae_cache(model, ids, mode="prune", **DAP)
    with torch.no_grad():
        out = model(input_ids=ids, **extra, **cache_kwargs(model, cache))
    evicted = int(cache.method.dap_evicted[0])
    assert out.logits.shape[1] == n - evicted  # layers after the first computed only the kept tokens
    keep = sorted(set(range(n)) - set(torch.nonzero(~cache.method._dap_keep[0]).flatten().tolist()))
    for heads in kept(cache).values():
        assert all(p == keep for p in heads)  # original positions, not 0..m-1
    # the same logits as a full forward whose later layers cannot see the evicted tokens
    got, fed = run_steps(model, ids, None, hae_cache(model, ids, mode="prune", **DAP), 5, extra=extra)
    ref = llava3("hae_prune_ref")
    ref.load_state_dict(model.state_dict())
    _PRUNED["evicted"] = ~cache.method._dap_keep[0]
    try:
        want, _ = run_steps(ref, ids, None, DynamicCache(config=ref.config.text_config), 5, feed=fed, extra=extra)
    finally:
        _PRUNED["evicted"] = None
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4
    # kv_only runs the whole prefill: same kept set, different (unpruned) hidden states in later layers
    other = hae_cache(model, ids, mode="kv_only", **DAP)
    got_kv, _ = run_steps(model, ids, None, other, 5, feed=fed, extra=extra)
    assert {l: [[p for p in h if p < n] for h in heads] for l, heads in kept(other).items()} == kept(cache)
    assert (got_kv[0] - got[0]).abs().max() > 1e-3
    assert cache.get_seq_length() == n and other.get_seq_length() == n + 5


def test_prune_mode_with_generate():
    model = llava3()
    ids, extra = llava_inputs(images=2)
    cache = hae_cache(model, ids, mode="prune", **DAP)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, **extra, max_new_tokens=6, do_sample=False, **cache_kwargs(model, cache))
    got, fed = run_steps(model, ids, None, hae_cache(model, ids, mode="prune", **DAP), 5, extra=extra)
    assert gen[0, ids.shape[1]:].tolist() == [int(t) for t in [got[0].argmax(-1), *fed[1:], got[-1].argmax(-1)]][:6]
    assert cache.get_seq_length() == ids.shape[1] + 5


def _counts(cache):
    out = []
    for layer in cache.managed_layers:
        s = layer.heads[0]
        valid = s.valid[0, : s.n]
        in_bin = (s.extras["in_recycle_bin"][0, : s.n] > 0) & valid
        out.append((int((valid & ~in_bin).sum()), int(in_bin.sum()), s.n))
    return out


@torch.no_grad()
def test_recycle_bin_bounds_and_batched_emptying():
    model = tiny_llama()
    C, d_bin = 12, 3
    cache = KVCache(model, "hae", C, recent=4, n_sink=2, bin_size=d_bin, reserve=0)
    ids = prompt(40)
    out = model(ids, **cache_kwargs(model, cache))
    history = [_counts(cache)]
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(30):
        out = model(nxt, **cache_kwargs(model, cache))
        nxt = out.logits[:, -1:].argmax(-1)
        history.append(_counts(cache))
        for active, in_bin, stored in history[-1]:
            assert active <= C and in_bin <= d_bin and stored <= C + d_bin  # capacity + bin, never more
    assert cache.get_seq_length() == 70
    sizes = [[h[l][2] for h in history] for l in range(cache.num_managed)]
    for per_layer in sizes:
        drops = [a - b for a, b in zip(per_layer, per_layer[1:]) if b < a]
        assert drops and all(d == d_bin for d in drops)  # the bin is emptied whole, d_bin + 1 entries at a time
        # (one step appends a token while d_bin + 1 leave: the store shrinks by d_bin)


@torch.no_grad()
def test_a_restored_bin_entry_is_attended_again():
    model = tiny_llama()
    cache = KVCache(model, "hae", 12, recent=4, n_sink=2, bin_size=8, bin_attend=False)
    out = model(prompt(40), **cache_kwargs(model, cache))
    nxt = out.logits[:, -1:].argmax(-1)
    layer = cache.managed_layers[1]
    with Recorder() as rec:
        for _ in range(2):
            out = model(nxt, **cache_kwargs(model, cache))
            nxt = out.logits[:, -1:].argmax(-1)
        s = layer.heads[0]
        in_bin = torch.nonzero(s.extras["in_recycle_bin"][0, : s.n] > 0).flatten()
        assert in_bin.numel() > 0
        slot = int(in_bin[0])
        p = int(s.pos[0, slot])
        assert all(bool(h.extras["hidden_from_attention"][0, slot] > 0) for h in layer.heads)
        out = model(nxt, **cache_kwargs(model, cache))  # while in the bin: stored, scored, not read
        assert not bool(rec.records[-1][layer.layer_idx][0, :, p].any())
        nxt = out.logits[:, -1:].argmax(-1)
        slot = int(torch.nonzero(s.pos[0, : s.n] == p))
        s.extras["accumulated_attention"][0, slot] = 1e3  # its attention rose: it beats the next victim and swaps back
        out = model(nxt, **cache_kwargs(model, cache))
        slot = int(torch.nonzero(s.pos[0, : s.n] == p))
        assert s.extras["in_recycle_bin"][0, slot] == 0 and all(h.extras["hidden_from_attention"][0, slot] == 0 for h in layer.heads)
        nxt = out.logits[:, -1:].argmax(-1)
        model(nxt, **cache_kwargs(model, cache))
        assert bool(rec.records[-1][layer.layer_idx][0, :, p].all())  # read again by the next query


@pytest.mark.parametrize("bin_attend", [True, False])
def test_hard_and_soft_delete_equal_the_masked_full_cache(bin_attend):
    model = tiny_llama()
    ids = prompt(40)
    cache = KVCache(model, "hae", 12, recent=4, n_sink=2, bin_size=3, bin_attend=bin_attend)
    with Recorder() as rec:
        got, fed = run_steps(model, ids, None, cache, 10)
    want = masked_reference(model, ids, None, rec.records, fed)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4


def test_ddes_broadcast_gives_every_layer_the_same_entries():
    model = tiny_llama()
    cache = KVCache(model, "hae", 12, recent=4, n_sink=2, bin_size=3, ddes_broadcast=True)
    run_steps(model, prompt(40), None, cache, 12)
    sets = kept(cache)
    first = sets[0][0]
    assert len(first) <= 12 + 3
    assert all(heads == [first] * len(heads) for heads in sets.values())
    for layer in cache.managed_layers[1:]:  # decided once: later layers carry no scores of their own
        assert "accumulated_attention" not in layer.heads[0].extras and "in_recycle_bin" not in layer.heads[0].extras


@torch.no_grad()
def test_ddes_broadcast_applies_the_first_layers_own_decision_at_every_step():
    # Layer 0's decisions depend only on the tokens fed (its input is their embedding), so with the same teacher-forced
    # tokens a broadcasting cache must hold, in every layer and head, exactly the set layer 0 keeps without broadcast
    model = tiny_llama()
    for layer in model.model.layers:  # sharper attention than random weights give, so that the layers disagree
        layer.self_attn.q_proj.weight *= 4
        layer.self_attn.k_proj.weight *= 4
    ids = prompt(40)
    tail = prompt(16, seed=5)
    feed = [tail[:, i : i + 1] for i in range(tail.shape[1])]
    params = dict(recent=4, n_sink=2, bin_size=3)
    own = KVCache(model, "hae", 0.3, **params)
    bcast = KVCache(model, "hae", 0.3, ddes_broadcast=True, **params)
    for c in (own, bcast):
        model(ids, **cache_kwargs(model, c))
    layers_differ = False
    for step in range(len(feed) + 1):
        sets_own, sets_bcast = kept(own), kept(bcast)
        first = sets_own[0][0]
        assert sets_own[0] == [first] * len(sets_own[0])  # layer 0 decides on its first head for all its heads
        for heads in sets_bcast.values():
            assert heads == [first] * len(heads), f"step {step}"
        layers_differ |= any(heads[0] != first for heads in sets_own.values())
        if step < len(feed):
            for c in (own, bcast):
                model(feed[step], **cache_kwargs(model, c))
    assert layers_differ  # without broadcast the later layers decide otherwise: the broadcast changed something
    assert len(first) <= -(-3 * (40 + len(feed)) // 10) + 3  # capacity 0.3 of the tokens seen plus the bin: emptied


def test_visual_tokens_are_evicted_first_while_decoding():
    model = llava3()
    ids, extra = llava_inputs(images=2)
    n = ids.shape[1]
    cache = hae_cache(model, ids, budget=n - 8, tau_g=0.0, tau_i=0.0, recent=4, n_sink=2, bin_size=2)
    run_steps(model, ids, None, cache, 6, extra=extra)
    lay = detect_modality(model.config, ids).ids[0]
    text = set(torch.nonzero(lay == TEXT).flatten().tolist())
    for heads in kept(cache).values():
        assert text <= set(heads[0]) | set(range(n, n + 6))  # 14 entries gone, all of them image tokens


def test_errors():
    from test_modality import gemma3, gemma3_inputs

    text_model = tiny_gemma3()
    run_steps(text_model, prompt(30), None, KVCache(text_model, "hae", 0.5), 2)  # text only: nothing to prune
    model = gemma3()
    ids, extra = gemma3_inputs()
    with pytest.raises(ValueError, match="kv_only"):  # sliding-window layers cannot run on pruned hidden states
        run_steps(model, ids, None, hae_cache(model, ids, thresholds="absolute", tau_g=1.0, tau_i=1.0), 1, extra=extra)
    run_steps(model, ids, None, hae_cache(model, ids, thresholds="absolute", tau_g=1.0, tau_i=1.0, mode="kv_only"), 1, extra=extra)
    with pytest.raises(ValueError, match="tau_g"):
        KVCache(tiny_llama(), "hae", 0.5, thresholds="absolute", tau_g=1.5)  # a share above the whole
    with pytest.raises(ValueError, match="tau_i"):
        KVCache(tiny_llama(), "hae", 0.5, tau_i=-0.5)
    with pytest.raises(TypeError, match="thresholds"):
        KVCache(tiny_llama(), "hae", 0.5, thresholds="paper")
    with pytest.raises(TypeError, match="mode"):
        KVCache(tiny_llama(), "hae", 0.5, mode="everything")


@pytest.mark.parametrize("vlm", [False, True])
def test_one_sequence_decides_like_a_batch_of_two(vlm):
    """One sequence and a batch of the same sequence twice (the batched tensor path) keep the same entries and give
    the same logits, recycle-bin moves and restores included."""
    if vlm:
        model = llava3()
        ids, extra = llava_inputs(images=2)
        kw = dict(budget=30, tau_g=0.0, tau_i=0.0, recent=4, n_sink=2, bin_size=3, mode="kv_only")
        make = lambda rows: hae_cache(model, ids.expand(rows, -1), **kw)  # noqa: E731
        extra2 = {"pixel_values": torch.cat([extra["pixel_values"]] * 2)}
    else:
        model, ids, extra, extra2 = tiny_llama(), prompt(40), None, None
        make = lambda rows: KVCache(model, "hae", 0.3, recent=4, n_sink=2, bin_size=3)  # noqa: E731
    one = make(1)
    got, fed = run_steps(model, ids, None, one, 14, extra=extra)
    two = make(2)
    want, _ = run_steps(model, ids.expand(2, -1), None, two, 14, feed=[f.expand(2) for f in fed], extra=extra2)
    for layer1, layer2 in zip(one.managed_layers, two.managed_layers):
        for s1, s2 in zip(layer1.heads, layer2.heads):
            for row in range(2):
                assert sorted(s1.pos[0, : s1.n].tolist()) == sorted(s2.pos[row, : s2.n][s2.valid[row, : s2.n]].tolist())
    for g, w in zip(got, want):
        assert (g - w[0]).abs().max() < 1e-4 and (g - w[1]).abs().max() < 1e-4


def test_pruned_batch_rows_keep_equally_many_and_the_least_pruned_row_is_unchanged():
    model = llava3()
    ids, extra = llava_inputs(images=2)
    other = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    singles = []
    for pix in (extra["pixel_values"], other):
        c = hae_cache(model, ids, mode="prune", **DAP)
        got, fed = run_steps(model, ids, None, c, 3, extra={"pixel_values": pix})
        singles.append((int(c.method.dap_evicted[0]), got, fed))
    assert singles[0][0] != singles[1][0]  # the two images lose different numbers of tokens alone
    least = min(range(2), key=lambda r: singles[r][0])
    batch = ids.expand(2, -1)
    cache = hae_cache(model, batch, mode="prune", **DAP)
    with torch.no_grad():
        out = model(input_ids=batch, pixel_values=torch.cat([extra["pixel_values"], other]),
                    **cache_kwargs(model, cache))
    assert cache.method.dap_evicted.tolist() == [singles[least][0]] * 2  # pruned as little as the least-pruned row
    assert (out.logits[least, -1] - singles[least][1][0][0]).abs().max() < 1e-4
    for layer in cache.managed_layers:
        for s in layer.heads:
            assert s.valid[:, : s.n].sum(-1).tolist() == [ids.shape[1] - singles[least][0]] * 2


@torch.no_grad()
def test_capacity_below_the_protected_windows_keeps_sinks_then_the_newest():
    model = tiny_llama()
    cache = KVCache(model, "hae", 6, bin_size=2)  # 4 sinks + 32 recent by default: more than fits
    out = model(prompt(40), **cache_kwargs(model, cache))
    assert all(h == [0, 1, 2, 3, 38, 39] for heads in kept(cache).values() for h in heads)
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(10):
        out = model(nxt, **cache_kwargs(model, cache))
        nxt = out.logits[:, -1:].argmax(-1)
        for active, in_bin, stored in _counts(cache):
            assert active <= 6 and stored <= 6 + 2


def test_a_captured_prefill_refuses_to_stand_in_for_pruning():
    from modalkv.replay import capture_prefill

    model = llava3()
    ids, extra = llava_inputs(images=2)
    cap = capture_prefill(model, ids, **extra)
    with pytest.raises(ValueError, match="prompt forward"):
        cap.build_cache(model, "hae", 1.0, **DAP)
    replayed = cap.build_cache(model, "hae", 1.0, mode="kv_only", **DAP)  # kv_only is the same forward
    live = hae_cache(model, ids, mode="kv_only", **DAP)
    with torch.no_grad():
        model(input_ids=ids, **extra, **cache_kwargs(model, live))
    assert kept(replayed) == kept(live)

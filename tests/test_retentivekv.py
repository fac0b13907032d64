"""RetentiveKV: the states read back what eviction removed, absorb nothing when told to, stay one size and count
inside the byte budget; the 2-D scan and the entropy gates follow their recurrences.

The shared suites run RetentiveKV with tau > 1 (its states absorb no text token): exactly the masked full cache
(test_exactness), within budget (test_invariants), replayable (test_replay)."""

import math
import types

import pytest
import torch
from transformers import DynamicCache

from helpers import prompt, run_steps, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.methods import retentive_memory as mem
from modalkv.methods.retentivekv import SPATIAL, SPATIAL_V, RetentiveKV

STEPS = 8
SMALL = {"window": 4, "n_sink": 2}
ONTOP = {**SMALL, "states_in_budget": False}  # the states on top of the entries: the same entries with or without them


def _exact_attention(q, K, V):
    p = torch.softmax(q @ K.transpose(-1, -2), -1)
    return p @ V


@pytest.mark.parametrize("second_order", [False, True])
def test_softmax_readout_reads_one_absorbed_token_exactly(second_order):
    """The first-order moment readout is exact for a state holding one token (or tokens with equal keys), at any
    decay scale: attention over the kept entries + the state == exact attention over kept + absorbed."""
    torch.manual_seed(0)
    B, d, n, r = 2, 8, 5, 3
    m = RetentiveKV(second_order=second_order, state_readout="moments")
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


@pytest.mark.parametrize("readout", ["scan", "moments", "linear"])
def test_states_that_absorb_nothing_give_exactly_the_eviction(readout):
    model = tiny_llama()
    ids = prompt(48)
    plain = KVCache(model, "retentivekv", 0.4, state_readout="none", **ONTOP)
    want, fed = run_steps(model, ids, None, plain, STEPS)
    empty = KVCache(model, "retentivekv", 0.4, state_readout=readout, tau=2.0, **ONTOP)
    got, _ = run_steps(model, ids, None, empty, STEPS, feed=fed)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    st = empty.method._states[0]
    assert float(st["z" if readout == "linear" else "m"].abs().sum()) == 0.0  # nothing was absorbed
    assert empty.memory_report()["state_bytes"] > 0  # the (empty) states still count


def test_states_read_back_evicted_tokens():
    """Reactivation at the model level: with the states, logits stay far closer to the full cache than plain
    eviction of the same entries at the same budget (the same entries are kept: selection ignores the states)."""
    model = tiny_llama()
    ids = prompt(64)
    full, fed = run_steps(model, ids, None, DynamicCache(config=model.config), STEPS)

    def error(**kw):
        cache = KVCache(model, "retentivekv", 0.3, **ONTOP, **kw)
        got, _ = run_steps(model, ids, None, cache, STEPS, feed=fed)
        return sum(float((g - f).abs().mean()) for g, f in zip(got, full))

    e_none = error(state_readout="none")
    e_soft = error(state_readout="moments")
    e_single = error(state_readout="moments", states="single")
    e_scan = error()
    assert e_soft < 0.2 * e_none and e_single < 0.2 * e_none
    assert e_scan < 0.5 * e_none  # the gates let less in, and the readout gate reads less out
    assert e_none > 0.05  # eviction alone really changed the logits
    # the prompt forward is exact, so the states do not change which entries the prefill keeps
    caches = [KVCache(model, "retentivekv", 0.3, state_readout=r, **ONTOP) for r in ("none", "scan", "moments")]
    with torch.no_grad():
        for cache in caches:
            model(ids, **cache_kwargs(model, cache))
    for a, *others in zip(*(c.managed_layers for c in caches)):
        for b in others:
            for s, t in zip(a.heads, b.heads):
                assert torch.equal(s.pos[:, : s.n], t.pos[:, : t.n])


@torch.no_grad()
def test_decode_evictions_are_absorbed():
    model = tiny_llama()
    cache = KVCache(model, "retentivekv", 0.3, tau=0.0, state_readout="moments", **ONTOP)
    with torch.no_grad():
        model(prompt(40), **cache_kwargs(model, cache))
    g = cache.method._groups.index("t")  # a text prompt: the recall state only
    before = cache.method._states[0]["m"][:, :, g].clone() * cache.method._states[0]["scale"][:, :, g]
    for t in range(6):
        model(input_ids=torch.tensor([[t + 3]]), **cache_kwargs(model, cache))
    st = cache.method._states[0]
    after = st["m"][:, :, g] * st["scale"][:, :, g]
    # tau = 0 absorbs every text victim; decay (h >= h_min = 0.9 per step) cannot undo 6 absorptions of weight 1
    assert bool((after > before * 0.9**6 + 1).all())
    for layer in cache.managed_layers:
        for h, s in enumerate(layer.heads):
            assert s.count() <= int(layer.decode_targets(h).max())


@pytest.mark.parametrize("readout, groups", [("scan", 3), ("moments", 2)])
def test_state_memory_is_constant_in_length_and_images(readout, groups):
    model = tiny_llama()
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    H, L = cfg.num_key_value_heads, cfg.num_hidden_layers
    sizes = []
    for n, images in [(40, 0), (160, 0), (80, 1), (160, 4)]:
        cache = KVCache(model, "retentivekv", 0.25, state_readout=readout, **ONTOP)
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
    # per (layer, KV head) the recall state, and with images the visual ones (the scan's horizontal and vertical
    # sub-states, or one moment state): m, s, u, M and the lazy decay scale, float32
    one = L * H * (1 + d + d + d * d + 1) * 4
    assert sizes == [one, one, groups * one, groups * one]


def test_visual_tokens_go_to_the_visual_state_with_spatial_weights():
    model = tiny_llama()
    n = 48
    mod = torch.zeros(1, n, dtype=torch.long)
    mod[0, 4:29] = 1  # one 5 x 5 image
    cache = KVCache(model, "retentivekv", 0.25, gamma_s=0.5, state_readout="moments", **ONTOP)
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
    """R = lam * alpha / max alpha + (1 - lam) * H / max H with H = -p log p within the group: the entropy term lets a
    token near p = 1/e outrank a more attended one, and ranks a dominant token below middling ones when lam = 0."""
    alpha = torch.tensor([[0.55, 0.37, 0.05, 0.03, 0.0]])
    group = torch.tensor([[True, True, True, True, False]])
    p = alpha[0, :4]
    ent = -p * torch.log(p)
    for lam in (0.0, 0.2, 0.7, 1.0):
        R = mem.retention_score(alpha, group, lam)
        want = lam * p / p.max() + (1 - lam) * ent / ent.max()
        assert torch.allclose(R[0, :4], want, atol=1e-6)
        assert float(R[0, 4]) == 0.0  # outside the group
    mixed = mem.retention_score(alpha, group, 0.2)[0]
    assert float(mixed[1]) > float(mixed[0]) > float(mixed[2]) > float(mixed[3])  # B (p = 0.37) outranks A (0.55)
    attention_only = mem.retention_score(alpha, group, 1.0)[0]
    assert float(attention_only[0]) > float(attention_only[1])
    # one dominant token (p = 0.9) and two middling ones: by entropy alone the middling ones rank first
    dominant = mem.retention_score(torch.tensor([[0.9, 0.05, 0.05]]), torch.ones(1, 3, dtype=torch.bool), 0.0)[0]
    assert float(dominant[1]) == float(dominant[2]) == 1.0 and 0.5 < float(dominant[0]) < 0.7


def test_decay_gate_rises_with_entropy_and_acts_in_the_scan():
    """The decay (retention) gate of a token rises with its entropy, from h_min to 1; in the recall state's scan the
    tokens absorbed after a token decay it by their gates, so high-entropy successors keep it longer."""
    h = torch.linspace(0, 1, 11)
    d = mem.decay_gate(h, 0.9, 10.0, 0.5)
    assert bool((d[1:] > d[:-1]).all())  # monotone, increasing: more uncertainty, slower forgetting
    assert 0.9 < float(d[0]) < 0.901 and 0.999 < float(d[-1]) < 1.0 and abs(float(d[5]) - 0.95) < 1e-6
    a = mem.input_gate(h, 10.0, 0.0)
    assert bool((a[1:] > a[:-1]).all()) and abs(float(a[0]) - 0.5) < 1e-6
    # S <- d_i S + a_i x_i over three tokens: token 0 is decayed by the gates of tokens 1 and 2
    ones, mask = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    later = torch.tensor([[0.5, 0.1, 0.1], [0.5, 0.9, 0.9]])  # the entropies of the tokens absorbed after token 0
    w, total = mem.scan1d(ones, mem.decay_gate(later, 0.5, 10.0), mask)
    g = mem.decay_gate(later, 0.5, 10.0)
    assert torch.allclose(w[:, 0], g[:, 1] * g[:, 2]) and torch.allclose(w[:, 2], torch.ones(2))
    assert torch.allclose(total, g.prod(-1))
    assert float(w[1, 0]) > float(w[0, 0])  # high-entropy successors keep the first token longer
    # the decode path: the first victim's weight in the recall state carries the second victim's decay gate
    m = RetentiveKV(h_min=0.5, tau=0.0, gate_centre=0.5)
    m.setup(None)
    m._groups = ["t"]
    firsts = []
    for second in (0.3, 0.1):  # attention of the second victim among four text entries; 0.3 is nearer 1/e
        att = torch.tensor([[0.2, second, 0.7 - second, 0.1]])
        text = torch.ones(1, 4, dtype=torch.bool)
        flat = {SPATIAL.name: torch.zeros(1, 4), SPATIAL_V.name: torch.zeros(1, 4)}
        (w, dec), = m._victim_weights(att, ~text, text, flat, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool), 4)
        h_hat = mem.token_entropy(att, text)
        assert torch.allclose(w[0, 0], mem.input_gate(h_hat[0, 0], m.beta, m.gate_centre) * mem.decay_gate(h_hat[0, 1], 0.5, m.beta, m.gate_centre))
        firsts.append(float(w[0, 0]) / float(mem.input_gate(h_hat[0, 0], m.beta, m.gate_centre)))
    assert firsts[0] > firsts[1]


def _reference_scan(row, col, root, gate, gamma_h, gamma_v):
    """The 2-D scan written as its recurrences, one token at a time: each row scanned from both ends toward the root's
    column (the state decays by gamma_h * gate of the token it enters, then adds it), rows summed; the same down the
    columns toward the root's row. Returns each token's weight in the two sub-states (its x is one-hot)."""
    m = row.numel()
    cell = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(row, col))}
    rows, cols = int(row.max()) + 1, int(col.max()) + 1
    out = []
    for gamma, lines, length, target, at in ((gamma_h, rows, cols, int(col[root]), lambda line, j: (line, j)),
                                             (gamma_v, cols, rows, int(row[root]), lambda line, j: (j, line))):
        w = torch.zeros(m)
        for line in range(lines):
            for order in (range(0, target + 1), range(length - 1, target - 1, -1)):
                state = torch.zeros(m)
                for j in order:
                    i = cell.get(at(line, j))
                    if i is None:
                        continue
                    state = gamma * float(gate[i]) * state
                    if j != target or order.step == 1:  # the root's cell enters once, from the left/top scan
                        state[i] += 1.0
                w += state
        out.append(w)
    return out


def test_scan2d_weights_follow_the_row_and_column_recurrences():
    """A token at grid (r, c) enters the horizontal scan of row r and the vertical scan of column c; its weight in
    each sub-state is what those recurrences leave of it at the root's column / row (not one Manhattan weight)."""
    torch.manual_seed(0)
    rows, cols = 3, 4
    row = torch.arange(rows).repeat_interleave(cols)
    col = torch.arange(cols).repeat(rows)
    gate = 0.5 + 0.5 * torch.rand(2, rows * cols)
    root = torch.tensor([6, 1])  # head 0: (1, 2); head 1: (0, 1)
    w_h, w_v = mem.scan2d_weights(row, col, root, gate, 0.8, 0.6)
    for h in range(2):
        ref_h, ref_v = _reference_scan(row, col, int(root[h]), gate[h], 0.8, 0.6)
        assert torch.allclose(w_h[h], ref_h, atol=1e-6) and torch.allclose(w_v[h], ref_v, atol=1e-6)
    # with every gate 1: gamma_h ** |c - c_root| and gamma_v ** |r - r_root|, each direction its own decay
    w_h, w_v = mem.scan2d_weights(row, col, torch.tensor([6]), torch.ones(1, rows * cols), 0.5, 0.25)
    assert torch.allclose(w_h[0], 0.5 ** (col - 2).abs().float())
    assert torch.allclose(w_v[0], 0.25 ** (row - 1).abs().float())


def test_visual_tokens_enter_the_horizontal_and_vertical_sub_states():
    """End to end on a 5 x 5 image: every visual entry carries its scan weights (gamma_h ** column distance,
    gamma_v ** row distance to its head's root when the gates are constant), and the horizontal and vertical
    sub-states hold exactly the evicted image tokens with those weights times their input gate (no text)."""
    model = tiny_llama()
    n = 48
    mod = torch.zeros(1, n, dtype=torch.long)
    mod[0, 4:29] = 1
    # beta = 0: every input gate is 1/2, every decay gate h_min + (1 - h_min) / 2 = 1
    cache = KVCache(model, "retentivekv", 0.3, gamma_h=0.5, gamma_v=0.25, beta=0.0, h_min=1.0, **ONTOP)
    cache.set_modality(mod)
    with torch.no_grad():
        model(prompt(n), **cache_kwargs(model, cache))
    method = cache.method
    assert method._groups == ["h", "v", "t"]
    st = method._states[0]
    grid = torch.arange(25)
    r_all, c_all = grid // 5, grid % 5
    for h, s in enumerate(cache.managed_layers[0].heads):
        pos = s.pos[0, : s.n].long()
        vis = (pos >= 4) & (pos < 29)
        r, c = (pos[vis] - 4) // 5, (pos[vis] - 4) % 5
        sw, sv = s.extras["spatial_weight"][0, : s.n][vis], s.extras["spatial_weight_vertical"][0, : s.n][vis]
        roots = [(rr, cc) for rr in range(5) for cc in range(5)
                 if torch.allclose(sw, 0.5 ** (c - cc).abs().float()) and torch.allclose(sv, 0.25 ** (r - rr).abs().float())]
        assert roots, "the kept entries' weights fit no root patch"
        evicted = torch.ones(25, dtype=torch.bool)
        evicted[pos[vis] - 4] = False
        assert bool(evicted.any())
        rr, cc = roots[0]
        want_h = 0.5 * (0.5 ** (c_all - cc).abs().float())[evicted].sum()
        want_v = 0.5 * (0.25 ** (r_all - rr).abs().float())[evicted].sum()
        assert torch.allclose(st["m"][0, h, 0], want_h, atol=1e-5)
        assert torch.allclose(st["m"][0, h, 1], want_v, atol=1e-5)


@pytest.mark.parametrize("readout", ["scan", "moments", "none"])
def test_states_count_inside_the_byte_budget(readout):
    """A VLM-like prompt (an 8 x 8 image inside text): kept bytes, states included, never exceed budget x the full
    cache's bytes, after the prompt and after every decode step; where the states fit they are kept (fewer entries
    than plain eviction at the same bytes), where they do not the memory is off (plain eviction)."""
    model = tiny_llama()
    n = 160
    mod = torch.zeros(1, n, dtype=torch.long)
    mod[0, 8:72] = 1
    ids = prompt(n)
    for budget, memory in ((0.5, True), (0.3, True), (0.1, False)):
        cache = KVCache(model, "retentivekv", budget, state_readout=readout, **SMALL)
        cache.set_modality(mod)
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
            for t in range(7):
                rep = cache.memory_report()
                assert rep["kept_bytes"] <= budget * rep["full_bytes"], (budget, t, rep)
                assert rep["kept_bytes"] > 0.9 * budget * rep["full_bytes"]  # and the budget is used
                model(input_ids=torch.tensor([[t + 3]]), **cache_kwargs(model, cache))
        on = readout != "none" and memory
        assert cache.method.has_readout == on and (rep["state_bytes"] > 0) == on
        if on:
            plain = KVCache(model, "retentivekv", budget, state_readout="none", **SMALL)
            plain.set_modality(mod)
            with torch.no_grad():
                model(ids, **cache_kwargs(model, plain))
            assert plain.memory_report()["entries_kept"] > rep["entries_kept"]


@pytest.mark.real
def test_absorbed_tokens_are_reactivated_on_real_weights():
    """SmolLM2-135M, a 125-token prompt at budget 0.25 with the states on top of the same entries: over the next two
    decode steps the tokens read back from the states bring the next-token distribution closer to the full cache's
    than plain eviction of the same entries (KL summed over the steps), for the scan memory and the moment memory."""
    from modalkv.models import load_model

    model, tok = load_model("smollm2-135m")
    text = ("The museum opened in 1931. Its first curator, Adelaide Fenwick, catalogued 4,812 beetles, "
            "and the east wing holds a blue whale skeleton. " * 3) + " Question: who was the first curator? Answer:"
    ids = tok(text, return_tensors="pt").input_ids

    def kl(full, got):
        return sum(float(torch.nn.functional.kl_div(torch.log_softmax(g, -1), torch.log_softmax(f, -1),
                                                    log_target=True, reduction="sum")) for f, g in zip(full, got))

    with torch.no_grad():
        full, fed = run_steps(model, ids, None, DynamicCache(config=model.config), 2)
        errors = {}
        for readout in ("none", "scan", "moments"):
            cache = KVCache(model, "retentivekv", 0.25, state_readout=readout, states_in_budget=False)
            got, _ = run_steps(model, ids, None, cache, 2, feed=fed)
            errors[readout] = kl(full, got)
    assert errors["none"] > 0.1  # eviction alone changed the answer's distribution
    assert errors["scan"] < 0.8 * errors["none"] and errors["moments"] < 0.8 * errors["none"], errors


@pytest.mark.parametrize("bad, message", [({"lam": 1.5}, "lam"), ({"gamma_s": 0.0}, "gamma_s"),
                                          ({"state_readout": "cubic"}, "state_readout"), ({"window": 0}, "window")])
def test_bad_parameters_are_named(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RetentiveKV(**bad)


def test_generate_works_with_states():
    model = tiny_llama()
    ids = prompt(40)
    cache = KVCache(model, "retentivekv", 0.5, **SMALL)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(model, cache))
    assert out.shape[1] == 46
    assert cache.memory_report()["state_bytes"] > 0


@pytest.mark.parametrize("kw", [{}, {"state_readout": "moments"}, {"state_readout": "linear"},
                                {"states": "single", "absorb_by_attention": True, "state_readout": "moments"},
                                {"states": "single"}, {"states_in_budget": True}])
@pytest.mark.parametrize("image", [False, True])
def test_one_sequence_fast_path_equals_the_batched_path(kw, image):
    """The layer-vectorised one-sequence step (_decode_one) and the per-head path give the same logits: a batch of
    two identical rows takes the per-head path."""
    model = tiny_llama()
    ids = prompt(56)
    mod = torch.zeros(1, 56, dtype=torch.long)
    if image:
        mod[0, 6:31] = 1  # a 5 x 5 image

    def cache(rows):
        c = KVCache(model, "retentivekv", 0.3, tau=0.0, **{**ONTOP, **kw})
        c.set_modality(mod.repeat(rows, 1))
        return c

    one, fed = run_steps(model, ids, None, cache(1), STEPS)
    two, _ = run_steps(model, ids.repeat(2, 1), None, cache(2), STEPS, feed=[f.repeat(2) for f in fed])
    for a, b in zip(one, two):
        assert (a[0] - b[0]).abs().max() < 1e-4 and (a[0] - b[1]).abs().max() < 1e-4

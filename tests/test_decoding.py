"""The one decode-time eviction routine (modalkv.decoding): victims, ties, rows with different counts, protection,
the on_evict hook, packed and per-head layers, and the budget at every step through the public API."""

import math

import pytest
import torch

from helpers import SMALL, left_pad, prompt, run_steps, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.decoding import INF, DecodeStep


@torch.no_grad()
def prefilled(method="snapkv", budget=12, n=30, batch=1, **kw):
    model = tiny_llama()
    cache = KVCache(model, method, budget, **{**SMALL.get(method, {}), **kw})
    model(prompt(n, batch=batch), **cache_kwargs(model, cache))
    return cache, cache.managed_layers[0]


def positions(store, row=0):
    return sorted(store.pos[row, : store.n][store.valid[row, : store.n]].tolist())


@pytest.mark.parametrize("packed", [True, False])
def test_evicts_the_lowest_scores_and_keeps_positions(packed):
    cache, layer = prefilled()
    if not packed:
        layer.packed = False
    step = DecodeStep(layer, None)
    groups = step.groups()
    assert len(groups) == (1 if packed else 2)
    before = [positions(st) for st in layer.heads]
    seen = []
    for g in groups:
        score = g.pos.float()  # evict the two oldest entries of every head
        g.evict(score, 2, on_evict=lambda g, victims, use: seen.append(g.pos.gather(-1, victims)))
    for h, st in enumerate(layer.heads):
        assert positions(st) == before[h][2:] and st.n == len(before[h]) - 2
    assert sorted(torch.cat([s.flatten() for s in seen]).tolist()) == sorted(sum((b[:2] for b in before), []))


def test_one_entry_per_step_swaps_the_last_slot_in_packed_layers():
    cache, layer = prefilled()
    step = DecodeStep(layer, None)
    (g,) = step.groups()
    assert g.packed
    keys_before = [st.keys[0, : st.n].clone() for st in layer.heads]
    pos_before = [st.pos[0, : st.n].clone() for st in layer.heads]
    score = torch.zeros(1, 2, g.n)
    score[0, 0, 3] = score[0, 1, 5] = -1.0  # head 0 loses slot 3, head 1 slot 5
    g.evict(score, 1)
    for st, k, p, slot in zip(layer.heads, keys_before, pos_before, (3, 5)):
        assert st.n == len(p) - 1
        assert int(st.pos[0, slot]) == int(p[-1]) and torch.equal(st.keys[0, slot], k[-1])  # the last slot moved in
        assert layer.packed_intact()


def test_ties_inf_and_keep_protected():
    cache, layer = prefilled()
    (g,) = DecodeStep(layer, None).groups()
    n = g.n
    score = torch.full((1, 2, n), INF)
    score[..., 0] = 1.0
    g.evict(score, 1, keep_protected=True)  # one finite entry per head: only it goes
    assert all(st.n == n - 1 for st in layer.heads)
    g = DecodeStep(layer, None).groups()[0]
    g.evict(torch.full((1, 2, g.n), INF), 2, keep_protected=True)  # everything protected: nothing goes
    assert all(st.n == n - 1 for st in layer.heads)
    g.evict(torch.full((1, 2, g.n), INF), 2)  # protected entries go last, but they go
    assert all(st.n == n - 3 for st in layer.heads)
    g = DecodeStep(layer, None).groups()[0]
    ties = torch.zeros(1, 2, g.n)  # all tied: exactly the count goes, nothing else changes
    g.evict(ties, 1)
    assert all(st.n == n - 4 and st.count() == n - 4 for st in layer.heads)


def test_rows_with_different_counts_and_skip():
    cache, layer = prefilled(batch=2)
    (g,) = DecodeStep(layer, None).groups()
    before = [[positions(st, r) for r in range(2)] for st in layer.heads]
    count = torch.tensor([[1, 3], [0, 2]])  # [B, H]
    g.evict(g.pos.float(), count, skip=torch.tensor([[2, 0], [1, 1]]))
    for h, st in enumerate(layer.heads):
        for r in range(2):
            c, k = int(count[r, h]), int(torch.tensor([[2, 0], [1, 1]])[r, h])
            want = before[h][r][:k] + before[h][r][k + c:]
            assert positions(st, r) == want
        assert st.n == max(len(positions(st, r)) for r in range(2))  # shrunk as far as the batch allows


def test_over_is_an_int_for_one_sequence_and_a_tensor_for_a_batch():
    _, layer = prefilled("h2o", 12)
    assert isinstance(DecodeStep(layer, None).groups()[0].over(), int)
    _, layer = prefilled("h2o", 12, batch=2)
    over = DecodeStep(layer, None).groups()[0].over()
    assert isinstance(over, torch.Tensor) and over.shape == (2, 2)


@pytest.mark.parametrize("method", ["h2o", "streamingllm", "retentivekv", "knorm", "hae"])
def test_budget_holds_at_every_step_and_positions_are_unique(method):
    model = tiny_llama()
    budget = 12
    cache = KVCache(model, method, budget, **SMALL.get(method, {}))
    extra = SMALL["hae"]["bin_size"] if method == "hae" else 0  # HAE's bin holds soft-deleted entries too
    ids = prompt(30)
    out = model(ids, **cache_kwargs(model, cache))
    nxt = out.logits[:, -1:].argmax(-1)
    with torch.no_grad():
        for t in range(15):
            out = model(nxt, **cache_kwargs(model, cache))
            nxt = out.logits[:, -1:].argmax(-1)
            for layer in cache.managed_layers:
                for st in layer.heads:
                    pos = positions(st)
                    assert len(pos) <= budget + extra and len(set(pos)) == len(pos)
                    if method != "knorm":  # (knorm keeps by key norm alone)
                        assert pos[-1] == 30 + t  # the newest token is kept
                    assert all(0 <= p <= 30 + t for p in pos)


@pytest.mark.parametrize("method", ["h2o", "streamingllm", "retentivekv", "knorm", "hae"])
def test_one_sequence_equals_its_row_in_a_padded_batch(method):
    """The one-sequence path (Python-int counts, swap-with-last) and the batched path (tensor counts, rows of
    different lengths) make the same decisions: each row of a left-padded batch gives the logits of its sequence
    alone."""
    model = tiny_llama()
    rows = [prompt(36, seed=2)[0], prompt(27, seed=3)[0]]
    ids, mask = left_pad(rows)
    kw = SMALL.get(method, {})
    # distinct fed tokens: a repeated token has keys of equal norm at the first layer (RoPE keeps norms), a tie
    # that float noise would break differently in a batch
    fed = [torch.tensor([t + 1, t + 1]) for t in range(10)]
    batch, _ = run_steps(model, ids, mask, KVCache(model, method, 0.3, **kw), 10, feed=fed)
    for r, row in enumerate(rows):
        single, _ = run_steps(model, row[None], None, KVCache(model, method, 0.3, **kw), 10, feed=[f[r:r + 1] for f in fed])
        for a, b in zip(single, batch):
            assert (a[0] - b[r]).abs().max() < 1e-4


def test_decode_budget_recent_policy_keeps_sinks_and_the_newest():
    model = tiny_llama()
    cache = KVCache(model, "snapkv", 16, decode_budget=10, decode_policy="recent", window=4, kernel=3)
    with torch.no_grad():
        out = model(prompt(30), **cache_kwargs(model, cache))
    sinks = [positions(st)[:4] for layer in cache.managed_layers for st in layer.heads]
    with torch.no_grad():
        for t in range(6):
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache))
    stores = [st for layer in cache.managed_layers for st in layer.heads]
    for st, first in zip(stores, sinks):
        pos = positions(st)
        assert len(pos) == 10 and pos[:4] == first and pos[4:] == list(range(30, 36))

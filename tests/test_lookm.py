"""LOOK-M: text prior, merging of evicted entries into their most similar kept entry, exactness without merging."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from helpers import Recorder, masked_reference, prompt, run_steps, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.modality import IMAGE


def image_ids(n, start, stop):
    ids = torch.zeros(1, n, dtype=torch.long)
    ids[0, start:stop] = IMAGE
    return ids


def kept_positions(store):
    return store.pos[0, : store.n][store.valid[0, : store.n]].long()


def test_text_prior_evicts_visual_tokens_first(impl):
    model = tiny_llama(impl)
    ids = prompt(48)
    cache = KVCache(model, "lookm", 0.5, merge="none")
    cache.set_modality(image_ids(48, 4, 28))  # 24 visual tokens, 24 text tokens, budget 24 with 12 recent
    run_steps(model, ids, None, cache, 1)
    for layer in cache.managed_layers:
        for store in layer.heads:
            kept = kept_positions(store)
            visual = kept[(kept >= 4) & (kept < 28)]
            assert visual.numel() == 0  # 12 recent (all text) + the 12 best of the 12 other text tokens
            assert kept.numel() == 24 + 1  # + the decoded token


def test_without_merging_equals_masked_full_cache(impl):
    model = tiny_llama(impl)
    ids = prompt(48)
    cache = KVCache(model, "lookm", 0.25, merge="none")
    cache.set_modality(image_ids(48, 10, 30))
    with Recorder() as rec:
        got, fed = run_steps(model, ids, None, cache, 6)
    want = masked_reference(model, ids, None, rec.records, fed)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4


@pytest.mark.parametrize("merge", ["average", "weighted", "pivotal"])
def test_merged_entries_follow_the_formula(merge):
    """Recompute one layer's merge by brute force from the prompt's keys and values."""
    model = tiny_llama("sdpa")
    ids = prompt(40)
    captured = {}

    from modalkv.methods.lookm import LookM

    orig = LookM._merged

    def spy(self, ctx, idx):
        out = orig(self, ctx, idx)
        captured.setdefault(ctx.layer.layer_idx, (ctx.keys.clone(), ctx.values.clone(), ctx.real.clone(), idx, out))
        return out

    LookM._merged = spy
    try:
        cache = KVCache(model, "lookm", 0.25, merge=merge, merge_threshold="none")
        run_steps(model, ids, None, cache, 0)
    finally:
        LookM._merged = orig
    keys, values, real, idx, (mk, mv, _) = captured[0]
    h = 1
    kept = idx[0, h][idx[0, h] >= 0]
    evicted = torch.tensor([i for i in range(40) if i not in set(kept.tolist())])
    sims = F.normalize(keys[0, h, evicted], dim=-1) @ F.normalize(keys[0, h, kept], dim=-1).T
    best = sims.argmax(-1)
    j = int(torch.bincount(best).argmax())  # the kept slot that received the most entries
    into = evicted[best == j]
    k0, members = keys[0, h, kept[j]], keys[0, h, into]
    if merge == "average":
        want = (k0 + members.sum(0)) / (1 + len(into))
    elif merge == "weighted":
        w = sims[best == j, j].clamp(min=0)
        want = (k0 + (w[:, None] * members).sum(0)) / (1 + w.sum())
    else:
        want = (k0 + members.mean(0)) / 2
    torch.testing.assert_close(mk[0, h, kept[j]], want, atol=1e-5, rtol=1e-5)
    assert (mk[0, h, kept[j]] - k0).abs().max() > 1e-4  # the merge did change the entry
    # the cache holds the merged entries, and no more than the budget
    store = cache.layers[0].heads[h]
    torch.testing.assert_close(store.keys[0, : store.n][kept_positions(store) == kept[j]][0], want, atol=1e-5, rtol=1e-5)
    assert store.count() == len(kept)


def test_budget_one_is_the_full_cache():
    model = tiny_llama("sdpa")
    ids = prompt(40)
    got, fed = run_steps(model, ids, None, KVCache(model, "lookm", 1.0), 5)
    want, _ = run_steps(model, ids, None, DynamicCache(config=model.config), 5, feed=fed)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5


# -- decode_budget: the entries the cache evicts are merged into the nearest remaining entry ------------------------


def _entries(store, row=0):
    """{position: (key, value, merge weight)} of a store's valid entries."""
    n = store.n
    w = store.extras.get("merged_weight")
    out = {}
    for s in range(n):
        if bool(store.valid[row, s]):
            out[int(store.pos[row, s])] = (store.keys[row, s].clone(), store.values[row, s].clone(),
                                           float(w[row, s]) if w is not None else 0.0)
    return out


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("merge", ["average", "weighted", "pivotal"])
def test_decode_budget_merges_the_evicted_entry_into_the_nearest_one(merge, packed):
    model = tiny_llama("sdpa")
    ids = prompt(40, batch=2)
    cache = KVCache(model, "lookm", 16, decode_budget=20, merge=merge)
    # 21 entries after the 5th step: from then on each step evicts one entry per (row, head)
    _, fed = run_steps(model, ids, None, cache, 5)
    layer = cache.managed_layers[0]
    if not packed:
        layer.packed = False  # per-head groups
    before = [[_entries(st, b) for b in range(2)] for st in layer.heads]
    token = torch.tensor([7, 9])
    with torch.no_grad():
        model(token[:, None], position_ids=torch.full((2, 1), 45), **cache_kwargs(model, cache))
    full = DynamicCache(config=model.config)  # layer 0 sees the same inputs: the new token's own key and value
    run_steps(model, ids, None, full, 6, feed=fed + [token])
    new_keys, new_values = full.layers[0].keys[:, :, 45], full.layers[0].values[:, :, 45]  # [B, H, d]
    checked = 0
    for h, st in enumerate(layer.heads):
        for b in range(2):
            after = _entries(st, b)
            assert len(after) == 20  # the budget holds
            (e,) = set(before[h][b]) - set(after)  # the evicted position
            assert set(after) - set(before[h][b]) == {45}  # the decoded token came in
            k_e, v_e, w_e = before[h][b][e]
            # the candidates: every entry that stays, as it was before this step's merge
            cand = {p: before[h][b][p] for p in after if p != 45}
            cand[45] = (new_keys[b, h], new_values[b, h], 0.0)
            sims = {p: float(F.cosine_similarity(k_e.float(), c[0].float(), dim=0)) for p, c in cand.items()}
            j = max(sims, key=sims.get)
            k_j, v_j, w_j = cand[j]
            if merge == "pivotal":
                want_k, want_v = (k_j + k_e) / 2, (v_j + v_e) / 2
            else:
                a = (1.0 if merge == "average" else max(sims[j], 0.0)) * (1 + w_e)
                want_k = (k_j * (1 + w_j) + a * k_e) / (1 + w_j + a)
                want_v = (v_j * (1 + w_j) + a * v_e) / (1 + w_j + a)
                assert after[j][2] == pytest.approx(w_j + a, rel=1e-5)
            torch.testing.assert_close(after[j][0], want_k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(after[j][1], want_v, atol=1e-5, rtol=1e-5)
            assert (after[j][0] - k_j).abs().max() > 1e-4  # the merge changed the entry
            for p in after:  # every other entry is untouched
                if p not in (j, 45):
                    assert torch.equal(after[p][0], before[h][b][p][0])
            checked += 1
    assert checked == 4


@pytest.mark.parametrize("policy", ["attention", "recent"])
def test_averaged_merging_keeps_the_sum_of_every_key_seen(policy):
    """With "average" and no threshold, every entry is the mean of the tokens merged into it, so over a (row, head)
    sum((1 + weight) * key) is the sum of the keys of every token seen, and sum(1 + weight) their number."""
    model = tiny_llama("sdpa")
    ids = prompt(40)
    cache = KVCache(model, "lookm", 12, decode_budget=16, decode_policy=policy, merge_threshold="none")
    got, fed = run_steps(model, ids, None, cache, 12)
    full = DynamicCache(config=model.config)
    run_steps(model, ids, None, full, 12, feed=fed)
    keys, values = full.layers[0].keys[0], full.layers[0].values[0]  # [H, 52, d]: layer 0 sees the same inputs
    for h, st in enumerate(cache.managed_layers[0].heads):
        n = st.n
        assert n <= 16 and bool(st.valid[0, :n].all())
        w = 1 + st.extras["merged_weight"][0, :n]
        assert float(w.sum()) == pytest.approx(52, rel=1e-5)
        torch.testing.assert_close((w[:, None] * st.keys[0, :n]).sum(0), keys[h].sum(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close((w[:, None] * st.values[0, :n]).sum(0), values[h].sum(0), atol=1e-4, rtol=1e-4)


def test_merging_under_decode_budget_refuses_quantized_storage():
    model = tiny_llama("sdpa")
    with pytest.raises(ValueError, match="lookm merges the entries decode_budget evicts"):
        KVCache(model, "lookm", 0.5, decode_budget=16, quantize="kivi-4")
    KVCache(model, "lookm", 0.5, decode_budget=16, quantize="kivi-4", merge="none")  # nothing to merge: allowed
    KVCache(model, "lookm", 0.5, quantize="kivi-4")  # merged at prefill only, before quantization: allowed

"""LOOK-M: text prior, merging of evicted entries into their most similar kept entry, exactness without merging."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from helpers import Recorder, masked_reference, prompt, run_steps, tiny_llama
from modalkv import KVCache
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
    keys, values, real, idx, (mk, mv) = captured[0]
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

"""MadaKV: modality quotas per head, coverage demand, the exact global total across layers, memory freed per head,
budget 1.0 = full cache (exactness against the masked full cache is in test_exactness for every method)."""

import math

import pytest
import torch

from helpers import prompt, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.methods.madakv import coverage_demand, fit_total, modality_quotas
from modalkv.modality import IMAGE, detect_modality
from test_modality import llava, llava_inputs


def test_quotas_follow_each_heads_modality_preference():
    mass = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.25, 0.75]]], dtype=torch.float64)  # [B=1, H=3, (v, t)]
    q = modality_quotas(mass, torch.tensor([8.0]), torch.tensor([[20, 20]]))
    assert q[0].tolist() == [[0.0, 8.0], [8.0, 0.0], [2.0, 6.0]]
    # a quota above the modality's count gives the surplus to the other modality
    q = modality_quotas(mass, torch.tensor([8.0]), torch.tensor([[3, 20]]))
    assert q[0, 1].tolist() == [3.0, 5.0] and q[0].sum(-1).tolist() == [8.0] * 3


def test_coverage_demand_counts_the_fewest_tokens_holding_theta():
    psi = torch.tensor([[[0.5, 0.3, 0.1, 0.1, 0.0]]])
    mask = torch.tensor([[True, True, True, True, False]])
    assert coverage_demand(psi, mask, 0.8).item() == 2
    assert coverage_demand(psi, mask, 0.85).item() == 3
    assert coverage_demand(psi, mask, 1.0).item() == 4
    assert coverage_demand(torch.zeros_like(psi), mask, 0.9).item() == 0  # no attention, no demand


def test_fit_total_hits_the_target_within_room():
    counts = torch.tensor([[5, 0, 3], [1, 1, 1]])
    room = torch.tensor([[6, 4, 3], [9, 9, 9]])
    out = fit_total(counts, room, torch.tensor([12, 2]))
    assert out.sum(-1).tolist() == [12, 2] and bool((out <= room).all()) and bool((out >= 0).all())


def test_global_total_is_exact_and_heads_differ_on_a_vlm():
    model = llava()
    ids, extra = llava_inputs(images=3)
    lay = detect_modality(model.config, ids)
    n = ids.shape[1]
    for budget in (0.3, 0.5):
        cache = KVCache(model, "madakv", budget, window=4, n_sink=2, phi_min=1, reserve=0)
        cache.set_modality(lay.ids)
        with torch.no_grad():
            model(input_ids=ids, **extra, **cache_kwargs(model, cache))
        k = math.ceil(n * budget)
        per_head = [s.count() for layer in cache.managed_layers for s in layer.heads]
        L, H = cache.num_managed, len(cache.managed_layers[0].heads)
        assert sum(per_head) == L * H * k  # the global budget, exactly
        assert len(set(per_head)) > 1  # counts really differ per head / layer
        for layer in cache.managed_layers:
            for s in layer.heads:
                assert s.n == s.count()  # the store is that small: memory freed, not masked
        rep = cache.memory_report()
        assert rep["entries_kept"] == L * H * k
        img = torch.nonzero(lay.ids[0] == IMAGE).flatten()
        kept_img = [int(torch.isin(s.pos[0, : s.n], img).sum()) for layer in cache.managed_layers for s in layer.heads]
        assert len(set(kept_img)) > 1  # the visual share is decided per head


def test_heads_keep_the_modality_they_attend_to(monkeypatch):
    """KV head 0's proxies attend only to text, head 1's only to the image: head 0 keeps no image token and head 1
    no text token beyond the always-kept window and sinks (last layer aside: it keeps exactly what remains)."""
    import modalkv.methods.madakv as mk

    model = llava()
    ids, extra = llava_inputs(images=2)
    lay = detect_modality(model.config, ids)
    is_img = lay.ids[0] == IMAGE
    real_scores = mk.window_scores

    def one_modality_per_head(query, keys, scaling, window, real):
        s = real_scores(query, keys, scaling, window, real)  # [B, Hq, n]; query heads 0-1 -> KV head 0
        s[:, :2, is_img] = 0.0
        s[:, 2:, ~is_img] = 0.0
        return s

    monkeypatch.setattr(mk, "window_scores", one_modality_per_head)
    cache = KVCache(model, "madakv", 0.4, window=4, n_sink=2, c_lo=0.0, reserve=0)
    cache.set_modality(lay.ids)
    with torch.no_grad():
        model(input_ids=ids, **extra, **cache_kwargs(model, cache))
    img = torch.nonzero(is_img).flatten()
    fixed = set(range(2)) | set(range(ids.shape[1] - 4, ids.shape[1]))
    for layer in cache.managed_layers[:-1]:
        text_head, image_head = (set(s.pos[0, : s.n].tolist()) for s in layer.heads)
        assert not text_head & set(img.tolist())
        assert (image_head - fixed) <= set(img.tolist()) and image_head & set(img.tolist())


def test_budget_one_is_the_full_cache():
    model = tiny_llama()
    ids = prompt(40)
    with torch.no_grad():
        full = KVCache(model, "full")
        a = model(ids, **cache_kwargs(model, full)).logits
        m = KVCache(model, "madakv", 1.0, window=4)
        b = model(ids, **cache_kwargs(model, m)).logits
    assert (a - b).abs().max() < 1e-5
    assert m.memory_report()["entries_kept"] == full.memory_report()["entries_kept"]


def _compensation_run(monkeypatch, first_layer_demand: str, combine: str = "clip"):
    """A 4-layer LLaVA whose first layer's heads demand every token ('more') or none ('less'), the later layers the
    opposite. Returns (phi_1, the per-head budget phi of each layer, tokens kept beyond the fixed ones per layer)."""
    import modalkv.methods.madakv as mk
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from test_modality import IMG, TXT

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=32, patch_size=8,
                                                     projection_dim=32),
                      text_config=LlamaConfig(**dict(TXT, num_hidden_layers=4)), image_token_index=IMG,
                      image_seq_length=16, vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(cfg).eval()
    ids, extra = llava_inputs(images=2)
    phis = []
    real_quotas = mk.modality_quotas

    def record_phi(mass, phi, counts):  # called once per layer, before the demand
        phis.append(float(phi[0]))
        return real_quotas(mass, phi, counts)

    def scripted_demand(psi, mask, theta):
        wants_all = (len(phis) == 1) == (first_layer_demand == "more")
        return mask.sum(-1)[:, None].expand(-1, psi.shape[1]) if wants_all else torch.zeros(psi.shape[:2], dtype=torch.long)

    monkeypatch.setattr(mk, "modality_quotas", record_phi)
    monkeypatch.setattr(mk, "coverage_demand", scripted_demand)
    window, sinks = 4, 2
    cache = KVCache(model, "madakv", 0.4, window=window, n_sink=sinks, phi_min=1, phi_min_ratio=0.0, reserve=0,
                    combine=combine)
    cache.set_modality(detect_modality(model.config, ids).ids)
    with torch.no_grad():
        model(input_ids=ids, **extra, **cache_kwargs(model, cache))
    H = len(cache.managed_layers[0].heads)
    kept = [sum(s.count() for s in layer.heads) - H * (window + sinks) for layer in cache.managed_layers]
    phi1 = math.ceil(ids.shape[1] * 0.4) - window - sinks
    return phi1, phis, kept, H


def test_compensation_borrows_from_later_layers_when_a_layer_needs_more(monkeypatch):
    """Layer 1 demands more than its quota: it keeps more than phi_1 per head (up to c_hi times its quota) and the
    next layers' per-head budget drops by exactly what it took, spread over them: phi_2 = (L H phi_1 - kept_1) /
    (H (L - 1)) < phi_1."""
    phi1, phis, kept, H = _compensation_run(monkeypatch, "more")
    L = len(kept)
    assert phis[0] == phi1
    assert kept[0] > H * phi1  # it borrowed
    assert phis[1] == pytest.approx((L * H * phi1 - kept[0]) / (H * (L - 1))) and phis[1] < phi1
    assert sum(kept) == L * H * phi1


def test_compensation_gives_to_later_layers_when_a_layer_needs_less(monkeypatch):
    """Layer 1 demands nothing: it keeps c_lo of its quota, and the saved budget raises the next layers'
    per-head budget above phi_1 (phi_2 = (L H phi_1 - kept_1) / (H (L - 1)) > phi_1); the total stays exact."""
    phi1, phis, kept, H = _compensation_run(monkeypatch, "less")
    L = len(kept)
    assert kept[0] < H * phi1  # it gave
    assert phis[1] == pytest.approx((L * H * phi1 - kept[0]) / (H * (L - 1))) and phis[1] > phi1
    assert kept[1] > H * phi1  # the next layer, which wants everything, can spend the gift
    assert sum(kept) == L * H * phi1


@pytest.mark.parametrize("combine, borrows", [("demand", True), ("quota", False)])
def test_combining_rule_decides_whether_a_layer_borrows(monkeypatch, combine, borrows):
    """``combine="demand"`` lets the needy first layer keep all it asks for (more than clip's c_hi = 2 quota),
    ``combine="quota"`` keeps exactly its quota whatever the demand (no transfer to later layers)."""
    phi1, phis, kept, H = _compensation_run(monkeypatch, "more", combine)
    if borrows:
        assert kept[0] > 2 * H * (phi1 + 1) and phis[1] < phi1  # beyond clip's bound (one token of rounding a modality)
    else:
        assert abs(kept[0] - H * phi1) <= 2 * H and phis[1] == pytest.approx(phi1, abs=1)
    with pytest.raises(TypeError, match="combine"):
        KVCache(tiny_llama(), "madakv", 0.5, combine="both")

"""Coded layers packed: a KIVI layer whose heads hold the same number of entries keeps its residuals, codes and
metadata in layer buffers, and appending a decode token writes every head at once (``KIVILayer.append``). The
result must be the same, byte for byte, as appending head by head; ragged layers (Ada-KV) and layers whose packing
an eviction ended go head by head and give the same logits."""

import pytest
import torch

from helpers import prompt, run_steps, tiny_llama
from modalkv import KVCache
from modalkv.layer import CompressedLayer
from modalkv.storage import KIVI
from modalkv.storage.kivi import KIVILayer

CODES = ("kc", "ks", "kz", "vc", "vs", "vz")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _unpacked(monkeypatch):
    """Make every later cache append head by head (the reference)."""
    monkeypatch.setattr(CompressedLayer, "pack_coded", lambda self: None)


@pytest.mark.parametrize("batch, length", [(1, 70), (2, 70), (2, 10)])  # 10: nothing quantized at prefill
def test_layer_append_equals_head_by_head(model, batch, length, monkeypatch):
    ids = prompt(length, batch=batch)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :6] = 0  # a padded row
    kivi = KIVI(bits=4, group_size=8, residual=16)  # 40 steps: 5 groups quantized, the code buffers grow once
    appended = []
    real = KIVILayer.append
    monkeypatch.setattr(KIVILayer, "append", lambda self, *a: appended.append(1) or real(self, *a))
    packed = KVCache(model, "full", 1.0, quantize=kivi)
    got, fed = run_steps(model, ids, mask, packed, 40)
    assert len(appended) == 40 * 3  # every decode step of every layer took the layer-wide append
    assert all(layer.coded is not None and layer.coded_intact() for layer in packed.managed_layers)
    _unpacked(monkeypatch)
    ref_cache = KVCache(model, "full", 1.0, quantize=kivi)
    ref, _ = run_steps(model, ids, mask, ref_cache, 40, feed=fed)
    assert all(layer.coded is None for layer in ref_cache.managed_layers)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for lp, lr in zip(packed.managed_layers, ref_cache.managed_layers):
        for sp, sr in zip(lp.heads, lr.heads):
            assert sp.n == sr.n and sp.payload.nq == sr.payload.nq >= 32  # groups left the residual while decoding
            for name in CODES:  # the codes, scales and zeros as stored: bit-identical
                assert torch.equal(getattr(sp.payload, name), getattr(sr.payload, name)), name
            r = sp.n - sp.payload.nq
            assert torch.equal(sp.payload.rk[:, :r], sr.payload.rk[:, :r])
            assert torch.equal(sp.payload.rv[:, :r], sr.payload.rv[:, :r])
            for name in ("pos", "mod", "valid"):
                assert torch.equal(getattr(sp, name)[:, : sp.n], getattr(sr, name)[:, : sr.n]), name
            assert sp.bytes()["payload"] == sr.bytes()["payload"]
            q = torch.randn(sp.batch, 3, sp.d)
            assert torch.equal(sp.logits(q), sr.logits(q))
            p = torch.softmax(torch.randn(sp.batch, 3, sp.n), -1)
            assert torch.equal(sp.mix(p), sr.mix(p))
    assert packed.memory_report()["payload_bytes"] == ref_cache.memory_report()["payload_bytes"]


@pytest.mark.parametrize("method, budget", [("adakv", 0.5), ("h2o", 48)])
def test_ragged_and_evicting_layers_fall_back_to_head_by_head(model, method, budget, monkeypatch):
    """Ada-KV keeps different numbers of entries per head: those layers are not packed. H2O evicts inside the codes,
    which re-lays a head out and ends the packing; both give the logits of the head-by-head cache."""
    ids = prompt(80, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kivi = KIVI(bits=4, group_size=8, residual=16)
    cache = KVCache(model, method, budget, quantize=kivi)
    got, fed = run_steps(model, ids, mask, cache, 12)
    for layer in cache.managed_layers:
        equal = len({st.n for st in layer.heads}) == 1 and len({st.payload.nq for st in layer.heads}) == 1
        if layer.coded is not None:
            assert equal and layer.coded_intact()
    if method == "adakv":
        assert any(len({st.n for st in layer.heads}) > 1 for layer in cache.managed_layers)
    _unpacked(monkeypatch)
    ref, _ = run_steps(model, ids, mask, KVCache(model, method, budget, quantize=kivi), 12, feed=fed)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batch_selection_packs_again(model):
    ids = prompt(60, batch=2)
    cache = KVCache(model, "full", 1.0, quantize=KIVI(bits=4, group_size=8, residual=16))
    run_steps(model, ids, None, cache, 3)
    layer = cache.managed_layers[0]
    before = [st.payload.kc[1].clone() for st in layer.heads]
    cache.batch_select_indices(torch.tensor([1]))
    assert layer.coded is not None and layer.coded_intact()
    for st, kc in zip(layer.heads, before):
        assert torch.equal(st.payload.kc[0], kc)


@pytest.mark.parametrize("batch", [1, 2])
def test_spherical_layer_append_equals_head_by_head(model, batch, monkeypatch):
    """Spherical KV heads hold different numbers of entries: the layer-wide append writes each head at its own slot,
    and the moving average ``omega`` is updated for every head at once; re-allocations (refresh=4) in between."""
    from modalkv.methods.spherical.codes import OMEGA, TIER
    from modalkv.storage.spherical import SphericalLayer

    ids = prompt(120, batch=batch)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :7] = 0  # a padded row

    def make():
        return KVCache(model, "sphericalkv", 0.4, window=8, n_sink=2, recent=8, refresh=4, page_size=16,
                       calib_tokens=256)

    appended, packs = [], []
    real, real_init = SphericalLayer.append, SphericalLayer.__init__
    monkeypatch.setattr(SphericalLayer, "append", lambda self, *a: appended.append(1) or real(self, *a))
    monkeypatch.setattr(SphericalLayer, "__init__", lambda self, *a: packs.append(1) or real_init(self, *a))
    packed = make()
    got, fed = run_steps(model, ids, mask, packed, 14)
    assert len(appended) == 14 * 3  # every decode step of every layer took the layer-wide append
    assert len(packs) <= 3 * 2  # per layer: at prefill and once after the first re-allocation, not at every one
    assert any(len({st.n for st in layer.heads}) > 1 for layer in packed.managed_layers)  # ragged heads
    _unpacked(monkeypatch)
    ref_cache = make()
    ref, _ = run_steps(model, ids, mask, ref_cache, 14, feed=fed)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for lp, lr in zip(packed.managed_layers, ref_cache.managed_layers):
        for sp, sr in zip(lp.heads, lr.heads):
            pp, pr = sp.payload, sr.payload
            assert sp.n == sr.n and pp.tail_start == pr.tail_start
            assert torch.equal(pp.values[:, : sp.n], pr.values[:, : sr.n])
            assert torch.equal(pp.tail_keys[:, : sp.n - pp.tail_start], pr.tail_keys[:, : sr.n - pr.tail_start])
            for a, b in zip(pp.sections, pr.sections):
                assert all(torch.equal(a[k], b[k]) for k in ("codes", "rcode", "scale"))
            for name in ("pos", "mod", "valid"):
                assert torch.equal(getattr(sp, name)[:, : sp.n], getattr(sr, name)[:, : sr.n]), name
            for name in (OMEGA.name, TIER.name):
                torch.testing.assert_close(sp.extras[name][:, : sp.n], sr.extras[name][:, : sr.n], atol=1e-6,
                                           rtol=1e-5)

"""KIVI quantized storage: error bounds, exact residual, real byte savings, composition with eviction."""

import pytest
import torch
from transformers import DynamicCache

from helpers import prompt, run_steps, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.methods import make_quantizer
from modalkv.methods.kivi import KIVI, _pack, _unpack, dequantize, quantize


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip_and_error_bound(bits):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=g).to(torch.uint8)
    packed = _pack(codes, bits)
    assert packed.shape[-1] == 64 * bits // 8
    assert torch.equal(_unpack(packed, bits), codes)
    x = torch.randn(4, 32, 16, generator=g)
    c, s, z = quantize(x, bits, dim=1)
    err = (dequantize(c, s, z, torch.float32) - x).abs()
    assert bool((err <= s.float() / 2 + 1e-3).all())


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_full_precision_residual_is_exact(model):
    cache = KVCache(model, "full", 1.0, quantize=KIVI(bits=2, group_size=32, residual=64))
    ref = DynamicCache(config=model.config)
    ids = prompt(200)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
        model(ids, **cache_kwargs(model, ref))
    for layer, rlayer in zip(cache.managed_layers, ref.layers):
        for h, store in enumerate(layer.heads):
            assert store.payload.nq == 128 and store.n == 200  # 200 - 64 = 136 -> 4 whole groups quantized
            k, v = store.kv()
            assert torch.equal(k[:, 128:], rlayer.keys[:, h, 128:])  # bit-identical residual
            assert torch.equal(v[:, 128:], rlayer.values[:, h, 128:])
            assert not torch.equal(k[:, :128], rlayer.keys[:, h, :128])


def test_logit_error_shrinks_with_bits(model):
    ids = prompt(300)
    ref, fed = run_steps(model, ids, None, DynamicCache(config=model.config), 20)
    errors = {}
    for bits in (2, 4, 8):
        got, _ = run_steps(model, ids, None, KVCache(model, "full", 1.0, quantize=f"kivi-{bits}"), 20, feed=fed)
        errors[bits] = max(float((g - r).abs().max()) for g, r in zip(got, ref))
    assert errors[8] < 2e-3
    assert errors[8] < errors[4] < errors[2] < 0.2


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bytes_are_the_packed_bytes(model, bits):
    n, G, R, d = 512, 32, 128, 16
    cache = KVCache(model, "full", 1.0, quantize=f"kivi-{bits}")
    with torch.no_grad():
        model(prompt(n), **cache_kwargs(model, cache))
    nq = (n - R) // G * G
    per_head = nq * d * bits // 8 * 2  # key + value codes
    per_head += (nq // G) * d * 2 * 2  # key scale + zero per channel per group, fp16
    per_head += nq * (d // min(G, d)) * 2 * 2  # value scale + zero per token per channel group, fp16
    per_head += (n - nq) * d * 4 * 2  # full-precision residual, fp32 K and V
    rep = cache.memory_report()
    assert rep["payload_bytes"] == per_head * 2 * 3  # 2 KV heads, 3 layers
    assert rep["full_bytes"] == n * d * 4 * 2 * 2 * 3


@pytest.mark.parametrize("method", ["snapkv", "h2o", "streamingllm"])
def test_composes_with_eviction(model, method):
    ids = prompt(300)
    plain = KVCache(model, method, 96, window=8) if method == "snapkv" else KVCache(model, method, 96)
    run_steps(model, ids, None, plain, 25)
    kivi = KIVI(bits=4, residual=16)  # small residual so the kept entries are mostly quantized
    quant = KVCache(model, method, 96, quantize=kivi, **({"window": 8} if method == "snapkv" else {}))
    logits, _ = run_steps(model, ids, None, quant, 25)
    for lp, lq in zip(plain.managed_layers, quant.managed_layers):
        for sp, sq in zip(lp.heads, lq.heads):
            assert sp.count() == sq.count()  # the same number of valid entries per row
            assert sq.n - sq.count() < 32  # holes are repacked before a whole group accumulates
            assert sq.payload.nq >= 64
    assert quant.memory_report()["payload_bytes"] < 0.5 * plain.memory_report()["payload_bytes"]
    assert all(bool(torch.isfinite(x).all()) for x in logits)


def test_batch_of_two(model):
    ids = prompt(260, batch=2)
    cache = KVCache(model, "full", 1.0, quantize="kivi-8")
    got, fed = run_steps(model, ids, None, cache, 5)
    ref, _ = run_steps(model, ids, None, DynamicCache(config=model.config), 5, feed=fed)
    assert max(float((g - r).abs().max()) for g, r in zip(got, ref)) < 2e-3


def test_bad_quantizer_settings():
    with pytest.raises(ValueError, match=r"unknown quantizer 'kivi-3': the registered storage formats are "
                                         r"kivi-2, kivi-4, kivi-8"):
        make_quantizer("kivi-3")
    with pytest.raises(ValueError, match=r"KIVI.bits must be 2, 4 or 8, got 5"):
        KIVI(bits=5)
    with pytest.raises(TypeError, match=r"KIVI.group_size must be int"):
        KIVI(group_size=3.5)

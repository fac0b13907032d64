"""The storage contract: every payload (dense, KIVI, Spherical KV codes) appends, keeps, moves and counts its bytes
exactly, its two reads equal the dense reconstruction's, the fused kernels equal the pure torch reads, the batched
KIVI and Spherical KV steps equal the head-by-head ones, and the storage registry refuses unknown names clearly."""

import pytest
import torch

from helpers import prompt, run_steps, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.store import HeadStore
from modalkv.storage import DENSE, KIVI, kernels, make_storage, register_storage, storage_names
from modalkv.storage.kivi import KIVIPayload, kivi_logits

B, D = 2, 16


def _entries(n, seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, n, D, generator=g)
    values = torch.randn(batch, n, D, generator=g)
    pos = torch.arange(n, dtype=torch.int32).expand(batch, n).clone()
    mod = torch.zeros(batch, n, dtype=torch.int8)
    return keys, values, pos, mod, torch.ones(batch, n, dtype=torch.bool)


def _store(storage, n=100, seed=0):
    k, v, pos, mod, valid = _entries(n, seed)
    return HeadStore(k, v, pos, mod, valid, {"acc": torch.rand(B, n)}, reserve=8, storage=storage), k, v


@torch.no_grad()
def _spherical_store(model=None):
    model = model or tiny_llama()
    cache = KVCache(model, "sphericalkv", 0.4, window=8, n_sink=2, recent=8, refresh=4, page_size=16,
                    calib_tokens=256)
    model(prompt(120, batch=1), **cache_kwargs(model, cache))
    return cache.managed_layers[0].heads[0]


def _check_reads(store):
    """logits and probs x values of the payload equal those of its dense reconstruction."""
    K, V = store.kv()
    q = torch.randn(store.batch, 3, store.d)
    torch.testing.assert_close(store.logits(q), q @ K.transpose(1, 2), atol=1e-4, rtol=1e-4)
    p = torch.softmax(torch.randn(store.batch, 3, store.n), -1)
    torch.testing.assert_close(store.mix(p), p @ V, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("storage", [DENSE, KIVI(bits=4, group_size=8, residual=16), KIVI(bits=2, group_size=8,
                                                                                          residual=16)])
def test_payload_append_keep_move_and_reads(storage):
    store, k, v = _store(storage)
    dense_keys = store.kv()[0].clone()
    _check_reads(store)
    k2, v2, pos2, mod2, valid2 = _entries(20, seed=1)
    store.append(k2, v2, pos2 + 100, mod2, valid2)
    assert store.n == 120 and store.kv()[0].shape == (B, 120, D)
    torch.testing.assert_close(store.kv()[0][:, 104:], k2[:, 4:])  # the newest 16 are exact in every format
    _check_reads(store)
    # keep: slot i of the result holds entry slots[:, i], metadata and payload alike
    slots = torch.tensor([[5, 3, 119, 40], [0, 110, 7, -1]])
    before_pos = store.pos.clone()
    before_acc = store.extras["acc"].clone()
    before_k = store.kv()[0].clone()
    store.keep_slots(slots)
    assert store.n == 4 and store.valid[:, :4].tolist() == [[True] * 4, [True, True, True, False]]
    safe = slots.clamp(min=0)
    assert torch.equal(store.pos[:, :4], before_pos.gather(1, safe))
    assert torch.equal(store.extras["acc"][:, :4], before_acc.gather(1, safe))
    if storage is DENSE:
        assert torch.equal(store.kv()[0], before_k.gather(1, safe[..., None].expand(-1, -1, D)))
    _check_reads(store)
    assert dense_keys.shape[1] == 100


@pytest.mark.parametrize("storage", [DENSE, KIVI(bits=4, group_size=8, residual=16)])
def test_remove_moves_the_last_entry_into_the_hole(storage):
    store, k, v = _store(storage, n=40)
    last_key = store.kv()[0][:, -1].clone()
    slot = torch.tensor([39 - 2, 39 - 1])  # residual slots in KIVI (nq = 16 of 40)
    store.remove(slot)
    assert store.n == 39 and store.all_valid
    keys = store.kv()[0]
    assert torch.equal(keys[0, 37], last_key[0]) and torch.equal(keys[1, 38], last_key[1])
    assert store.pos[0, 37] == 39 and store.pos[1, 38] == 39


def test_kivi_holes_are_repacked_after_a_group():
    store, _, _ = _store(KIVI(bits=4, group_size=8, residual=16), n=64)
    assert store.payload.nq == 48
    for i in range(7):  # holes inside quantized groups stay holes ...
        store.remove(torch.tensor([i, i + 1]))
        assert store.n == 64 and not store.all_valid
    store.remove(torch.tensor([20, 21]))  # ... until every row holds a group's worth: repacked
    assert store.n == 56 and store.all_valid and store.count() == 2 * 56
    _check_reads(store)


def test_byte_counts_are_exact():
    store, _, _ = _store(DENSE, n=50)
    b = store.bytes()
    assert b["payload"] == B * 50 * 2 * D * 4 and b["meta"] == B * 50 * (4 + 1 + 1 + 4)
    assert b["allocated"] == B * 58 * (2 * D * 4 + 4 + 1 + 1 + 4)  # 8 reserve slots
    fmt = KIVI(bits=4, group_size=8, residual=16)
    store, _, _ = _store(fmt, n=50)
    nq = store.payload.nq
    assert nq == 32  # (50 - 16) // 8 * 8
    codes = B * nq * (D // 2 + D // 2)  # 4-bit keys and values
    key_scales = B * (nq // 8) * D * 2 * 2  # fp16 scale + zero per channel and key group
    value_scales = B * nq * (D // 8) * 2 * 2  # fp16 scale + zero per token and value group
    residual = B * (50 - nq) * 2 * D * 4
    assert store.bytes()["payload"] == codes + key_scales + value_scales + residual


def test_spherical_keep_slots_and_remove_leave_no_hole():
    store = _spherical_store()
    assert len(store.payload.sections) >= 2 and store.all_valid
    _check_reads(store)
    n = store.n
    pos_before = store.pos[0, :n].clone()
    keys_before = store.kv()[0][0].clone()
    store.remove(torch.tensor([1]))  # inside the first tier section
    assert store.n == n - 1 and store.all_valid and store.count() == n - 1
    assert sorted(store.pos[0, : store.n].tolist()) == sorted(pos_before[torch.arange(n) != 1].tolist())
    _check_reads(store)
    # keep every other entry: the same entries, directions unchanged (radii re-coded against their new pages)
    slots = torch.arange(0, store.n, 2).flip(0)[None]  # in another order than the sections
    want = store.pos[0, slots[0]].tolist()
    store.keep_slots(slots)
    assert store.all_valid and sorted(store.pos[0, : store.n].tolist()) == sorted(want)
    K = store.kv()[0][0]
    for i, p in enumerate(store.pos[0, : store.n].tolist()):
        ref = keys_before[pos_before.tolist().index(p)]
        assert float(torch.cosine_similarity(K[i], ref, dim=0)) > 0.999
    _check_reads(store)


@pytest.mark.skipif(kernels.library() is None, reason="the fused kernels could not be built here")
def test_fused_reads_equal_the_torch_reads():
    for bits in (2, 4, 8):
        store, _, _ = _store(KIVI(bits=bits, group_size=8, residual=16), n=90)
        q = torch.randn(B, 5, D)
        p = torch.softmax(torch.randn(B, 5, 90), -1)
        fused = store.logits(q), store.mix(p)
        store.payload.fused = False
        torch.testing.assert_close(fused[0], store.logits(q), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused[1], store.mix(p), atol=1e-5, rtol=1e-5)
    store = _spherical_store()
    q = torch.randn(1, 3, store.d)
    fused = store.logits(q)
    store.payload.fused = False
    torch.testing.assert_close(fused, store.logits(q), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_fused_reads_at_a_real_head_dim(bits, group):
    """head_dim 128 and 5 query rows: the vectorised kernel paths (4-bit codes, whole 128-channel blocks, query rows
    in blocks of 4 and pairs) against the dequantized reads."""
    g = torch.Generator().manual_seed(3)
    n = 4 * group + 40
    keys, values = torch.randn(2, n, 128, generator=g), torch.randn(2, n, 128, generator=g)
    pos = torch.arange(n, dtype=torch.int32).expand(2, n)
    store = HeadStore(keys, values, pos, torch.zeros(2, n, dtype=torch.int8), torch.ones(2, n, dtype=torch.bool), {},
                      reserve=8, storage=KIVI(bits=bits, group_size=group, residual=16))
    assert store.payload.nq >= 3 * group
    q = torch.randn(2, 5, 128, generator=g)
    p = torch.softmax(torch.randn(2, 5, n, generator=g), -1)
    fused = store.logits(q), store.mix(p)
    store.payload.fused = False
    torch.testing.assert_close(fused[0], store.logits(q), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused[1], store.mix(p), atol=1e-5, rtol=1e-4)


@pytest.fixture(params=["default", "scalar"])
def kernel_build(request, monkeypatch):
    """Each kernel build in turn: the default one (the AVX2 paths on CPUs that have them) and the portable C loops
    (``MODALKV_KERNELS=scalar``)."""
    monkeypatch.setenv("MODALKV_KERNELS", "1" if request.param == "default" else request.param)
    lib = kernels.library()
    if lib is None:
        pytest.skip("the fused kernels could not be built here")
    if request.param == "scalar":
        assert lib.simd_build() == 0
    return lib


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("d, group, n, rows", [(96, 3, 70, 5), (96, 32, 700, 3), (96, 96, 600, 8), (64, 8, 91, 1),
                                               (24, 4, 50, 2), (64, 100, 336, 3)])
def test_kivi_kernels_equal_the_torch_reads(kernel_build, bits, d, group, n, rows):
    """Both builds against the dequantized reads: odd key groups (a token pair split at the group's end), value
    groups that do and do not hold whole 8-byte blocks of codes, more quantized tokens than one chunk of the values
    kernel, row counts that are not a multiple of the kernels' row tiles, head dims that are not a multiple of the
    vector blocks (24), a last chunk of the values kernel that is not a multiple of 8 tokens (300 quantized)."""
    g = torch.Generator().manual_seed(bits * 1000 + n)
    keys, values = torch.randn(2, n, d, generator=g), torch.randn(2, n, d, generator=g)
    pos = torch.arange(n, dtype=torch.int32).expand(2, n)
    store = HeadStore(keys, values, pos, torch.zeros(2, n, dtype=torch.int8), torch.ones(2, n, dtype=torch.bool), {},
                      reserve=8, storage=KIVI(bits=bits, group_size=group, residual=16))
    assert store.payload.nq >= n - 16 - group
    q = torch.randn(2, rows, d, generator=g)
    p = torch.softmax(torch.randn(2, rows, n, generator=g), -1)
    p[0, 0, 5] = 0.0  # an exact zero (the portable loop skips it)
    fused = store.logits(q), store.mix(p)
    nq = store.payload.nq
    wide = torch.full((2, 1, rows, nq + 3), 7.0)  # the kernel alone: nothing written past the quantized slots
    kivi_logits(kernel_build, [store.payload], q[:, None].contiguous(), wide)
    assert bool((wide[..., nq:] == 7.0).all())
    store.payload.fused = False
    torch.testing.assert_close(fused[0], store.logits(q), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused[1], store.mix(p), atol=1e-5, rtol=1e-4)


def _wide_head_llama():
    """A Llama with head_dim 64: 32 two-channel groups per key (the code words of 8 groups read at once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("rows", [1, 3, 4, 6])
@pytest.mark.parametrize("wide", [False, True])
def test_spherical_kernel_equals_the_torch_reads(kernel_build, rows, wide):
    """The section logits of both builds against the torch table gathers, for row counts below, at and above one
    4-row block of the table, at head_dim 16 and 64 (code words read 8 groups at a time, and the last word of a
    token's codes read short)."""
    store = _spherical_store(_wide_head_llama() if wide else None)
    assert store.payload.sections and (not wide or max(sec["G"] for sec in store.payload.sections) >= 16)
    q = torch.randn(1, rows, store.d)
    fused = store.logits(q)
    store.payload.fused = False
    torch.testing.assert_close(fused, store.logits(q), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d, n, rows", [(128, 301, 4), (128, 33, 4), (16, 7, 3), (16, 1, 4), (24, 1, 5), (40, 64, 2)])
def test_dense_kernels_equal_matmul(kernel_build, d, n, rows):
    """dense_logits / dense_mix (Spherical KV's dense tail and values) against matmul: odd token counts, head dims
    that are and are not a multiple of the vector blocks, row tails; rows of the output wider than the count."""
    g = torch.Generator().manual_seed(n)
    k, v = torch.randn(2, n, d, generator=g), torch.randn(2, n, d, generator=g)
    q = torch.randn(2, rows, d, generator=g)
    p = torch.softmax(torch.randn(2, rows, n + 3, generator=g), -1)[..., :n]  # rows of stride n + 3
    logits = torch.full((2, rows, n + 5), 7.0)
    mixed = torch.full((2, rows, d), 7.0)
    t1 = kernels.tasks([(kernels.row(k, b), kernels.row(q, b), kernels.row(logits, b), n) for b in range(2)])
    kernel_build.dense_logits(2, t1.data_ptr(), d, rows, logits.stride(1), 1)
    t2 = kernels.tasks([(kernels.row(v, b), kernels.row(p, b), kernels.row(mixed, b), n) for b in range(2)])
    kernel_build.dense_mix(2, t2.data_ptr(), d, rows, p.stride(1), 1)
    torch.testing.assert_close(logits[..., :n], q @ k.transpose(1, 2), atol=1e-4, rtol=1e-4)
    assert bool((logits[..., n:] == 7.0).all())  # nothing written past the count
    torch.testing.assert_close(mixed, p @ v, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(kernels.library() is None, reason="the fused kernels could not be built here")
@pytest.mark.parametrize("method", ["full", "h2o"])
def test_batched_kivi_step_equals_the_head_by_head_step(method, monkeypatch):
    import modalkv.attention as attn

    model = tiny_llama()
    ids = prompt(80, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a padded row
    kivi = KIVI(bits=4, group_size=8, residual=16)
    calls = []
    real = attn.attend_coded
    monkeypatch.setattr(attn, "attend_coded", lambda *a: calls.append(1) or real(*a))
    batched, _ = run_steps(model, ids, mask, KVCache(model, method, 48 if method == "h2o" else 1.0, quantize=kivi), 12)
    assert calls  # the batched step ran
    monkeypatch.setenv("MODALKV_KERNELS", "0")  # no kernels: head by head, dequantizing
    calls.clear()
    per_head, _ = run_steps(model, ids, mask, KVCache(model, method, 48 if method == "h2o" else 1.0, quantize=kivi), 12)
    assert not calls
    for a, b in zip(batched, per_head):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(kernels.library() is None, reason="the fused kernels could not be built here")
@pytest.mark.parametrize("batch", [1, 2])
def test_batched_spherical_step_equals_the_head_by_head_step(batch, monkeypatch):
    import modalkv.attention as attn

    model = tiny_llama()
    ids = prompt(120, batch=batch)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :7] = 0  # a padded row

    def make():
        return KVCache(model, "sphericalkv", 0.4, window=8, n_sink=2, recent=8, refresh=4, page_size=16,
                       calib_tokens=256)

    calls = []
    real = attn.attend_spherical
    monkeypatch.setattr(attn, "attend_spherical", lambda *a: calls.append(1) or real(*a))
    batched, _ = run_steps(model, ids, mask, make(), 10)  # refresh=4: re-allocations (tiers) between the steps
    assert len(calls) == 10 * 3  # every decode step of every layer
    monkeypatch.setenv("MODALKV_KERNELS", "0")  # no kernels: head by head, torch table gathers
    calls.clear()
    per_head, _ = run_steps(model, ids, mask, make(), 10)
    assert not calls
    for a, b in zip(batched, per_head):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_registry_errors_and_registration():
    assert {"kivi-2", "kivi-4", "kivi-8"} <= set(storage_names())
    with pytest.raises(ValueError, match=r"unknown quantizer 'zip-3': the registered storage formats are kivi-2, "
                                         r"kivi-4, kivi-8"):
        make_storage("zip-3")
    with pytest.raises(ValueError, match="unknown quantizer"):
        KVCache(tiny_llama(), "full", quantize="zip-3")
    register_storage("kivi-4-g8", lambda: KIVI(bits=4, group_size=8, residual=16))
    try:
        cache = KVCache(tiny_llama(), "full", quantize="kivi-4-g8")
        assert cache.quantizer == KIVI(bits=4, group_size=8, residual=16)
    finally:
        from modalkv import storage

        storage._NAMED.pop("kivi-4-g8")
    assert isinstance(make_storage("KIVI-4"), KIVI) and make_storage(None) is None
    assert isinstance(_store(make_storage("kivi-8"))[0].payload, KIVIPayload)

"""Saved compressed caches: save -> load continues token for token, the file holds the kept bytes, bad files refused."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import SMALL, left_pad, prompt, tiny_gemma3, tiny_llama
from modalkv import KVCache, cache_kwargs, load_cache, save_cache
from modalkv import attention as mattn
from modalkv.context import prefill
from modalkv.methods import REGISTRY, SnapKV
from modalkv.methods.kivi import KIVI
from modalkv.modality import IMAGE, ModalityLayout

STEPS = 10
# quantized groups from the 8th entry on (the default residual of 128 would keep these short prompts exact)
KIVI4 = KIVI(bits=4, group_size=8, residual=8)
SPHERICAL = {"calib_tokens": 64, "refresh": 4, "page_size": 16, "window": 8, "recent": 8, "n_sink": 2}


def params_for(name: str, model) -> dict:
    p = dict(SMALL.get(name, {}))
    if name == "retentivekv":
        p["tau"] = 0.1  # states that absorb (the shared suites run it with empty states)
    if name == "sphericalkv":
        p.update(SPHERICAL)
    if name == "hae" and "sliding_attention" in (getattr(model.config, "layer_types", None) or []):
        p["mode"] = "kv_only"  # pruning hidden states needs every layer managed
    return p


class StubTokenizer:
    """What KVzip asks a tokenizer for: the ids of its repeat prompt."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return SimpleNamespace(input_ids=prompt(5, seed=9))


def inputs(batch: int, n: int = 40):
    """(prompt ids, mask, modality ids, more ids to append after saving). The modality ids cover the prompt and the
    appended tokens: 12 image tokens in the prompt, 3 among the appended ones."""
    if batch == 1:
        ids = prompt(n)
        mask = torch.ones_like(ids)
    else:
        ids, mask = left_pad([prompt(n, seed=1)[0], prompt(n - 7, seed=2)[0]])
    more = prompt(6, seed=5, batch=batch)
    modality = torch.zeros(batch, n + more.shape[1], dtype=torch.int8)
    modality[:, 12:24] = IMAGE
    modality[:, n + 1 : n + 4] = IMAGE
    return ids, mask, modality, more


def fill(model, cache, ids, mask, modality):
    """The prompt through the model into the cache (modalkv.prefill for methods with a context pass)."""
    cache.set_modality(modality)
    if getattr(cache.method, "needs_context_pass", False):
        prefill(model, cache, ids, mask, tokenizer=StubTokenizer())
    else:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                  **cache_kwargs(model, cache))


def continuation(model, cache, ids, mask, more):
    """Greedy generation after the prompt and ``more`` tokens: (tokens, per-step scores)."""
    full = torch.cat([ids, more], 1)
    out = model.generate(input_ids=full, attention_mask=torch.cat([mask, torch.ones_like(more)], 1),
                         max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **cache_kwargs(model, cache))
    return out.sequences[:, full.shape[1]:], torch.stack(out.scores)


@pytest.fixture(scope="module")
def models():
    return {"llama": tiny_llama(), "gemma3": tiny_gemma3()}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("quantize", [None, "kivi-4"])
@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("which", ["llama", "gemma3"])
def test_loaded_cache_continues_exactly(models, which, name, quantize, batch, tmp_path):
    """save -> load -> generate equals generating from the original cache and from a cache never saved: the same
    tokens and bit-identical scores, for every method, KIVI-4 storage, a left-padded batch and Gemma-3's sliding
    layers."""
    model = models[which]
    ids, mask, modality, more = inputs(batch)
    kw = {"quantize": KIVI4} if quantize else {}

    def built():
        return KVCache(model, name, 0.5, **kw, **params_for(name, model))

    try:
        cache, never_saved = built(), built()
    except ValueError as e:  # a combination the cache refuses (Spherical KV has its own entry format)
        pytest.skip(str(e))
    try:
        fill(model, cache, ids, mask, modality)
    except ValueError as e:
        if "batch 1" in str(e):
            pytest.skip(str(e))  # KVzip compresses one context at a time
        raise
    fill(model, never_saved, ids, mask, modality)
    path = tmp_path / "cache.safetensors"
    save_cache(cache, path)
    want, want_scores = continuation(model, cache, ids, mask, more)
    loaded = load_cache(path, model)
    assert loaded.model_ref() is model and loaded is not cache
    got, got_scores = continuation(model, loaded, ids, mask, more)
    assert torch.equal(got, want)
    assert torch.equal(got_scores, want_scores)
    again, again_scores = continuation(model, never_saved, ids, mask, more)  # saving changed nothing
    assert torch.equal(again, want) and torch.equal(again_scores, want_scores)
    assert loaded.memory_report()["kept_bytes"] == cache.memory_report()["kept_bytes"]


def test_kivi_codes_are_saved_as_stored(tmp_path):
    """KIVI stores are written as their packed codes and fp16 scales (no dequantised keys), and read back equal."""
    model = tiny_llama()
    ids = prompt(64)
    cache = KVCache(model, "snapkv", 0.5, quantize=KIVI4, **SMALL["snapkv"])
    model(input_ids=ids, **cache_kwargs(model, cache))
    save_cache(cache, tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("S.kc").dtype == torch.uint8 and f.get_tensor("S.ks").dtype == torch.float16
    assert not any(name.endswith(".keys") for name in names)
    loaded = load_cache(tmp_path / "c.safetensors", model)
    for a, b in zip(cache.managed_layers, loaded.managed_layers):
        for s, t in zip(a.heads, b.heads):
            assert s.payload.nq == t.payload.nq > 0 and s.n == t.n
            for attr in ("kc", "ks", "kz", "vc", "vs", "vz"):
                assert torch.equal(getattr(s.payload, attr), getattr(t.payload, attr))
            assert torch.equal(s.kv()[0], t.kv()[0]) and torch.equal(s.kv()[1], t.kv()[1])


def test_state_layout_and_sliding_layers_round_trip(tmp_path):
    """What a method keeps outside the stores (RetentiveKV's memories), the visual layout and Gemma-3's sliding
    windows (keys, values, cumulative length) come back equal."""
    model = tiny_gemma3()
    ids = prompt(40)
    n = ids.shape[1]
    grid = torch.full((1, n), -1, dtype=torch.int32)
    layout = ModalityLayout(torch.zeros(1, n, dtype=torch.int8), grid.clone(), grid.clone(), grid.clone(), grid.clone())
    layout.ids[:, 8:24] = IMAGE
    layout.item[:, 8:24], layout.frame[:, 8:24] = 0, 0
    layout.row[:, 8:24] = torch.arange(16, dtype=torch.int32) // 4
    layout.col[:, 8:24] = torch.arange(16, dtype=torch.int32) % 4
    cache = KVCache(model, "retentivekv", 0.4, window=4, n_sink=2, tau=0.1, state_readout="moments",
                    states_in_budget=False)  # (at 0.4 of 40 tokens the states would not fit inside the budget)
    cache.set_modality(layout)
    model(input_ids=ids, **cache_kwargs(model, cache))
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors", model)
    for field in ("ids", "item", "frame", "row", "col"):
        assert torch.equal(getattr(loaded.layout, field), getattr(layout, field))
    assert torch.equal(loaded._modality, cache._modality)
    states = cache.method._states
    assert states and float(states[0]["m"].sum()) > 0  # the memories absorbed something
    for rank, st in states.items():
        for key, t in st.items():
            if not key.startswith("_"):
                assert torch.equal(loaded.method._states[rank][key], t)
    sliding = [i for i, layer in enumerate(cache.layers) if type(layer).__name__ == "DynamicSlidingWindowLayer"]
    assert sliding
    for i in sliding:
        a, b = cache.layers[i], loaded.layers[i]
        assert b.cumulative_length == a.cumulative_length == n
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("name, kw", [("h2o", {}), ("hae", {}), ("retentivekv", {}), ("sphericalkv", {}),
                                      ("snapkv", {"decode_budget": 30}), ("snapkv", {"quantize": KIVI4})])
@pytest.mark.parametrize("batch", [1, 2])
def test_saved_while_decoding_continues_exactly(name, kw, batch, tmp_path):
    """A cache saved after it has generated (bins, memories, refreshes and decode-time scores under way) continues
    exactly too."""
    model = tiny_llama()
    ids, mask, modality, more = inputs(batch)
    cache = KVCache(model, name, 0.4, **kw, **params_for(name, model))
    fill(model, cache, ids, mask, modality)
    first, _ = continuation(model, cache, ids, mask, more)
    path = tmp_path / "c.safetensors"
    save_cache(cache, path)
    history = torch.cat([ids, more, first[:, :-1]], 1)  # the last generated token was not fed back
    hmask = torch.cat([mask, torch.ones_like(more), torch.ones_like(first[:, :-1])], 1)
    want = continuation(model, cache, history, hmask, first[:, -1:])
    got = continuation(model, load_cache(path, model), history, hmask, first[:, -1:])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("name", ["retentivekv", "hae", "sphericalkv"])
def test_method_state_comes_back(name, tmp_path):
    """Every tensor a method declares as its state (``Method.state_dict``) is restored by ``load_state_dict``: also
    the parts whose loss would only show at other budgets (Spherical KV's refresh interval)."""
    model = tiny_llama()
    ids, mask, modality, more = inputs(1)
    cache = KVCache(model, name, 0.3, **params_for(name, model))
    fill(model, cache, ids, mask, modality)
    continuation(model, cache, ids, mask, more)  # decode a little: bins, memories and refreshes have state
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors", model)
    for a, b in zip([None, *cache.managed_layers], [None, *loaded.managed_layers]):
        want, got = cache.method.state_dict(a), loaded.method.state_dict(b)
        assert sorted(got) == sorted(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    # the method does keep state (HAE's is per sequence: sink limits and DAP counts; its bin is a per-entry extra)
    assert cache.method.state_dict(None if name == "hae" else cache.managed_layers[0])


def test_loading_binds_the_cache_to_the_given_model(tmp_path):
    """A file loaded into another instance of the same model (a new process) is bound to that instance, routes its
    attention through modalkv, and continues as the original would."""
    a = tiny_llama()
    ids, mask, modality, more = inputs(1)
    cache = KVCache(a, "h2o", 0.5)
    fill(a, cache, ids, mask, modality)
    save_cache(cache, tmp_path / "c.safetensors")
    want, _ = continuation(a, cache, ids, mask, more)
    b = tiny_llama()  # same weights, a fresh model with plain attention
    assert b.config._attn_implementation not in mattn.NAMES
    loaded = load_cache(tmp_path / "c.safetensors", b)
    assert loaded.model_ref() is b
    assert b.config._attn_implementation in mattn.NAMES
    got, _ = continuation(b, loaded, ids, mask, more)
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="built for another model"):
        continuation(a, loaded, ids, mask, more)


def test_kvzip_context_ids_and_unfinished_context(tmp_path):
    """A context compressed by modalkv.prefill keeps the ids it was built from (a later turn is checked against
    them); a KVzip cache whose context pass never ran is refused instead of being saved uncompressed."""
    model = tiny_llama()
    ids = prompt(40)
    cache = KVCache(model, "kvzip", 0.5)
    prefill(model, cache, ids, tokenizer=StubTokenizer())
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors", model)
    assert torch.equal(loaded.context_ids, ids)
    raw = KVCache(model, "kvzip", 0.5)
    model(input_ids=ids, **cache_kwargs(model, raw))
    with pytest.raises(ValueError, match="modalkv.prefill"):
        save_cache(raw, tmp_path / "raw.safetensors")


@pytest.mark.parametrize("name", ["snapkv", "h2o", "retentivekv", "sphericalkv", "hae", "kivi"])
def test_file_holds_the_kept_bytes(name, tmp_path):
    """At a realistic size (256-token prompt, budget 0.25) the file is within 25 % of ``kept_bytes`` (Spherical KV's
    codebooks are re-derived, not stored), and the reserve slots are not written."""
    model = tiny_llama()
    ids = prompt(256)
    sizes = []
    for reserve in (0, 4096):
        kw = {"quantize": KIVI4} if name == "kivi" else params_for(name, model)
        cache = KVCache(model, "snapkv" if name == "kivi" else name, 0.25, reserve=reserve, **kw)
        model(input_ids=ids, **cache_kwargs(model, cache))
        path = tmp_path / f"{reserve}.safetensors"
        save_cache(cache, path)
        kept = cache.memory_report()["kept_bytes"]
        size = os.path.getsize(path)
        assert abs(size - kept) <= 0.25 * kept, (size, kept)
        sizes.append(size)
    assert cache.memory_report()["allocated_bytes"] > 4 * kept  # the reserve is there ...
    assert abs(sizes[1] - sizes[0]) <= 16  # ... but not in the file (only the header's "reserve" differs)


# -- refusals -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A SnapKV cache of tiny_llama(seed=0) saved to a file."""
    model = tiny_llama()
    cache = KVCache(model, "snapkv", 0.5, window=4, kernel=3)
    model(input_ids=prompt(40), **cache_kwargs(model, cache))
    path = tmp_path_factory.mktemp("saved") / "snapkv.safetensors"
    save_cache(cache, path)
    return path


@pytest.mark.parametrize("other, message", [
    (lambda: tiny_llama(layers=2), "num_layers is 3 in the file, 2 in this model"),
    (lambda: tiny_gemma3(), "architecture"),
    (lambda: tiny_llama(seed=1), "same shapes, but different weights"),
])
def test_refuses_another_model(saved, other, message):
    with pytest.raises(ValueError, match=message):
        load_cache(saved, other())


def test_refuses_another_dtype(saved):
    with pytest.raises(ValueError, match="dtype is 'float32' in the file, 'bfloat16' in this model"):
        load_cache(saved, tiny_llama().to(torch.bfloat16))


def test_refuses_another_method(saved):
    model = tiny_llama()
    assert load_cache(saved, model, method="SnapKV").method == SnapKV(window=4, kernel=3)
    with pytest.raises(ValueError, match="holds a 'snapkv' cache, not 'h2o'"):
        load_cache(saved, model, method="h2o")
    with pytest.raises(ValueError, match="other parameters: window=8"):
        load_cache(saved, model, method=SnapKV(window=8, kernel=3))
    with pytest.raises(TypeError, match="method must be"):
        load_cache(saved, model, method=3)


def test_refuses_truncated_and_corrupted_files(saved, tmp_path):
    model = tiny_llama()
    raw = saved.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for length in (4, 100, len(raw) // 2, len(raw) - 1):
        cut.write_bytes(raw[:length])
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            load_cache(cut, model)
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(raw)
    data[-100] ^= 0x01  # one bit of a tensor
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted: the checksum"):
        load_cache(flipped, model)
    seen = b'\\"seen\\":40'  # inside the metadata string, JSON-escaped
    assert raw.count(seen) == 3
    flipped.write_bytes(raw.replace(seen, seen[:-1] + b"1", 1))  # a valid header that says something else
    with pytest.raises(ValueError, match="corrupted: the checksum"):
        load_cache(flipped, model)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_cache(junk, model)
    with pytest.raises(FileNotFoundError):
        load_cache(tmp_path / "missing.safetensors", model)


def test_refuses_other_safetensors_files(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a modalkv cache"):
        load_cache(other, tiny_llama())


def test_refuses_codebooks_that_differ(tmp_path):
    """Spherical KV's calibrated codebooks are not in the file: loading re-derives them and checks their hash."""
    from modalkv.methods import spherical

    model = tiny_llama()
    cache = KVCache(model, "sphericalkv", 0.5, **SPHERICAL)
    model(input_ids=prompt(40), **cache_kwargs(model, cache))
    save_cache(cache, tmp_path / "c.safetensors")
    books = cache.method._books.books[0][0]
    kept = books.clone()
    try:
        books[0, 0, 0, 0] += 0.5  # the model's remembered calibration now differs from the saved one
        with pytest.raises(ValueError, match="codebooks calibrated on this model differ"):
            load_cache(tmp_path / "c.safetensors", model)
    finally:
        books.copy_(kept)
    assert spherical.CALIBRATED[model]  # the remembered codebooks were used, not fitted again
    load_cache(tmp_path / "c.safetensors", model)


def test_save_refuses_what_is_not_a_prefilled_cache(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="holds no prompt yet"):
        save_cache(KVCache(model, "snapkv", 0.5), tmp_path / "c.safetensors")
    with pytest.raises(TypeError, match="takes a modalkv KVCache"):
        save_cache({"not": "a cache"}, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.real
def test_real_weights_round_trip(tmp_path):
    """SmolLM2-135M: a compressed document saved and loaded answers with the same tokens."""
    from modalkv import load_model

    model, tok = load_model("smollm2-135m")
    doc = tok("The lighthouse keeper counted 417 gulls on the northern rocks before the storm. " * 8,
              return_tensors="pt").input_ids
    question = tok(" How many gulls did the keeper count?", return_tensors="pt", add_special_tokens=False).input_ids
    cache = KVCache(model, "snapkv", 0.25, window=8)
    with torch.no_grad():
        model(input_ids=doc, **cache_kwargs(model, cache))
    save_cache(cache, tmp_path / "doc.safetensors")
    ids = torch.cat([doc, question], 1)
    want = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, **cache_kwargs(model, cache))
    loaded = load_cache(tmp_path / "doc.safetensors", model, method="snapkv")
    got = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, **cache_kwargs(model, loaded))
    assert torch.equal(got, want)
    kept = cache.memory_report()["kept_bytes"]
    assert abs(os.path.getsize(tmp_path / "doc.safetensors") - kept) <= 0.25 * kept

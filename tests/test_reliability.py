"""No silent wrong answers: a cache bound to its model, finite parameters, resets that forget, budgets that bound.

Each test here was written against a failure found by probing the public API (and fails without its fix).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import io
import math
import pickle
import typing
import weakref

import pytest
import torch
from transformers import DynamicCache

from helpers import SMALL, Recorder, masked_reference, prompt, run_steps, tiny_gemma3, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.methods import REGISTRY

SPHERICAL = {"calib_tokens": 64}  # a quick codebook fit on the tiny model


def params_for(name: str) -> dict:
    return {**SMALL.get(name, {}), **(SPHERICAL if name == "sphericalkv" else {})}


class RepeatTokenizer:
    """KVzip's reconstruction prompt as fixed ids (all KVzip asks of a tokenizer)."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return type("Out", (), {"input_ids": torch.tensor([[3, 4, 5]])})()


def steps(model, ids, cache, n):
    """run_steps, with KVzip's context pass (modalkv.prefill) for the methods that need one."""
    if not cache.method.needs_context_pass:
        return run_steps(model, ids, None, cache, n)
    import modalkv

    out = modalkv.prefill(model, cache, ids, tokenizer=RepeatTokenizer())
    nxt, pos = out.logits[:, -1].argmax(-1), ids.shape[1]
    for _ in range(n):
        out = model(input_ids=nxt[:, None], position_ids=torch.tensor([[pos]]), **cache_kwargs(model, cache))
        nxt, pos = out.logits[:, -1].argmax(-1), pos + 1


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def greedy(model, ids, cache=None, steps=8):
    kwargs = cache_kwargs(model, cache) if cache is not None else {}
    return model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **kwargs)[0, ids.shape[1]:]


# -- 1. a cache meets a model that does not route attention through it -------------------------------------------


def test_cache_refuses_another_model_with_plain_attention():
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    cache = KVCache(a, "snapkv", 0.5, window=4)
    with pytest.raises(RuntimeError, match="did not go through modalkv's attention"):
        b.generate(prompt(24), max_new_tokens=4, do_sample=False, **cache_kwargs(b, cache))


def test_cache_refuses_another_model_with_modalkv_attention():
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    KVCache(b, "full")  # b now routes its attention through modalkv too
    cache = KVCache(a, "snapkv", 0.5, window=4)
    with pytest.raises(RuntimeError, match="built for another model"):
        b.generate(prompt(24), max_new_tokens=4, do_sample=False, **cache_kwargs(b, cache))


def test_cache_refuses_after_attention_implementation_changed():
    a = tiny_llama()
    cache = KVCache(a, "snapkv", 0.5, window=4)
    a.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attention implementation is 'sdpa'"):
        a.generate(prompt(24), max_new_tokens=4, do_sample=False, **cache_kwargs(a, cache))


def test_cache_built_for_fewer_layers_is_refused():
    small, deep = tiny_llama(layers=2), tiny_llama(layers=3)
    cache = KVCache(small, "snapkv", 0.5, window=4)
    KVCache(deep, "full")
    with pytest.raises((RuntimeError, ValueError), match="another model"):
        deep(prompt(16), **cache_kwargs(deep, cache))


def test_a_left_over_layer_cannot_hijack_another_forward():
    """A managed layer updated outside modalkv's attention must not be read by the next forward of the model."""
    a = tiny_llama()
    ids = prompt(20)
    reference = greedy(a, ids, DynamicCache(config=a.config))
    cache = KVCache(a, "snapkv", 0.5, window=4)
    a(ids, **cache_kwargs(a, cache))
    layer = cache.layers[0]
    k = torch.randn(1, 2, 1, 16)
    layer.update(k, k)  # left behind: no attention consumed it
    # a DynamicCache forward on the same model (and thread) attends to its own keys, not to the stale layer's
    assert torch.equal(greedy(a, ids, DynamicCache(config=a.config)), reference)


def test_interleaved_caches_and_models_stay_independent():
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    ids = prompt(24)
    alone_a = greedy(a, ids, KVCache(a, "h2o", 12))
    alone_b = greedy(b, ids, KVCache(b, "snapkv", 12, window=4))
    ca, cb = KVCache(a, "h2o", 12), KVCache(b, "snapkv", 12, window=4)
    la, _ = run_steps(a, ids, None, ca, 0)
    lb, _ = run_steps(b, ids, None, cb, 0)
    tok_a, tok_b = [la[0].argmax(-1)], [lb[0].argmax(-1)]
    pos = ids.shape[1]
    for _ in range(7):  # one step of each, alternating
        for m, c, toks in ((a, ca, tok_a), (b, cb, tok_b)):
            out = m(input_ids=toks[-1][:, None], position_ids=torch.tensor([[pos]]), **cache_kwargs(m, c))
            toks.append(out.logits[:, -1].argmax(-1))
        pos += 1
    assert torch.equal(torch.cat(tok_a), alone_a) and torch.equal(torch.cat(tok_b), alone_b)


# -- 2. every float parameter finite and in range --------------------------------------------------------------


def _float_fields():
    for name, cls in REGISTRY.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            args = typing.get_args(hint) or (hint,)
            if f.init and float in args:
                yield name, f.name


@pytest.mark.parametrize("method, field", list(_float_fields()))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_parameters_are_refused(method, field, bad):
    with pytest.raises(ValueError, match=rf"\.{field} must be a finite number, got {bad}"):
        REGISTRY[method](**{field: bad})


def test_every_method_has_a_float_parameter_checked():
    checked = {m for m, _ in _float_fields()}
    assert {"retentivekv", "adakv", "madakv", "hae", "lookm", "sphericalkv", "pyramidkv", "h2o"} <= checked


# -- 3. reset forgets the previous prompt's modality ------------------------------------------------------------


def test_reset_forgets_modality_ids(model):
    text = prompt(32, seed=5)
    fresh = KVCache(model, "snapkv", 0.5, window=4, modality_caps={"image": 0.1})
    model(text, **cache_kwargs(model, fresh))
    cache = KVCache(model, "snapkv", 0.5, window=4, modality_caps={"image": 0.1})
    ids = torch.zeros(1, 32, dtype=torch.long)
    ids[0, 2:20] = 1  # the first prompt had 18 image tokens
    cache.set_modality(ids)
    model(prompt(32, seed=4), **cache_kwargs(model, cache))
    cache.reset()
    model(text, **cache_kwargs(model, cache))
    for got, want in zip(cache.managed_layers, fresh.managed_layers):
        for s, r in zip(got.heads, want.heads):
            assert int(s.mod[:, : s.n].abs().sum()) == 0
            assert torch.equal(s.pos[:, : s.n].sort(-1).values, r.pos[:, : r.n].sort(-1).values)


# -- 4. StreamingLLM never evicts its own sinks -----------------------------------------------------------------


def test_streaming_absolute_budget_not_above_sinks_is_refused(model):
    with pytest.raises(ValueError, match=r"absolute budget of 3 tokens leaves no room beside n_sink=4"):
        KVCache(model, "streamingllm", 3)
    with pytest.raises(ValueError, match=r"absolute decode_budget of 4 tokens leaves no room beside n_sink=4"):
        KVCache(model, "streamingllm", 0.5, decode_budget=4)


def test_streaming_small_ratio_budget_keeps_position_zero(model):
    cache = KVCache(model, "streamingllm", 0.1, n_sink=4)  # 20 tokens: 2 kept, fewer than the 4 sinks
    run_steps(model, prompt(20), None, cache, 10)
    for layer in cache.managed_layers:
        for store in layer.heads:
            pos = store.pos[0, : store.n].tolist()
            assert 0 in pos and layer.seen - 1 in pos, pos
            assert store.n == math.ceil(0.1 * layer.seen)


# -- clear errors ---------------------------------------------------------------------------------------------


def test_huge_integer_budget_is_refused(model):
    with pytest.raises(ValueError, match=r"budget of 10+ tokens is beyond any context length"):
        KVCache(model, "snapkv", 10**30)


def test_modality_caps_as_text_or_wrong_type(model):
    a = KVCache(model, "snapkv", 0.5, modality_caps="image=0.1,text=0.5")
    assert a.budget.modality_caps == {"image": 0.1, "text": 0.5}
    with pytest.raises(TypeError, match="modality_caps must be a dict"):
        KVCache(model, "snapkv", 0.5, modality_caps=0.1)
    with pytest.raises(ValueError, match="modality cap 'image': write <modality>=<ratio>"):
        KVCache(model, "snapkv", 0.5, modality_caps="image")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_decode_budget_must_be_a_positive_int(model, bad):
    with pytest.raises(ValueError, match="decode_budget must be a positive int"):
        KVCache(model, "snapkv", 0.5, decode_budget=bad)


def test_pickle_and_torch_save_point_to_save_cache(model):
    cache = KVCache(model, "snapkv", 0.5, window=4)
    model(prompt(16), **cache_kwargs(model, cache))
    with pytest.raises(TypeError, match=r"modalkv.save_cache\(cache, path\)"):
        pickle.dumps(cache)
    with pytest.raises(TypeError, match=r"modalkv.save_cache"):
        torch.save(cache, io.BytesIO())


def test_deepcopy_gives_an_independent_cache(model):
    ids = prompt(24)
    cache = KVCache(model, "h2o", 12)
    run_steps(model, ids, None, cache, 0)
    twin = copy.deepcopy(cache)
    assert all(layer.cache is twin for layer in twin.managed_layers) and twin.method.cache is twin
    pos = torch.tensor([[ids.shape[1]]])
    nxt = torch.tensor([[7]])
    out1 = model(input_ids=nxt, position_ids=pos, **cache_kwargs(model, cache)).logits
    out2 = model(input_ids=nxt, position_ids=pos, **cache_kwargs(model, twin)).logits
    assert torch.equal(out1, out2)


# -- crop: prompt-lookup and assisted decoding -------------------------------------------------------------------


def test_prompt_lookup_decoding_equals_greedy_on_the_full_cache(model):
    ids = torch.cat([prompt(30, seed=3), prompt(30, seed=3)], 1)  # repeats: prompt lookup finds candidates
    plain = greedy(model, ids, KVCache(model, "full"), steps=12)
    cache = KVCache(model, "full")
    assert cache.is_croppable
    out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3,
                         **cache_kwargs(model, cache))[0, ids.shape[1]:]
    assert torch.equal(out, plain)


@pytest.mark.parametrize("method", ["snapkv", "adakv"])
def test_verify_then_crop_equals_never_drafting(model, method):
    """What assisted decoding does after a compressed prefill: a draft chunk is attended, the rejected tail is cropped,
    and the next step's logits equal those of a cache that only ever saw the accepted token."""
    ids = prompt(30, seed=3)
    drafted, plain = KVCache(model, method, 0.5, window=4), KVCache(model, method, 0.5, window=4)
    for cache in (drafted, plain):
        model(ids, **cache_kwargs(model, cache))
    model(input_ids=torch.tensor([[5, 6, 7]]), position_ids=torch.tensor([[30, 31, 32]]),
          **cache_kwargs(model, drafted))
    drafted.crop(-2)
    model(input_ids=torch.tensor([[5]]), position_ids=torch.tensor([[30]]), **cache_kwargs(model, plain))
    nxt = dict(input_ids=torch.tensor([[9]]), position_ids=torch.tensor([[31]]))
    a = model(**nxt, **cache_kwargs(model, drafted)).logits
    b = model(**nxt, **cache_kwargs(model, plain)).logits
    assert (a - b).abs().max() < 1e-5
    # drafting inside the prompt forward (generate's first step) would compress with the draft among the queries
    cache = KVCache(model, method, 0.5, window=4)
    twice = torch.cat([ids, ids], 1)
    with pytest.raises(ValueError, match="run the context through the model with the cache first"):
        model.generate(twice, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3,
                       **cache_kwargs(model, cache))


def test_crop_removes_exactly_the_last_tokens(model):
    ids = prompt(20)
    cache = KVCache(model, "snapkv", 0.5, window=4)
    run_steps(model, ids, None, cache, 0)
    before = [(s.n, s.pos[:, : s.n].clone()) for layer in cache.managed_layers for s in layer.heads]
    model(input_ids=torch.tensor([[5, 6, 7]]), position_ids=torch.tensor([[20, 21, 22]]), **cache_kwargs(model, cache))
    cache.crop(-3)
    assert cache.get_seq_length() == 20
    after = [(s.n, s.pos[:, : s.n]) for layer in cache.managed_layers for s in layer.heads]
    assert all(n0 == n1 and torch.equal(p0, p1) for (n0, p0), (n1, p1) in zip(before, after))
    with pytest.raises(ValueError, match="reaches into the compressed prompt"):
        cache.crop(-1)
    full = KVCache(model, "full")
    run_steps(model, ids, None, full, 0)
    full.crop(-5)  # the whole prompt was kept: cropping into it is exact
    assert full.get_seq_length() == 15 and all(s.n == 15 for s in full.managed_layers[0].heads)


@pytest.mark.parametrize("method", ["h2o", "streamingllm", "retentivekv"])
def test_methods_that_evict_while_decoding_are_not_croppable(model, method):
    cache = KVCache(model, method, 0.5, **params_for(method))
    assert not cache.is_croppable
    run_steps(model, prompt(20), None, cache, 2)
    with pytest.raises(ValueError, match=f"cannot crop a {method} cache"):
        cache.crop(-1)


def test_quantized_and_decode_budget_caches_are_not_croppable(model):
    assert not KVCache(model, "snapkv", 0.5, quantize="kivi-4").is_croppable
    assert not KVCache(model, "snapkv", 0.5, decode_budget=16).is_croppable


# -- budgets that mean what users think -------------------------------------------------------------------------


def _max_entries(cache) -> int:
    return max(int(s.valid[:, : s.n].sum(-1).max()) for layer in cache.managed_layers for s in layer.heads)


@pytest.mark.parametrize("method", [m for m in REGISTRY if m not in ("full", "sphericalkv")])
@pytest.mark.parametrize("policy", ["attention", "recent"])
def test_decode_budget_bounds_every_method(model, method, policy):
    cache = KVCache(model, method, 16, decode_budget=20, decode_policy=policy, **params_for(method))
    steps(model, prompt(40), cache, 30)
    assert _max_entries(cache) <= 20
    assert cache.managed_layers[0].seen == 70


def test_decode_budget_bounds_the_full_cache_and_ratio_budgets(model):
    for method, budget in (("full", 1.0), ("snapkv", 0.5)):
        cache = KVCache(model, method, budget, decode_budget=24, **params_for(method))
        run_steps(model, prompt(40), None, cache, 20)
        assert _max_entries(cache) == 24


def test_decode_budget_bounds_spherical_bytes(model):
    """Spherical KV's budget is bytes: decode_budget D caps a layer at D dense entries' bytes per KV head."""
    cache = KVCache(model, "sphericalkv", 16, decode_budget=20, **SPHERICAL)
    run_steps(model, prompt(40), None, cache, 40)
    layer = cache.managed_layers[0]
    store = layer.heads[0]
    dense = (store.d + store.dv) * store.values.element_size()
    held = sum(s.bytes()["payload"] for s in layer.heads)
    assert held <= 20 * dense * len(layer.heads)


def test_snapkv_keeps_every_generated_token_without_decode_budget(model):
    cache = KVCache(model, "snapkv", 16, window=4)
    run_steps(model, prompt(40), None, cache, 30)
    assert _max_entries(cache) == 16 + 30  # the paper's setting: prefill-only compression


@pytest.mark.parametrize("policy", ["attention", "recent"])
def test_decode_budget_eviction_equals_masked_full_cache(impl, policy):
    model = tiny_llama(impl)
    ids = prompt(40)
    cache = KVCache(model, "snapkv", 16, decode_budget=20, decode_policy=policy, window=4, kernel=3)
    with Recorder() as rec:
        logits, fed = run_steps(model, ids, None, cache, 12)
    ref = masked_reference(model, ids, None, rec.records, fed)
    for got, want in zip(logits, ref):
        assert (got - want).abs().max() < 1e-4


def test_decode_policy_recent_keeps_sinks_and_newest(model):
    cache = KVCache(model, "snapkv", 16, decode_budget=20, decode_policy="recent", window=4, kernel=3)
    run_steps(model, prompt(40), None, cache, 30)
    layer = cache.managed_layers[0]
    for store in layer.heads:
        pos = sorted(store.pos[0, : store.n].tolist())
        assert pos[-16:] == list(range(layer.seen - 16, layer.seen))  # the newest 16 (20 less 4 sinks)


def test_absolute_budget_larger_than_prompt_is_a_window(model):
    cache = KVCache(model, "streamingllm", 30, n_sink=2)
    run_steps(model, prompt(20), None, cache, 25)
    for store in cache.managed_layers[0].heads:
        pos = sorted(store.pos[0, : store.n].tolist())
        assert store.n == 30 and pos[:2] == [0, 1] and pos[2:] == list(range(45 - 28, 45))
    snap = KVCache(model, "snapkv", 100, window=4)
    model(prompt(20), **cache_kwargs(model, snap))
    assert _max_entries(snap) == 20


@pytest.mark.parametrize("method", ["h2o", "snapkv", "streamingllm"])
def test_kivi_never_holds_more_than_the_same_method_unquantized(model, method):
    ids = prompt(200)
    reports = []
    for quantize in (None, "kivi-4"):
        cache = KVCache(model, method, 32, quantize=quantize, decode_budget=40, **params_for(method))
        run_steps(model, ids, None, cache, 60)
        reports.append(cache.memory_report()["kept_bytes"])
    assert reports[1] <= reports[0]


# -- caches are freed at once (no reference cycles) -------------------------------------------------------------


@pytest.mark.parametrize("method", list(REGISTRY))
def test_a_dropped_cache_is_freed_without_the_garbage_collector(model, method):
    gc.collect()
    gc.disable()
    try:
        cache = KVCache(model, method, 1.0 if method == "full" else 0.5, **params_for(method))
        steps(model, prompt(24), cache, 3)
        ref = weakref.ref(cache)
        store = weakref.ref(cache.managed_layers[0].heads[0])
        del cache
        assert ref() is None and store() is None
    finally:
        gc.enable()


def test_gemma3_sliding_layers_with_decode_budget():
    model = tiny_gemma3()
    cache = KVCache(model, "snapkv", 12, decode_budget=16, window=4, kernel=3)
    run_steps(model, prompt(30), None, cache, 20)
    assert _max_entries(cache) <= 16



def test_attention_policy_evicts_the_least_attended_old_entry(model):
    cache = KVCache(model, "snapkv", 16, decode_budget=20, window=4, kernel=3)
    run_steps(model, prompt(40), None, cache, 4)  # 20 entries per head: at the bound
    layer = cache.managed_layers[0]
    store = layer.heads[0]
    n = store.n
    g = torch.Generator().manual_seed(0)
    store.extras["decode_attention"][:, :n] = torch.rand(1, n, generator=g) + 1.0
    old = store.pos[0, :n] <= layer.seen - 1 - 10  # outside the protected recent half (10 of 20)
    victim = int(store.pos[0, :n][old][store.extras["decode_attention"][0, :n][old].argmin()])
    store.append(store.keys[:, :1], store.values[:, :1], torch.tensor([[layer.seen]], dtype=torch.int32),
                 torch.zeros(1, 1, dtype=torch.int8), torch.ones(1, 1, dtype=torch.bool))
    layer.seen += 1
    zero = [torch.zeros(1, 2, 1, s.n) for s in layer.heads]
    layer.enforce_decode_budget(zero)
    assert store.n == 20 and victim not in store.pos[0, : store.n].tolist()


def test_full_refuses_a_budget_it_would_ignore(model):
    with pytest.raises(ValueError, match="full keeps every prompt token"):
        KVCache(model, "full", 0.25)
    with pytest.raises(ValueError, match="full keeps every prompt token"):
        KVCache(model, "full", 1.0, modality_caps={"image": 0.1})
    KVCache(model, "full", 1.0, decode_budget=64)  # bounded while decoding: fine

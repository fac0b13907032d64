"""The per-method test table (tests/helpers.py) covers the method registry, so no method escapes the shared suites."""

import pytest
from helpers import EVICTING, METHOD_TESTS, SMALL, Exempt, Shared, prompt, run_steps, tiny_llama, undeclared_extras

from modalkv import KVCache
from modalkv.methods import REGISTRY


def test_every_registered_method_has_test_parameters():
    missing = sorted(set(REGISTRY) - set(METHOD_TESTS))
    assert not missing, (f"method(s) {missing} are registered but have no entry in METHOD_TESTS (tests/helpers.py): "
                         "add Shared({...test parameters...}) to run the shared exactness/invariant suites, or "
                         "Exempt('why, and where its own tests are')")
    stale = sorted(set(METHOD_TESTS) - set(REGISTRY))
    assert not stale, f"METHOD_TESTS names method(s) {stale} that are not registered"


def test_shared_suites_take_their_methods_from_the_table():
    assert EVICTING == [n for n in REGISTRY if isinstance(METHOD_TESTS[n], Shared)]
    assert all(isinstance(METHOD_TESTS[n], Exempt) and METHOD_TESTS[n].reason for n in set(REGISTRY) - set(EVICTING))
    assert {"snapkv", "h2o", "streamingllm"} <= set(EVICTING)


@pytest.mark.parametrize("method", sorted(METHOD_TESTS))
def test_test_parameters_are_parameters_of_the_method(method):
    """A misspelt test parameter would otherwise test a default configuration (KVCache refuses unknown names)."""
    KVCache(tiny_llama(layers=1), method, 1.0 if method == "full" else 0.5, **SMALL[method])


@pytest.mark.parametrize("method", EVICTING + ["lookm"])
def test_every_extra_a_method_keeps_is_declared(method):
    """A method's per-entry values are declared ``Extra``s (name and meaning), not ad-hoc string keys: after a prefill
    and decode steps (with a decode_budget, so that eviction runs) its stores hold no undeclared extra. (Spherical KV:
    test_spherical.py; KVzip: test_query_agnostic.py.)"""
    model = tiny_llama(layers=2)
    cache = KVCache(model, method, 0.5, decode_budget=12, **SMALL[method])
    run_steps(model, prompt(24), None, cache, 4)
    assert not undeclared_extras(cache)


def test_the_cache_resolves_names_in_the_registry_the_methods_fill():
    """modalkv.methods registers its classes in modalkv.registry, where KVCache looks names up (the cache does not
    import the methods); a method registered later is usable by name at once."""
    from dataclasses import dataclass

    from modalkv import registry
    from modalkv.methods import SnapKV, register

    assert REGISTRY is registry.METHODS and REGISTRY["snapkv"] is SnapKV

    @dataclass
    class Wider(SnapKV):
        name = "snapkv_wider_test"

    register(Wider)
    try:
        cache = KVCache(tiny_llama(layers=1), "snapkv_wider_test", 0.5, window=4)
        assert type(cache.method) is Wider and cache.method.window == 4
    finally:
        del REGISTRY["snapkv_wider_test"]

"""Bad input gets a clear error that names the problem."""

import pytest
import torch

from helpers import prompt, tiny_llama
from modalkv import KVCache, cache_kwargs, make_method
from modalkv.methods import SnapKV, make_quantizer
from modalkv.methods.base import PrefillContext


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_unknown_method_lists_available(model):
    with pytest.raises(ValueError, match=r"unknown method 'nosuch'; available: full, streamingllm, h2o"):
        KVCache(model, "nosuch", 0.5)


def test_unknown_parameter_lists_parameters(model):
    with pytest.raises(TypeError, match=r"SnapKV has no parameter\(s\) windw; its parameters: .*window"):
        KVCache(model, "snapkv", 0.5, windw=8)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"window": "8"}, r"SnapKV.window must be int, got str"),
        ({"window": 8.0}, r"SnapKV.window must be int, got float"),
        ({"pooling": "median"}, r"SnapKV.pooling must be one of 'max', 'avg'"),
        ({"window": 0}, r"SnapKV.window must be in \[1, None\], got 0"),
    ],
)
def test_parameter_type_and_range(model, params, message):
    with pytest.raises((TypeError, ValueError), match=message):
        KVCache(model, "snapkv", 0.5, **params)


@pytest.mark.parametrize(
    "budget, exc, message",
    [
        (0.0, ValueError, r"budget ratio must be in \(0, 1\], got 0.0"),
        (-0.1, ValueError, r"budget ratio must be in \(0, 1\], got -0.1"),
        (1.5, ValueError, r"budget ratio must be in \(0, 1\], got 1.5"),
        (float("nan"), ValueError, r"budget ratio must be in \(0, 1\], got nan"),
        (0, ValueError, r"budget as a token count must be >= 1, got 0"),
        (True, TypeError, r"budget must be a float ratio in \(0, 1\] or an int token count, got bool"),
        ("0.5", TypeError, r"got str"),
    ],
)
def test_budget_out_of_range(model, budget, exc, message):
    with pytest.raises(exc, match=message):
        KVCache(model, "snapkv", budget)


def test_unknown_modality_cap(model):
    with pytest.raises(ValueError, match=r"unknown modality 'smell' in modality_caps"):
        KVCache(model, "snapkv", 0.5, modality_caps={"smell": 0.1})


def test_unknown_quantizer():
    with pytest.raises(ValueError, match=r"unknown quantizer 'kivi-x'"):
        make_quantizer("kivi-x")


def test_unsupported_attention_implementation():
    m = tiny_llama("flex_attention")
    with pytest.raises(ValueError, match=r"attention implementation 'flex_attention' is not supported by modalkv"):
        KVCache(m, "snapkv", 0.5)


def test_softcapping_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match=r"gemma2: attention logit soft-capping is not supported"):
        KVCache(Gemma2ForCausalLM(cfg), "snapkv", 0.5)


def test_nan_scores_raise(model):
    B, H, n, d = 1, 2, 12, 16
    keys = torch.randn(B, H, n, d)
    keys[0, 0, 3] = float("nan")
    cache = KVCache(model, "snapkv", 0.5)
    ctx = PrefillContext(
        layer=cache.layers[0], query=torch.randn(B, 4, n, d), keys=keys, values=torch.randn(B, H, n, d),
        scaling=0.25, real=torch.ones(B, n, dtype=torch.bool), modality=torch.zeros(B, n, dtype=torch.int8),
        positions=torch.arange(n), n_real=torch.tensor([n]), budget_tokens=torch.tensor([6]), caps={},
    )
    with pytest.raises(FloatingPointError, match=r"snapkv: eviction scores contain NaN"):
        SnapKV(window=4).prefill(ctx)
    for name in ("retentivekv", "sphericalkv"):  # the seed methods that score tokens refuse NaN too
        cache = KVCache(model, name, 0.5, window=4, **({"calib_tokens": 64} if name == "sphericalkv" else {}))
        ctx.layer = cache.layers[0]
        with pytest.raises(FloatingPointError, match=rf"{name}: eviction scores contain NaN"):
            cache.method.prefill(ctx)


def test_mismatched_modality_ids(model):
    cache = KVCache(model, "snapkv", 0.5)
    cache.set_modality(torch.zeros(2, 20, dtype=torch.long))  # batch 2 ids, batch 1 input
    with pytest.raises(ValueError, match=r"modality ids are for batch 2 but the input has batch 1"):
        model(prompt(20), **cache_kwargs(model, cache))
    with pytest.raises(ValueError, match=r"modality ids must be in \[0, 1, 2, 3\]"):
        cache.set_modality(torch.full((1, 20), 7))


def test_make_method_rejects_mixed_forms():
    with pytest.raises(TypeError, match="either in the method instance or as keywords"):
        make_method(SnapKV(), window=4)


def test_a_method_class_or_other_object_is_not_a_method():
    model = tiny_llama(layers=1)
    with pytest.raises(TypeError, match="method must be a name or a Method instance, got type"):
        KVCache(model, SnapKV, 0.5)
    with pytest.raises(TypeError, match="got int"):
        KVCache(model, 3, 0.5)
    with pytest.raises(ValueError, match="unknown method 'snap'"):
        KVCache(model, "snap", 0.5)

"""modalkv's attention function: the batched step over a packed layer equals the head-by-head step (uniform and
ragged heads), the mask helpers, and the clear errors for layouts it cannot serve."""

from types import SimpleNamespace

import pytest
import torch

import modalkv.attention as attn
from helpers import prompt, run_steps, tiny_llama
from modalkv import KVCache, cache_kwargs


@torch.no_grad()
def _decode(model, cache, ragged: bool, steps=3):
    """Prefill a padded batch of two, optionally remove two entries from the first KV head of every layer (the heads
    are then ragged), then decode ``steps`` tokens; returns the logits of each step."""
    ids = prompt(40, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
    if ragged:
        for layer in cache.managed_layers:
            assert layer.packed
            for slot in (5, 9):  # slots past a head's end keep stale copies of moved entries: masked by size
                layer.heads[0].remove(torch.tensor([slot, slot + 1]))
            assert layer.packed_intact() and layer.heads[0].n == layer.heads[1].n - 2
    out = []
    for t in range(steps):
        mask = torch.cat([mask, mask.new_ones(2, 1)], -1)
        tok = torch.full((2, 1), 3 + t)
        out.append(model(input_ids=tok, attention_mask=mask, **cache_kwargs(model, cache)).logits[:, -1])
    return out


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("method, budget", [("full", 1.0), ("h2o", 24)])
def test_packed_step_equals_the_head_by_head_step(method, budget, ragged, monkeypatch):
    model = tiny_llama()
    calls = []
    real = attn.attend_packed
    monkeypatch.setattr(attn, "attend_packed", lambda *a: calls.append(1) or real(*a))
    packed = _decode(model, KVCache(model, method, budget), ragged)
    assert len(calls) == 3 * 3  # every decode step of every layer took the batched path
    monkeypatch.setattr(attn, "_packable", lambda layer, q: False)  # head by head
    calls.clear()
    per_head = _decode(model, KVCache(model, method, budget), ragged)
    assert not calls
    for a, b in zip(packed, per_head):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("readout", [{"state_readout": "scan"}, {"state_readout": "moments"},
                                     {"state_readout": "moments", "second_order": True}, {"state_readout": "linear"}])
def test_packed_readout_equals_the_head_by_head_readout(readout, batch, monkeypatch):
    """RetentiveKV's layer-wide readout (states absorbing evicted tokens, tau=0) gives the head-by-head logits, for
    one row and for a left-padded batch of two (the linear readout: the default loop over heads)."""
    model = tiny_llama()
    kw = {"tau": 0.0, "states_in_budget": False, "window": 4, "n_sink": 2, **readout}

    @torch.no_grad()
    def decode(cache):
        ids = prompt(40, batch=batch)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[1, :3] = 0  # a left-padded row
        return run_steps(model, ids, mask, cache, 6, feed=[torch.full((batch,), 3 + t) for t in range(6)])[0]

    calls = []
    real = attn.attend_packed
    monkeypatch.setattr(attn, "attend_packed", lambda *a: calls.append(1) or real(*a))
    cache = KVCache(model, "retentivekv", 0.3, **kw)
    packed = decode(cache)
    assert len(calls) == 3 * 6  # every decode step of every layer took the batched path
    states = cache.method._states
    absorbed = [states[r]["z" if "z" in states[r] else "m"] for r in states]
    assert all(float(t.sum()) > 0 for t in absorbed)  # the states absorbed evicted tokens
    monkeypatch.setattr(attn, "_packable", lambda layer, q: False)  # head by head
    calls.clear()
    per_head = decode(KVCache(model, "retentivekv", 0.3, **kw))
    assert not calls
    for a, b in zip(packed, per_head):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_visible_keys_reads_the_last_query_row():
    assert attn.visible_keys(None, 2, 3, "cpu").tolist() == [[True] * 3] * 2
    allowed = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    allowed[1, :, :, :2] = False  # row 1: two padding tokens
    assert attn.visible_keys(allowed, 2, 4, "cpu").tolist() == [[True] * 4, [False, False, True, True]]
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~allowed, float("-inf"))  # eager's float mask: 0 = visible
    assert torch.equal(attn.visible_keys(additive, 2, 4, "cpu"), attn.visible_keys(allowed, 2, 4, "cpu"))
    assert attn.visible_keys(allowed[:1], 2, 4, "cpu").shape == (2, 4)  # a mask of batch 1 serves every row


def test_block_mask_among_the_new_tokens():
    assert attn._block_mask(None, 1) is None  # one new token sees everything stored
    assert torch.equal(attn._block_mask(None, 3)[0], torch.ones(3, 3, dtype=torch.bool).tril())
    mask = torch.ones(1, 1, 3, 8, dtype=torch.bool)
    mask[..., -3:] = torch.ones(3, 3, dtype=torch.bool).tril()
    mask[..., -3] = False  # the first new token is padding: nobody attends to it ...
    block = attn._block_mask(mask, 3)[0]
    assert block.tolist() == [[True, False, False], [False, True, False], [False, True, True]]  # ... but itself


def test_plain_causal_check():
    causal = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    assert attn._is_plain_causal(None) and attn._is_plain_causal(causal)
    padded = causal.clone()
    padded[..., 0] = False
    assert not attn._is_plain_causal(padded)
    assert not attn._is_plain_causal(torch.zeros(1, 1, 5, 5))  # a float mask is never taken for plain causal


def test_check_supported_names_the_problem():
    ok = SimpleNamespace(model_type="llama", num_attention_heads=4)
    attn.check_supported(ok)
    with pytest.raises(ValueError, match="gemma2: attention logit soft-capping is not supported"):
        attn.check_supported(SimpleNamespace(model_type="gemma2", num_attention_heads=4, attn_logit_softcapping=50.0))
    with pytest.raises(ValueError, match=r"deepseek_v3: multi-head latent attention \(MLA\) caches are not supported"):
        attn.check_supported(SimpleNamespace(model_type="deepseek_v3", num_attention_heads=4, kv_lora_rank=512))
    with pytest.raises(ValueError, match="config has no num_attention_heads"):
        attn.check_supported(SimpleNamespace(model_type="bert"))


def test_install_refuses_other_attention_implementations():
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention implementation 'flash_attention_2' is not supported"):
        KVCache(model, "full")


def test_the_fused_kivi_path_is_not_taken_when_a_method_hides_entries():
    """HAE with bin_attend=False hides its recycle bin from attention (a declared hiding extra); the fused KIVI step
    does not read that extra, so the layer must attend head by head, where hidden entries are masked."""
    model = tiny_llama()
    taken = {}
    for attend in (True, False):
        cache = KVCache(model, "hae", 0.5, quantize="kivi-4", recent=4, n_sink=2, bin_size=2, bin_attend=attend)
        run_steps(model, prompt(64), None, cache, 6)
        taken[attend] = [attn._coded_batchable(layer, 1) for layer in cache.managed_layers]
    if not any(taken[True]):
        pytest.skip("the fused KIVI kernels are not available here")
    assert not any(taken[False])

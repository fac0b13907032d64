"""One captured prefill builds exactly the cache a normal prefill would, for every method."""

import pytest
import torch

from helpers import EVICTING, SMALL, left_pad, prompt, run_steps, tiny_gemma3, tiny_llama
from modalkv import KVCache, cache_kwargs
from modalkv.replay import capture_prefill


def decode(model, cache, first, mask, steps=6):
    """Greedy steps from a prefilled cache; returns logits per step."""
    B = first.shape[0]
    pos = (mask.sum(-1, keepdim=True) - 1).long() if mask is not None else None
    nxt, out_logits = first, []
    m = mask
    with torch.no_grad():
        for _ in range(steps):
            m = torch.cat([m, m.new_ones(B, 1)], -1)
            pos = pos + 1
            out = model(input_ids=nxt[:, None], attention_mask=m, position_ids=pos, **cache_kwargs(model, cache))
            out_logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1].argmax(-1)
    return out_logits


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("method", EVICTING)
def test_build_cache_equals_normal_prefill(factory, method):
    model = factory()
    ids, mask = left_pad([prompt(40, seed=2)[0], prompt(33, seed=3)[0]])
    captured = capture_prefill(model, ids, mask)
    replayed = captured.build_cache(model, method, 0.5, **SMALL[method])
    normal = KVCache(model, method, 0.5, **SMALL[method])
    logits, _ = run_steps(model, ids, mask, normal, 0)
    assert torch.allclose(captured.logits[:, -1], logits[0], atol=1e-5)
    for a, b in zip(replayed.managed_layers, normal.managed_layers):
        assert a.seen == b.seen
        for sa, sb in zip(a.heads, b.heads):
            assert sa.n == sb.n and torch.equal(sa.pos[:, : sa.n], sb.pos[:, : sb.n])
            assert torch.equal(sa.kv()[0], sb.kv()[0]) and torch.equal(sa.valid[:, : sa.n], sb.valid[:, : sb.n])
    first = logits[0].argmax(-1)
    for x, y in zip(decode(model, replayed, first, mask), decode(model, normal, first, mask)):
        assert (x - y).abs().max() < 1e-5

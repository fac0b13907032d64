"""Compress a context once, before any question: modalkv.prefill, fork, KVzip and Expected Attention."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from helpers import (Recorder, clone_model, masked_reference, prompt, run_steps, tiny_gemma3, tiny_llama,
                     undeclared_extras)
import modalkv
from modalkv import KVCache, cache_kwargs
from modalkv.methods.kvzip import SCORE as KVZIP_SCORE
from modalkv.methods.kvzip import KVzip
from modalkv.rope import cos_sin, unrotate

REPEAT = [3, 4, 5, 6]  # the reconstruction prompt's token ids for the stub tokenizer


class StubTokenizer:
    """The only thing KVzip asks of a tokenizer: ids for its repeat prompt."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        class Out:
            input_ids = torch.tensor([REPEAT])

        return Out()


TOK = StubTokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def answer(model, cache, context, question, steps=6):
    ids = torch.cat([context, question], 1)
    out = model.generate(input_ids=ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         **cache_kwargs(model, cache))
    return out[0, ids.shape[1]:]


# -- the prefill API ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "snapkv", "h2o", "expected_attention"])
def test_prefill_equals_a_plain_forward(model, method):
    ctx = prompt(40)
    budget = 1.0 if method == "full" else 0.5
    a, b = KVCache(model, method, budget), KVCache(model, method, budget)
    out = modalkv.prefill(model, a, ctx)
    ref = model(ctx, **cache_kwargs(model, b))
    assert torch.equal(out.logits, ref.logits)
    for la, lb in zip(a.managed_layers, b.managed_layers):
        for sa, sb in zip(la.heads, lb.heads):
            assert torch.equal(sa.pos[:, : sa.n], sb.pos[:, : sb.n]) and torch.equal(sa.keys[:, : sa.n], sb.keys[:, : sb.n])


@pytest.mark.parametrize("method", ["kvzip", "snapkv", "expected_attention"])
def test_a_compressed_context_answers_questions_in_any_order(model, method):
    ctx = prompt(60)
    questions = [prompt(5, seed=s) for s in (11, 12, 13, 14)]
    cache = KVCache(model, method, 0.25)
    modalkv.prefill(model, cache, ctx, tokenizer=TOK)
    before = cache.memory_report()
    first = [answer(model, cache.fork(), ctx, q) for q in questions]
    last = [answer(model, cache.fork(), ctx, q) for q in reversed(questions)][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, last))
    assert cache.memory_report() == before  # the context itself was never modified
    fresh = KVCache(model, method, 0.25)
    modalkv.prefill(model, fresh, ctx, tokenizer=TOK)
    assert torch.equal(answer(model, fresh, ctx, questions[2]), first[2])


def test_prefill_errors(model):
    cache = KVCache(model, "snapkv", 0.5)
    modalkv.prefill(model, cache, prompt(20))
    with pytest.raises(ValueError, match="already holds another context"):
        modalkv.prefill(model, cache, prompt(20, seed=7))
    with pytest.raises(ValueError, match="more than the model's 1024-position window"):
        modalkv.prefill(model, KVCache(model, "snapkv", 0.5), prompt(1100))
    with pytest.raises(ValueError, match="built for another model"):
        modalkv.prefill(tiny_llama(seed=3), KVCache(model, "snapkv", 0.5), prompt(20))
    with pytest.raises(ValueError, match="tokenizer"):
        modalkv.prefill(model, KVCache(model, "kvzip", 0.5), prompt(20))
    with pytest.raises(ValueError, match="one context at a time"):
        modalkv.prefill(model, KVCache(model, "kvzip", 0.5), prompt(20, batch=2), tokenizer=TOK)


def test_kvzip_without_prefill_refuses_to_decode(model):
    cache = KVCache(model, "kvzip", 0.25)
    with pytest.raises(ValueError, match=r"modalkv.prefill\(model, cache, input_ids, tokenizer=tokenizer\)"):
        model.generate(prompt(30), max_new_tokens=3, do_sample=False, **cache_kwargs(model, cache))


def test_a_chat_turn_is_added_and_compressed_again(model):
    turn1, turn2 = prompt(60), prompt(30, seed=4)
    cache = KVCache(model, "kvzip", 0.25)
    modalkv.prefill(model, cache, turn1, tokenizer=TOK)
    entries_1 = cache.memory_report()["entries_kept"]
    history = torch.cat([turn1, turn2], 1)
    modalkv.prefill(model, cache, history, tokenizer=TOK)
    layer = cache.managed_layers[0]
    assert layer.seen == 90 and cache.get_seq_length() == 90
    assert cache.memory_report()["entries_kept"] == pytest.approx(entries_1 * 90 / 60, rel=0.1)
    with pytest.raises(ValueError, match="already holds another context"):
        modalkv.prefill(model, cache, torch.cat([prompt(60, seed=8), turn2], 1), tokenizer=TOK)


# -- KVzip ----------------------------------------------------------------------------------------------------------


def kvzip_scores(model, ctx, **params):
    """The scores KVzip computed (before it selects): {layer rank: [H, n]}."""
    captured = {}
    method = KVzip(**params)

    def capture(cache):
        for layer in cache.managed_layers:
            captured[layer.rank] = torch.stack([s.extras[KVZIP_SCORE.name][0, : s.n].clone() for s in layer.heads])
            for s in layer.heads:
                assert torch.equal(s.pos[0, : s.n], torch.arange(ctx.shape[1], dtype=torch.int32))

    cache = KVCache(model, method, 0.25)
    modalkv.prefill(model, cache, ctx, tokenizer=TOK, select=False)
    capture(cache)
    assert not undeclared_extras(cache)
    return captured


def test_kvzip_scored_once_then_selected_per_budget_equals_a_prefill_at_that_budget():
    from modalkv.budget import Budget

    model = tiny_llama()
    ctx = prompt(40)
    scored = KVCache(model, "kvzip", 0.25)
    modalkv.prefill(model, scored, ctx, tokenizer=TOK, select=False)
    assert all(s.count() == 40 for layer in scored.managed_layers for s in layer.heads)  # nothing evicted yet
    for budget in (0.25, 0.5):
        fork = scored.fork()
        fork.budget = Budget(budget)
        fork.method.select(fork)
        direct = KVCache(model, "kvzip", budget)
        modalkv.prefill(model, direct, ctx, tokenizer=TOK)
        for a, b in zip(fork.managed_layers, direct.managed_layers):
            for sa, sb in zip(a.heads, b.heads):
                assert torch.equal(sa.pos[0, : sa.n], sb.pos[0, : sb.n])
    with pytest.raises(ValueError, match="select=False"):
        modalkv.prefill(model, KVCache(model, "snapkv", 0.25), ctx, select=False)


@pytest.mark.parametrize("chunk", [64, 16])
def test_kvzip_scores_are_the_max_attention_of_the_reconstruction(chunk):
    """Reference: transformers' own eager attention over context + repeat prompt + context chunk."""
    model = tiny_llama("eager")
    ctx = prompt(40)
    got = kvzip_scores(model, ctx, chunk=chunk)
    ref = clone_model(model, "eager")
    n, G = ctx.shape[1], 2
    want = {r: torch.zeros(2, n) for r in range(3)}
    for c0 in range(0, n, chunk):
        piece = torch.cat([ctx, torch.tensor([REPEAT]), ctx[:, c0 : c0 + chunk]], 1)
        out = ref(piece, output_attentions=True, use_cache=False)
        for r, att in enumerate(out.attentions):  # [1, Hq, T, T]
            rows = att[0, :, n:, :n]  # reconstruction queries -> context keys
            best = rows.amax(1).view(2, G, n).amax(1)
            want[r] = torch.maximum(want[r], best)
    for r in range(3):
        assert (got[r] - want[r]).abs().max() < 1e-5


@pytest.mark.parametrize("allocation", ["global", "layer", "head"])
def test_kvzip_budgets_and_freed_bytes(model, allocation):
    ctx = prompt(80)
    full = KVCache(model, "full", reserve=0)
    modalkv.prefill(model, full, ctx)
    cache = KVCache(model, "kvzip", 0.25, allocation=allocation, chunk=32, reserve=0)
    modalkv.prefill(model, cache, ctx, tokenizer=TOK)
    counts = torch.tensor([[s.n for s in layer.heads] for layer in cache.managed_layers])
    k = 20  # ceil(0.25 * 80) per (layer, head)
    assert int(counts.sum()) == k * counts.numel()
    assert int(counts.min()) >= 1
    if allocation == "layer":
        assert (counts.sum(1) == k * counts.shape[1]).all()
    if allocation == "head":
        assert (counts == k).all()
    report, ref = cache.memory_report(), full.memory_report()
    assert report["allocated_bytes"] < 0.5 * ref["allocated_bytes"]  # the evicted bytes are released
    assert report["compression_ratio"] > 3.5


def test_kvzip_global_allocation_follows_the_scores(model):
    """Global allocation keeps exactly the top-scored pairs over every layer and head (each head's best aside)."""
    ctx = prompt(60)
    scores = kvzip_scores(model, ctx)
    cache = KVCache(model, "kvzip", 0.25)
    modalkv.prefill(model, cache, ctx, tokenizer=TOK)
    flat = torch.cat([scores[r].flatten() for r in range(3)])
    threshold = flat.topk(15 * 6).values[-1]
    for layer in cache.managed_layers:
        for h, s in enumerate(layer.heads):
            kept = scores[layer.rank][h][s.pos[0, : s.n].long()]
            dropped = torch.ones(60, dtype=torch.bool)
            dropped[s.pos[0, : s.n].long()] = False
            assert bool((scores[layer.rank][h][dropped] <= threshold + 1e-7).all())
            assert s.n == 1 or bool((kept >= threshold - 1e-7).sum() >= s.n - 1)


def test_kvzip_decoding_equals_the_masked_full_cache(impl):
    model = tiny_llama(impl)
    ctx = prompt(50)
    cache = KVCache(model, "kvzip", 0.3, chunk=16)
    out = modalkv.prefill(model, cache, ctx, tokenizer=TOK)
    logits, feed = [out.logits[:, -1].float()], []
    with Recorder() as rec:
        for t in range(6):
            nxt = torch.tensor([9]) if t == 0 else logits[-1].argmax(-1)
            feed.append(nxt)
            out = model(input_ids=nxt[:, None], position_ids=torch.tensor([[50 + t]]), **cache_kwargs(model, cache))
            logits.append(out.logits[:, -1].float())
    ref = masked_reference(model, ctx, None, rec.records, feed)
    for got, want in zip(logits, ref):
        assert (got - want).abs().max() < 1e-4


def test_kvzip_on_gemma3_keeps_sliding_windows_intact():
    model = tiny_gemma3()
    ctx = prompt(40)
    plain = DynamicCache(config=model.config)
    model(ctx, **cache_kwargs(model, plain))
    cache = KVCache(model, "kvzip", 0.5, chunk=16)
    modalkv.prefill(model, cache, ctx, tokenizer=TOK)
    for i, layer in enumerate(cache.layers):
        if not hasattr(layer, "heads"):
            assert torch.equal(layer.keys, plain.layers[i].keys)  # the reconstruction left no trace
    out = answer(model, cache.fork(), ctx, prompt(4, seed=2), steps=3)
    assert out.shape[0] == 3


# -- Expected Attention ---------------------------------------------------------------------------------------------


def test_unrotate_recovers_pre_rope_queries(model):
    captured, post = {}, {}
    hook = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.setdefault("q", o))
    cache = KVCache(model, "full")
    original = cache.method.prefill

    def spy(ctx):
        if ctx.layer.layer_idx == 1:
            post["q"] = ctx.query
        return original(ctx)

    cache.method.prefill = spy
    model(prompt(12), **cache_kwargs(model, cache))
    hook.remove()
    q_pre = captured["q"].view(1, 12, 4, 16).transpose(1, 2)
    cos, sin = cos_sin(model, 1, torch.arange(12)[None], q_pre)
    assert (unrotate(post["q"], cos[:, None], sin[:, None]) - q_pre).abs().max() < 1e-5


def test_expected_attention_prefers_keys_aligned_with_the_mean_query(model):
    """Scores rank a key the future queries will attend to above one they will not."""
    from modalkv.methods.expected_attention import ExpectedAttention
    from modalkv.methods.base import PrefillContext

    torch.manual_seed(0)
    B, Hq, H, n, d = 1, 4, 2, 30, 16
    cache = KVCache(model, "expected_attention", 0.5)
    direction = torch.randn(d)
    pos = torch.arange(n)[None]
    cos, sin = cos_sin(model, 0, pos, torch.zeros(1))
    pre = direction + 0.1 * torch.randn(B, Hq, n, d)
    query = pre * cos[:, None] + torch.cat([-pre[..., d // 2:], pre[..., : d // 2]], -1) * sin[:, None]
    keys = 0.1 * torch.randn(B, H, n, d)
    future = torch.arange(n, n + 32)[None]
    fcos, fsin = cos_sin(model, 0, future, torch.zeros(1))
    aligned = direction * fcos[0].mean(0) + torch.cat([-direction[d // 2:], direction[: d // 2]]) * fsin[0].mean(0)
    keys[:, :, 17] = aligned / aligned.norm() * 3  # a key the expected future query points at
    ctx = PrefillContext(layer=cache.layers[0], query=query, keys=keys, values=torch.ones(B, H, n, d), scaling=0.25,
                         real=torch.ones(B, n, dtype=torch.bool), modality=torch.zeros(B, n, dtype=torch.int8),
                         positions=torch.arange(n), n_real=torch.tensor([n]), budget_tokens=torch.tensor([5]), caps={})
    scores = ExpectedAttention(n_future=32).scores(ctx)
    assert (scores[0, :, 17] == scores[0].amax(-1)).all()


@pytest.mark.parametrize("images", ["reconstruct", "text"])
def test_kvzip_on_a_vlm_scores_image_entries(images):
    from test_hae import llava3
    from test_modality import llava_inputs

    model = llava3()
    ids, extra = llava_inputs(images=2)
    chunks = []
    method = KVzip(images=images, chunk=24)
    original = method._chunks

    def spy(*args):
        for piece, kw in original(*args):
            chunks.append((piece, kw))
            yield piece, kw

    method._chunks = spy
    cache = KVCache(model, method, 0.5)
    modalkv.prefill(model, cache, ids, tokenizer=TOK, **extra)
    repeated = torch.cat([p[0, len(REPEAT):] for p, _ in chunks])
    image_tokens = int((repeated == model.config.image_token_id).sum())
    assert image_tokens == (32 if images == "reconstruct" else 0)  # both images, whole (chunks never split one)
    if images == "reconstruct":
        assert sum(kw["pixel_values"].shape[0] for _, kw in chunks if kw) == 2
    kept = [s.mod[0, : s.n] for layer in cache.managed_layers for s in layer.heads]
    assert any(bool((m == 1).any()) for m in kept)  # image entries compete on their scores
    out = model.generate(input_ids=torch.cat([ids, prompt(3, seed=5)], 1), max_new_tokens=2, do_sample=False,
                         **cache_kwargs(model, cache.fork()))
    assert out.shape[1] == ids.shape[1] + 5

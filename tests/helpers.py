"""Helpers shared by the tests: tiny random models built from configs (fixed seeds), step-by-step runs that record
what every (layer, KV head) attended to, a masked full-cache reference, and the per-method test-parameter table
from which the shared suites (exactness, invariants, replay) take their methods.

Import them with ``from helpers import ...`` (pytest puts the tests folder on the path); fixtures stay in conftest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (
    AttentionInterface,
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import modalkv.attention as mattn
from modalkv import cache_kwargs
from modalkv.decoding import hidden_entries
from modalkv.layer import DECODE_ATTENTION
from modalkv.methods import REGISTRY

VOCAB = 128


def tiny_llama(impl: str = "sdpa", seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    """A GQA Llama: 4 query heads, 2 KV heads, head_dim 16."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    cfg._attn_implementation = impl
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(impl: str = "sdpa", seed: int = 0) -> Gemma3ForCausalLM:
    """Gemma-3 text model mixing sliding-window (window 8) and full-attention layers."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=1024,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    cfg._attn_implementation = impl
    return Gemma3ForCausalLM(cfg).eval()


def clone_model(model, impl: str):
    """The same weights under another attention implementation (a VLM's language model only)."""
    other = type(model)(model.config.__class__.from_dict(model.config.to_dict())).eval()
    other.load_state_dict(model.state_dict())
    text = getattr(other.config, "text_config", None)
    (text if text is not None else other.config)._attn_implementation = impl
    return other


def prompt(n: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g)


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(r.numel() for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - r.numel():] = r
        mask[i, n - r.numel():] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------------
# Running a cache step by step, recording what every (layer, KV head) held when it attended
# ---------------------------------------------------------------------------------------------------------


class Recorder:
    """Wraps modalkv's decode attention and records, per call, the visible positions of each (layer, KV head)."""

    def __init__(self):
        self.records: list[dict[int, torch.Tensor]] = []  # one dict per forward after prefill: layer -> [B, H, seen]

    def __enter__(self):
        self._orig = mattn.attend_stored

        def wrapped(layer, query, mask, scaling):
            seen = layer.seen
            B = query.shape[0]
            vis = torch.zeros(B, len(layer.heads), seen, dtype=torch.bool)
            for h, store in enumerate(layer.heads):
                n = store.n
                # add, not overwrite: an invalid slot may carry a stale copy of a valid slot's position
                seen_now = store.valid[:, :n]
                hidden = hidden_entries(layer.cache.method, store)  # kept but not read (HAE's bin_attend=False)
                if hidden is not None:
                    seen_now = seen_now & ~(hidden[:, :n] > 0)
                hits = torch.zeros(B, seen, dtype=torch.int32).scatter_add_(1, store.pos[:, :n].long(),
                                                                           seen_now.int())
                vis[:, h] = hits > 0
            if not self.records or layer.layer_idx in self.records[-1]:
                self.records.append({})
            self.records[-1][layer.layer_idx] = vis
            return self._orig(layer, query, mask, scaling)

        mattn.attend_stored = wrapped
        return self

    def __exit__(self, *exc):
        mattn.attend_stored = self._orig


@torch.no_grad()
def run_steps(model, ids, mask, cache, steps: int, feed: list[torch.Tensor] | None = None, extra=None):
    """Prefill then ``steps`` single-token steps (greedy, or teacher-forced by ``feed``). Returns logits per step
    ([B, V] each, the prefill's last position first) and the fed tokens. ``extra``: more prefill inputs (pixels);
    with ``extra`` the model computes its own positions (M-RoPE)."""
    mask = mask if mask is not None else torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if extra is not None:
        return _run_steps_vlm(model, ids, mask, cache, steps, feed, extra)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache))
    logits = [out.logits[:, -1].float()]
    tokens = []
    last = pos[:, -1:]
    for t in range(steps):
        nxt = feed[t] if feed is not None else logits[-1].argmax(-1)
        tokens.append(nxt)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], -1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, **cache_kwargs(model, cache))
        logits.append(out.logits[:, -1].float())
    return logits, tokens


def _run_steps_vlm(model, ids, mask, cache, steps, feed, extra):
    out = model(input_ids=ids, attention_mask=mask, **extra, **cache_kwargs(model, cache))
    logits, tokens = [out.logits[:, -1].float()], []
    for t in range(steps):
        nxt = feed[t] if feed is not None else logits[-1].argmax(-1)
        tokens.append(nxt)
        # no attention mask while decoding (unpadded prompts): Qwen2-VL turns a full-length mask into positions
        out = model(input_ids=nxt[:, None], **cache_kwargs(model, cache))
        logits.append(out.logits[:, -1].float())
    return logits, tokens


# ---------------------------------------------------------------------------------------------------------
# The masked full-cache reference: transformers' DynamicCache, attention restricted per (layer, KV head, step)
# ---------------------------------------------------------------------------------------------------------

_REF = {"step": 0, "records": None}


def _masked_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    B, Hq, q, d = query.shape
    H = key.shape[1]
    G = Hq // H
    k = key.repeat_interleave(G, dim=1).double()
    v = value.repeat_interleave(G, dim=1).double()
    logits = torch.matmul(query.double(), k.transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
    allowed = attention_mask[:, :, :, -key.shape[-2]:] if attention_mask is not None else None
    if allowed is not None and allowed.dtype != torch.bool:
        allowed = allowed == 0
    if allowed is None:
        allowed = torch.ones(B, 1, q, key.shape[-2], dtype=torch.bool)
    step = _REF["step"]
    records = _REF["records"]
    if step > 0 and records is not None and module.layer_idx in records[step - 1]:
        vis = records[step - 1][module.layer_idx]  # [B, H, kv]
        allowed = allowed & vis.repeat_interleave(G, dim=1)[:, :, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)  # padding query rows see nothing
    out = torch.matmul(probs, v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _mask_no_skip(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register("masked_ref", _masked_reference_attention)
AttentionMaskInterface.register("masked_ref", _mask_no_skip)


@torch.no_grad()
def masked_reference(model, ids, mask, records, feed, extra=None):
    """Logits of the full cache with, at step t, only the positions ``records[t-1]`` visible per (layer, head)."""
    ref = clone_model(model, "masked_ref")
    mask = mask if mask is not None else torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=ref.config)
    _REF.update(step=0, records=records)
    if extra is not None:
        try:
            out = ref(input_ids=ids, attention_mask=mask, **extra, **cache_kwargs(ref, cache))
            logits = [out.logits[:, -1].float()]
            for t, nxt in enumerate(feed):
                _REF["step"] = t + 1
                out = ref(input_ids=nxt[:, None], **cache_kwargs(ref, cache))
                logits.append(out.logits[:, -1].float())
        finally:
            _REF.update(step=0, records=None)
        return logits
    try:
        out = ref(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(ref, cache))
        logits = [out.logits[:, -1].float()]
        last = pos[:, -1:]
        for t, nxt in enumerate(feed):
            _REF["step"] = t + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], -1)
            last = last + 1
            out = ref(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, **cache_kwargs(ref, cache))
            logits.append(out.logits[:, -1].float())
    finally:
        _REF.update(step=0, records=None)
    return logits


# ---------------------------------------------------------------------------------------------------------
# Test parameters per registered method
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    """A method the shared suites run (exactness against the masked full cache, invariants, replay), with the
    parameters that suit tiny prompts (small windows, few sinks)."""

    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Exempt:
    """A method the shared suites skip, and why (where its own tests are)."""

    reason: str
    params: dict = field(default_factory=dict)


#: One entry per method in ``modalkv.methods.REGISTRY`` (test_method_table.py fails for a method without one).
#: Adding a method to the shared suites is one line here: ``"name": Shared({...parameters...}),``.
METHOD_TESTS: dict[str, Shared | Exempt] = {
    "full": Exempt("the reference the suites compare against (budget 1.0 is DynamicCache: test_exactness.py)"),
    "streamingllm": Shared({"n_sink": 2}),
    "h2o": Shared(),
    "snapkv": Shared({"window": 4, "kernel": 3}),
    "pyramidkv": Shared({"window": 4, "kernel": 3}),
    "adakv": Shared({"window": 4, "kernel": 3}),
    "lookm": Exempt("merges evicted entries into kept ones, so it is not an eviction of the full cache "
                    "(test_lookm.py)"),
    "madakv": Shared({"window": 4, "n_sink": 2, "phi_min": 1}),
    "hae": Shared({"recent": 4, "n_sink": 2, "bin_size": 2}),
    # tau > 1: the states absorb nothing, so RetentiveKV must be exactly its eviction (with states: test_retentivekv.py)
    # (states_in_budget=False: the entry budget is exactly k, as the shared suites expect)
    "retentivekv": Shared({"window": 4, "n_sink": 2, "tau": 2.0, "states_in_budget": False}),
    "sphericalkv": Exempt("stores keys quantized, so it is not an eviction of the full cache (test_spherical.py)"),
    "kvzip": Exempt("compresses in a context pass after the prefill (test_query_agnostic.py)"),
    "expected_attention": Shared({"n_sink": 2, "n_future": 32}),
    "knorm": Shared(),
}

#: The methods of the shared suites, in registry order.
EVICTING = [name for name in REGISTRY if isinstance(METHOD_TESTS.get(name), Shared)]
#: Method name -> its test parameters.
SMALL = {name: dict(entry.params) for name, entry in METHOD_TESTS.items()}


def undeclared_extras(cache) -> set[str]:
    """Names of per-entry extras the cache's stores hold that the method does not declare in ``extras`` (the cache's
    own decode_budget score excepted): a method must declare every extra it keeps."""
    declared = {extra.name for extra in cache.method.extras} | {DECODE_ATTENTION.name}
    held = {name for layer in cache.managed_layers for store in layer.heads or [] for name in store.extras}
    return held - declared

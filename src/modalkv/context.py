"""Compress a context once, before any question, and answer many questions from it.

::

    cache = KVCache(model, "kvzip", 0.25)
    modalkv.prefill(model, cache, context_ids, tokenizer=tok)         # forward + the method's own scoring passes
    for question_ids in questions:                                      # each: the context's ids + a question
        ids = torch.cat([context_ids, question_ids], 1)
        out = model.generate(input_ids=ids, **cache_kwargs(model, cache.fork()), max_new_tokens=32)

``generate`` feeds only the tokens the cache has not seen (the question). A generation appends to the cache it is
given, so each question gets a :meth:`~modalkv.cache.KVCache.fork` (a copy of the compressed context: only the kept
bytes are copied) and the context stays as it was. For a chat, :func:`prefill` again with the whole history on the
answered cache: the new turn is added and, for methods with a context pass, the history is compressed again.
"""

from __future__ import annotations

import torch

from .cache import KVCache, cache_kwargs
from .modality import detect_modality, special_token_modalities


def _max_positions(model) -> int | None:
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)


@torch.no_grad()
def prefill(model, cache: KVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
            tokenizer=None, select: bool = True, **model_kwargs):
    """Run a context through ``model`` into ``cache`` and finish its compression; returns the model's output.

    For ordinary methods this is one forward with the cache (the method compresses each layer as it goes). Methods
    that score the context with passes of their own (KVzip's reconstruction) run them afterwards; they may need the
    ``tokenizer``. Vision inputs (``pixel_values``, ...) go in ``model_kwargs``; modality ids are detected from the
    config's image token ids when the cache has none.

    A cache that already holds tokens takes only the new ones (``input_ids`` must then be the whole sequence:
    what the cache holds, then the new turn); methods with a context pass then compress the whole history again.

    ``select=False`` (methods with a context pass only) scores the context without evicting anything; then
    ``cache.method.select(c)`` keeps the best entries of ``c`` — e.g. of several ``cache.fork()`` copies given
    different budgets (``c.budget = Budget(0.1)``), since the scores do not depend on the budget.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"prefill needs a modalkv KVCache, got {type(cache).__name__}")
    if cache.model_ref() is not model:
        raise ValueError("this KVCache was built for another model; build one with KVCache(model, ...)")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got shape {tuple(input_ids.shape)}")
    limit = _max_positions(model)
    if limit is not None and input_ids.shape[1] > limit:
        raise ValueError(f"the context has {input_ids.shape[1]} tokens, more than the model's "
                         f"{limit}-position window")
    seen = cache.get_seq_length()
    if seen:
        held = getattr(cache, "context_ids", None)
        # the context it was given must come first (tokens it generated since are not recorded, so only that part
        # is compared)
        if held is None or input_ids.shape[1] <= seen or not torch.equal(input_ids[:, : held.shape[1]].cpu(), held):
            raise ValueError(
                f"this cache already holds another context ({seen} tokens): pass the whole sequence it holds followed "
                "by the new tokens, or use cache.reset() (or a new cache) for a new context"
            )
    if seen == 0 and special_token_modalities(model.config) and cache._modality is None:
        cache.set_modality(detect_modality(model.config, input_ids, model_kwargs.get("mm_token_type_ids"),
                                           model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw")))
    new = input_ids[:, seen:]
    kwargs = dict(model_kwargs)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        if seen == 0 and "position_ids" not in kwargs and not special_token_modalities(model.config):
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    elif seen:
        kwargs["position_ids"] = torch.arange(seen, input_ids.shape[1], device=input_ids.device)[None].expand(
            input_ids.shape[0], -1)
    out = model(input_ids=new, **kwargs, **cache_kwargs(model, cache))
    if not select and not cache.method.needs_context_pass:
        raise ValueError(f"select=False needs a method that scores the context in a pass of its own (kvzip); "
                         f"{cache.method.name} compresses during the forward")
    if cache.method.needs_context_pass:
        cache.method.finish_prefill(cache, model, input_ids, tokenizer=tokenizer, select=select, **model_kwargs)
    cache.context_ids = input_ids.detach().cpu().clone()
    return out

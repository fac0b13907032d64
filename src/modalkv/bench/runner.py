"""The benchmark runner: accuracy, memory and speed of every method on the same prompts, in one run.

A *cell* is (model, method, budget, task, length, seed). For one (model, task, length, seed) the prompt is prefilled
once (:mod:`modalkv.replay`: the prefill is exact, so every method's cache can be built from it) and each method and
budget then builds its cache and decodes greedily, timed step by step. The full cache is always one of the cells, so
every ratio is against the full cache on the same input in the same run.

Columns of a result row: the cell's keys; ``score`` (task metric in [0, 1]); ``output``; ``kv_full_bytes``,
``kv_kept_bytes`` (payload + metadata + per-sequence method state), ``kv_allocated_bytes``, ``compression``,
``kv_state_bytes`` (RetentiveKV's state memories, inside ``kv_kept_bytes``), ``kv_shared_bytes`` (model-level
constants such as Spherical KV's codebooks, not per sequence and not in ``kv_kept_bytes``); ``prefill_s`` (the shared forward
plus this method's compression); ``compress_s``; ``decode_ms`` (median step, first token excluded) and
``tokens_per_s``; ``rss_bytes`` (process RSS once the cell's cache is built) and ``peak_rss_bytes`` (process peak so
far); for the fidelity task ``kl`` and ``top1`` (mean KL(full || method) and top-1 agreement over a teacher-forced
continuation). Ratios to the full cache are added by :func:`add_ratios`.

Query-agnostic protocol (:mod:`modalkv.tasks.query_agnostic`): a ``deferred`` text sample (``<task>_after``) is cut
where its question starts; the part before is compressed alone and the question is then read through the compressed
cache in one forward (as ``generate`` on a ``cache.fork()`` does). Methods with a context pass (KVzip) run it after the
cache is built, as :func:`modalkv.prefill` does, and it counts as compression time; KVzip's reconstruction does not
depend on the budget, so it runs once per prompt and method label and each budget selects from a copy of the scored
cache (its seconds count in every budget's ``compress_s``). A multi-question sample is compressed once and each
question answered from its own ``cache.fork()`` (``output``: the answers joined by `` | ``; ``score``: their mean;
``decode_ms``: the median step over all answers). A chat sample adds each user turn with :func:`modalkv.prefill` on
the cache that answered the previous turn; ``compress_s`` is then turn 1's compression plus the whole time of the later
turns' ``prefill`` calls (their forward and, for KVzip, the new compression), ``output`` every answer.

The sweep's configuration, its cells and the results file they are appended to are in :mod:`modalkv.bench.sweep`.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from pathlib import Path

import psutil
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers.utils import logging as hf_logging

from .. import vlm
from ..cache import KVCache, cache_kwargs
from ..context import prefill
from ..data import wiki_summaries
from ..measure import peak_rss_bytes, pin_threads, reset_peak_rss, window_peak_rss_bytes
from ..methods import make_method, parse_label
from ..methods.kvzip import KVzip
from ..modality import TEXT
from ..models import load_model
from ..replay import capture_prefill
from ..storage import storage_names
from ..tasks import get_task
from .memo import ScoreMemo
from .ray_executor import run_with_ray
from .sweep import BenchConfig, append_rows, cell_key, done_keys, write_sidecar
from .sweep import COLUMNS, KEYS, add_ratios  # noqa: F401  (importable from here, as before)


class ModelRunner:
    """Runs all cells of one model (holds the weights once; a Ray actor wraps one of these)."""

    def __init__(self, model_name: str, threads: int):
        hf_logging.disable_progress_bar()
        pin_threads(threads)
        self.name = model_name
        self.model, tok = load_model(model_name)
        # a vision-language model comes with its processor (tokenizer + image processor)
        self.processor = tok if hasattr(tok, "image_processor") else None
        self.tok = tok.tokenizer if self.processor is not None else tok
        self._scored: dict = {}  # (method label, quantize) -> (KVzip cache scored but not selected, seconds)
        self.memo = ScoreMemo()  # accumulated scores computed once per captured prompt, whatever the budget

    def chat_ids(self, text: str) -> torch.Tensor:
        tok = self.tok
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False).input_ids

    def render(self, messages: list[dict]) -> str:
        """The chat text of ``messages`` with the generation prompt (``User:``/``Assistant:`` lines without a
        chat template)."""
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"

    def text_inputs(self, sample, question: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids compressed at prefill, ids read through the compressed cache) of a text sample: a deferred one is
        cut where its question (or ``question``) starts, so the question and the end of the chat template come
        after compression; otherwise the whole prompt is compressed."""
        question = sample.question if question is None else question
        text = f"{sample.context}\n\n{question}"  # as chat_ids: the chat template when the tokenizer has one
        if getattr(self.tok, "chat_template", None):
            text = self.render([{"role": "user", "content": text}])
        cut = text.rindex(question) if sample.deferred else len(text)
        head = self.tok(text[:cut], return_tensors="pt", add_special_tokens=False).input_ids
        tail = self.tok(text[cut:], add_special_tokens=False).input_ids if cut < len(text) else []
        return head, torch.tensor([tail], dtype=torch.long)

    def mm_inputs(self, sample) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(ids compressed at prefill, ids read through the compressed cache, pixel inputs) of a multimodal sample
        for modalkv's VLM; the second part is the question of a deferred sample, else empty."""
        tpi = self.model.config.image_seq_length
        text = vlm.chat_text(sample.prompt)
        cut = text.index(sample.context) + len(sample.context) if sample.deferred else len(text)
        head = vlm.expand_ids(self.tok, text[:cut], tpi)
        tail = self.tok(text[cut:], add_special_tokens=False).input_ids if cut < len(text) else []
        pixels = vlm.load_images(sample.images, self.processor).to(self.model.dtype)
        return torch.tensor([head]), torch.tensor([tail], dtype=torch.long), {"pixel_values": pixels}

    def run_group(self, cells: list[dict], quantize=None) -> list[dict]:
        """The rows of one group's cells (one prompt, every method and budget)."""
        with self.memo.active():
            return self._run_group(cells, quantize)

    def _run_group(self, cells: list[dict], quantize=None) -> list[dict]:
        task_name = cells[0]["task"]
        if task_name == "fidelity":
            return self._fidelity(cells, quantize)
        task = get_task(task_name)
        length, seed = cells[0]["length"], cells[0]["seed"]
        self._scored.clear()
        if getattr(task, "multimodal", False):
            if self.processor is None:
                raise ValueError(f"task {task_name!r} needs a vision-language model (modalkv-vlm); "
                                 f"{self.name!r} is text-only")
            sample = task.make(self.tok, length, seed, tokens_per_image=self.model.config.image_seq_length)
            ids, tail, extra = self.mm_inputs(sample)
        else:
            sample = task.make(self.tok, length, seed)
            if getattr(sample, "turns", None):
                return self._chat(cells, task, sample, quantize)
            if getattr(sample, "questions", None):
                return self._many(cells, task, sample, quantize)
            if sample.deferred:
                ids, tail = self.text_inputs(sample)
            else:
                ids, tail = self.chat_ids(sample.prompt), torch.zeros(1, 0, dtype=torch.long)
            extra = {}
        rows = []
        cap, forward_s = self._capture(ids, **extra)
        for cell in cells:
            cache, compress_s, own_logits = self._build(cap, cell, quantize, ids, extra)
            last = cap.logits[0, -1] if own_logits is None else own_logits
            if not tail.shape[1]:
                first = last
            elif extra:  # a deferred multimodal question: token by token, as published for vqa_deferred
                first = self._read(cache, tail, ids.shape[1])
            else:
                first = self._ask(cache, tail, ids.shape[1])
            n = ids.shape[1] + tail.shape[1]
            tokens, step_ms = self._greedy(cache, first, n, sample.max_new_tokens)
            output = self.tok.decode(tokens, skip_special_tokens=True)
            rows.append(self._row(cell, cache, forward_s if own_logits is None else 0.0, compress_s, step_ms, n,
                                  score=task.score(output, sample), output=output.strip()))
            del cache
        self._scored.clear()
        return rows

    @torch.no_grad()
    def _ask(self, cache, tail: torch.Tensor, start: int) -> torch.Tensor:
        """Feed ``tail`` (a question asked after compression) through the compressed cache in one forward, as
        ``generate`` does with the tokens a cache has not seen; returns the logits of its last token."""
        pos = torch.arange(start, start + tail.shape[1])[None]
        return self.model(input_ids=tail, position_ids=pos, **cache_kwargs(self.model, cache)).logits[0, -1]

    def _many(self, cells, task, sample, quantize) -> list[dict]:
        """One compressed context, every question answered from its own fork of it."""
        ids = self.text_inputs(sample, sample.questions[0])[0]
        tails = []
        for q in sample.questions:
            head, tail = self.text_inputs(sample, q)
            if not torch.equal(head, ids):
                raise ValueError(f"{task.name}: the context's ids depend on the question; the cut must be before it")
            tails.append(tail)
        cap, forward_s = self._capture(ids)
        rows = []
        for cell in cells:
            cache, compress_s, _ = self._build(cap, cell, quantize, ids, {})
            outputs, steps = [], []
            for tail in tails:
                fork = cache.fork()
                first = self._ask(fork, tail, ids.shape[1])
                tokens, step_ms = self._greedy(fork, first, ids.shape[1] + tail.shape[1], sample.max_new_tokens)
                outputs.append(self.tok.decode(tokens, skip_special_tokens=True).strip())
                steps += step_ms[1:]  # each answer's first step excluded, as for one answer
                del fork
            row = self._row(cell, cache, forward_s, compress_s, [float("nan")] + steps, ids.shape[1],
                            score=task.score(outputs, sample), output=" | ".join(outputs))
            rows.append(dict(row, decode_steps=len(steps) + len(tails)))
            del cache
        self._scored.clear()
        return rows

    def _next_turn(self, messages: list[dict], reply: str, user: str) -> str:
        """The chat text that follows ``reply`` (the last assistant answer) when ``user`` speaks next."""
        before = self.render(messages)
        after = self.render(messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": user}])
        if not after.startswith(before + reply):
            raise ValueError("the chat template rewrites earlier turns (it does not extend the previous text), so a "
                             "compressed history cannot be continued turn by turn")
        return after[len(before) + len(reply):]

    def _chat(self, cells, task, sample, quantize) -> list[dict]:
        """A chat: turn 1 compressed from the shared prefill, each later turn added with modalkv.prefill on the cache
        that answered the previous one; the last answer is scored."""
        messages = [{"role": "user", "content": sample.turns[0]}]
        ids = self.tok(self.render(messages), return_tensors="pt", add_special_tokens=False).input_ids
        cap, forward_s = self._capture(ids)
        rows = []
        for cell in cells:
            cache, compress_s, _ = self._build(cap, cell, quantize, ids, {})
            history, logits, msgs, outputs, steps = ids, cap.logits[0, -1], list(messages), [], []
            for t, user in enumerate(sample.turns):
                if t:
                    nxt = self._next_turn(msgs, outputs[-1], user)
                    msgs += [{"role": "assistant", "content": outputs[-1]}, {"role": "user", "content": user}]
                    history = torch.cat([history, self.tok(nxt, return_tensors="pt", add_special_tokens=False)
                                         .input_ids], 1)
                    # the ids this cache has seen: decoding does not record them (modalkv.prefill checks them)
                    cache.context_ids = history[:, : cache.get_seq_length()].clone()
                    t0 = time.perf_counter()
                    logits = prefill(self.model, cache, history, tokenizer=self.tok).logits[0, -1]
                    compress_s += time.perf_counter() - t0
                last = t == len(sample.turns) - 1
                tokens, step_ms = self._greedy(cache, logits, history.shape[1],
                                               sample.max_new_tokens if last else sample.turn_tokens)
                outputs.append(self.tok.decode(tokens, skip_special_tokens=True))
                history = torch.cat([history, torch.tensor([tokens], dtype=torch.long)], 1)
                steps += step_ms[1:]
            row = self._row(cell, cache, forward_s, compress_s, [float("nan")] + steps, history.shape[1],
                            score=task.score(outputs[-1], sample), output=" | ".join(o.strip() for o in outputs))
            rows.append(dict(row, decode_steps=len(steps) + len(outputs)))
            del cache
        self._scored.clear()
        return rows

    @torch.no_grad()
    def _read(self, cache, tail: torch.Tensor, start: int) -> torch.Tensor:
        """Feed ``tail`` (a deferred question) through the compressed cache one token at a time, as decoding does;
        returns the logits of the last one."""
        kw = cache_kwargs(self.model, cache)
        for i in range(tail.shape[1]):
            out = self.model(input_ids=tail[:, i: i + 1], position_ids=torch.tensor([[start + i]]), **kw)
        return out.logits[0, -1]

    # -- pieces ---------------------------------------------------------------------------------------------
    def _capture(self, ids, **model_kwargs):
        gc.collect()
        t0 = time.perf_counter()
        cap = capture_prefill(self.model, ids, **model_kwargs)
        return cap, time.perf_counter() - t0

    def _build(self, cap, cell, quantize, ids=None, extra=None):
        """(cache, seconds, logits): the cell's cache built from the captured prefill, or, for a method whose prompt
        forward differs (HAE's pruning of visual tokens in later layers), from a prefill of its own — then the
        seconds are that whole prefill and the logits its last position's (else None)."""
        name, params, caps = parse_label(cell["method"])
        if name in storage_names():  # KIVI as a baseline of its own: the full cache in quantized storage
            name, quantize = "full", name
        method = make_method(name, **params)
        budget = _budget(cell["budget"])
        own = (ids is not None and not method.replayable and cap.modality is not None
               and bool((cap.modality != TEXT).any()))
        gc.collect()
        reset_peak_rss()  # the cell's peak RSS: building its cache and decoding (the shared prefill is resident)
        t0 = time.perf_counter()
        if own:
            cache = KVCache(self.model, method, budget, quantize=quantize, modality_caps=caps)
            cache._modality, cache.layout = cap.modality, cap.layout
            with torch.no_grad():
                out = self.model(input_ids=ids, **(extra or {}), **cache_kwargs(self.model, cache))
            return cache, time.perf_counter() - t0, out.logits[0, -1]
        cache = cap.build_cache(self.model, method, budget, quantize=quantize, modality_caps=caps)
        seconds = time.perf_counter() - t0
        if method.needs_context_pass:
            if ids is None:
                raise ValueError(f"{name} compresses in a pass over the context: the runner must pass its ids")
            cache, pass_s = self._context_pass(cache, cell, quantize, ids, extra or {})
            seconds += pass_s
        return cache, seconds, None

    def _context_pass(self, cache, cell, quantize, ids, extra):
        """(cache, seconds): what modalkv.prefill does after the forward for a method with a context pass.

        KVzip's reconstruction scores do not depend on the budget: they are computed once per prompt and method label
        on a copy whose selection is skipped; each budget then selects from its own copy of that scored cache (the
        same cache as a prefill at that budget, tested), and the scoring seconds count in every budget's time."""
        method = cache.method
        if not isinstance(method, KVzip):
            t0 = time.perf_counter()
            method.finish_prefill(cache, self.model, ids, tokenizer=self.tok, **extra)
            cache.context_ids = ids.detach().cpu().clone()
            return cache, time.perf_counter() - t0
        key = (cell["method"], quantize)
        if key not in self._scored:
            scored = cache.fork()
            t0 = time.perf_counter()  # score only: every budget selects from a copy
            scored.method.finish_prefill(scored, self.model, ids, tokenizer=self.tok, select=False, **extra)
            self._scored[key] = (scored, time.perf_counter() - t0)
        scored, score_s = self._scored[key]
        t0 = time.perf_counter()
        out = scored.fork()
        out.budget = cache.budget
        out.method.select(out)
        out.context_ids = ids.detach().cpu().clone()
        return out, score_s + time.perf_counter() - t0

    @torch.no_grad()
    def _greedy(self, cache, first_logits, start: int, max_new: int):
        eos = self.tok.eos_token_id
        kw = cache_kwargs(self.model, cache)
        tokens, step_ms = [], []
        nxt = first_logits.argmax(-1).view(1, 1)
        for i in range(max_new):
            if int(nxt) == eos:
                break
            tokens.append(int(nxt))
            if i == max_new - 1:
                break
            t0 = time.perf_counter()
            out = self.model(input_ids=nxt, position_ids=torch.tensor([[start + i]]), **kw)
            nxt = out.logits[:, -1].argmax(-1).view(1, 1)
            step_ms.append((time.perf_counter() - t0) * 1e3)
        return tokens, step_ms

    def _row(self, cell, cache, forward_s, compress_s, step_ms, n_prompt, **extra) -> dict:
        mem = cache.memory_report()
        decode_ms = statistics.median(step_ms[1:]) if len(step_ms) > 1 else (step_ms[0] if step_ms else float("nan"))
        return {
            **cell, "prompt_tokens": n_prompt, **extra,
            "kv_full_bytes": mem["full_bytes"], "kv_kept_bytes": mem["kept_bytes"],
            "kv_allocated_bytes": mem["allocated_bytes"], "compression": mem["compression_ratio"],
            "kv_state_bytes": mem.get("state_bytes", 0), "kv_shared_bytes": mem.get("shared_bytes", 0),
            "prefill_s": forward_s + compress_s, "compress_s": compress_s, "decode_ms": decode_ms,
            "tokens_per_s": 1e3 / decode_ms if decode_ms == decode_ms else float("nan"),
            "decode_steps": len(step_ms), "rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_bytes": peak_rss_bytes(), "cell_peak_rss_bytes": window_peak_rss_bytes(),
        }

    @torch.no_grad()
    def _fidelity(self, cells, quantize, continuation: int = 48) -> list[dict]:
        """KL(full || method) and top-1 agreement over a teacher-forced continuation of real text."""
        length, seed = cells[0]["length"], cells[0]["seed"]
        texts = wiki_summaries()
        titles = sorted(texts)
        random.Random(f"fidelity-{seed}").shuffle(titles)
        ids: list[int] = []
        for t in titles:
            ids += self.tok(texts[t] + "\n\n", add_special_tokens=False).input_ids
            if len(ids) >= length + continuation:
                break
        prompt = torch.tensor([ids[:length]])
        cont = ids[length: length + continuation]
        cap, forward_s = self._capture(prompt)
        reference = None
        rows = []
        self._scored.clear()
        for cell in cells:  # the full cache comes first
            cache, compress_s, _ = self._build(cap, cell, quantize, prompt)
            logps, step_ms = [torch.log_softmax(cap.logits[0, -1].float(), -1)], []
            kw = cache_kwargs(self.model, cache)
            for i, t in enumerate(cont[:-1]):
                t0 = time.perf_counter()
                out = self.model(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[length + i]]), **kw)
                step_ms.append((time.perf_counter() - t0) * 1e3)
                logps.append(torch.log_softmax(out.logits[0, -1].float(), -1))
            logp = torch.stack(logps)
            if reference is None:
                reference = logp
            kl = (reference.exp() * (reference - logp)).sum(-1)
            top1 = (reference.argmax(-1) == logp.argmax(-1)).float()
            rows.append(self._row(cell, cache, forward_s, compress_s, step_ms, length,
                                  score=float(top1.mean()), kl=float(kl.mean()), top1=float(top1.mean()),
                                  output=""))
            del cache
        self._scored.clear()
        return rows


def _budget(b: float):
    return 1.0 if float(b) == 1.0 else float(b)


def run_bench(config: BenchConfig, progress: bool = True) -> Path:
    """Run every cell not already in ``config.out``; returns the results path."""
    out = Path(config.out)
    done = done_keys(out)
    todo = []
    for group in config.groups():
        cells = [c for c in config.cells(*group) if cell_key(c) not in done]
        if cells and cells[0]["method"] != "full":  # ratios need the full cache of the same run
            cells = [dict(next(config.cells(*group)), _skip=True)] + cells  # reference only, not written again
        if cells:
            todo.append(cells)
    write_sidecar(out, config)
    if not todo:
        return out
    if config.executor == "ray":
        run_with_ray(config, todo, out, ModelRunner, append_rows, progress)
        return out
    runners: dict[str, ModelRunner] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress) as bar:
        job = bar.add_task("cells", total=sum(len(c) for c in todo))
        for cells in todo:
            model = cells[0]["model"]
            if model not in runners:
                runners.clear()
                runners[model] = ModelRunner(model, config.threads)
            bar.update(job, description=f"{model} {cells[0]['task']} L={cells[0]['length']} seed={cells[0]['seed']}")
            rows = runners[model].run_group(cells, config.quantize)
            append_rows(out, [r for r in rows if not r.get("_skip")])
            bar.update(job, advance=len(cells))
    return out

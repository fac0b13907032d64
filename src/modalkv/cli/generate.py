"""``modalkv generate``: generate with compressed caches on one prompt and compare each cache's answer, memory and
decode speed with the full cache's (the display is in :mod:`modalkv.cli.comparison`)."""

from __future__ import annotations

import dataclasses
import inspect
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
import typer
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

from .. import saved, vlm
from ..budget import parse_caps
from ..cache import KVCache, cache_kwargs
from ..context import prefill
from ..data import DEMO_QUESTION, demo_prompt
from ..measure import cache_bytes, greedy_generate, peak_rss_bytes, pin_threads
from ..methods import REGISTRY, parse_label
from ..modality import detect_modality
from ..models import load_model
from ..storage import storage_names
from ..tasks.multimodal import image_prompt
from .common import console, fail, fmt_bytes, parse_budget, parse_params
from .comparison import agreement, plot_comparison, results_table, verdict


DEFAULT_PROMPT = (
    "The museum opened in 1887 and its first curator, Ada Lindqvist, catalogued 4,310 objects. "
    "Question: who was the museum's first curator, and how many objects did she catalogue?"
)


# The comparison `generate` runs when no method is given, chosen by measuring on the demo prompt (SmolLM2-135M, the
# 2.3k-token Wikipedia document): the digits of the answer (8,848.86) survive PyramidKV at 0.75, KIVI-4 and the two
# together (5.6x less KV); SnapKV, Ada-KV, PyramidKV, H2O and StreamingLLM at 0.25 and 0.5 change a digit.
DEFAULT_RUNS = (("snapkv", 0.25), ("pyramidkv", 0.75), ("kivi-4", 1.0), ("pyramidkv+kivi-4", 0.75))


@dataclasses.dataclass
class _Run:
    """One cache of the comparison: what it is, and what it produced."""

    label: str
    method: str  # the method label (colour in --plot); "full" for the reference
    cache: object
    tokens: list = dataclasses.field(default_factory=list)
    prefill_s: float = float("nan")
    step_ms: list = dataclasses.field(default_factory=list)
    done: bool = False
    memory: dict = dataclasses.field(default_factory=dict)

    @property
    def decode_ms(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else float("nan")


def generate(
    model: str = typer.Option("smollm2-135m", help="Registry name (smollm2-135m, gemma3-270m, modalkv-vlm[@N]) or a "
                                                   "local folder."),
    method: list[str] = typer.Option([], "--method", help="Compression method (see `modalkv methods`; repeatable). "
                                                          "Without any: SnapKV 0.25, PyramidKV 0.75, KIVI-4 and "
                                                          "PyramidKV 0.75 + KIVI-4 side by side."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods compared on one prompt, "
                                                                  "e.g. snapkv,h2o,kivi-4,adakv+kivi-4 (labels as in "
                                                                  "`modalkv bench`: snapkv(window=16) works)."),
    budget: Optional[str] = typer.Option(None, help="Ratio of the prompt in (0, 1] or an absolute token count; "
                                                    "comma-separated budgets run every method at each "
                                                    "(default 0.25 with --method)."),
    prompt: Optional[str] = typer.Option(None, help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Read the prompt from a file."),
    max_new_tokens: int = typer.Option(48, min=1, help="Tokens to generate."),
    compare_full: bool = typer.Option(False, "--compare-full", help="Also run the full cache (transformers' "
                                                                     "DynamicCache) and compare with it."),
    expect: Optional[str] = typer.Option(None, help="Text the answer should contain (the demo prompt sets it)."),
    quantize: Optional[str] = typer.Option(None, help="Quantized storage: kivi-2, kivi-4 or kivi-8."),
    param: list[str] = typer.Option([], "--param", "-p", help="Method parameter KEY=VALUE (repeatable)."),
    threads: int = typer.Option(0, help="Pin torch to this many threads (0: torch's default)."),
    chat: bool = typer.Option(True, help="Wrap the prompt in the model's chat template."),
    image: list[Path] = typer.Option([], "--image", help="An image for a vision-language model (repeatable; with "
                                                         "--model modalkv-vlm). The prompt follows the images."),
    modality_caps: Optional[str] = typer.Option(None, help="Per-modality caps, e.g. image=0.1,text=0.5 (ratios of "
                                                           "each modality's prompt tokens)."),
    plot: Optional[Path] = typer.Option(None, help="Write the comparison as a PNG: KV bytes kept against decode "
                                                   "ms/token, answers that agree with the full cache marked."),
    save_cache: Optional[Path] = typer.Option(None, help="Save the method's compressed prompt cache to this file "
                                                         "(one method), to answer later prompts that start with "
                                                         "this one (--load-cache)."),
    load_cache: Optional[Path] = typer.Option(None, help="Answer a prompt whose first tokens are the prompt of a "
                                                         "cache saved with --save-cache: only the new tokens are "
                                                         "run through the model."),
) -> None:
    """Generate with compressed caches; print each one's answer beside its memory and speed (and the full cache's)."""
    try:
        _generate(model, [*method, *(methods.split(",") if methods else [])], budget, prompt, prompt_file,
                  max_new_tokens, compare_full, quantize, param, threads, chat, image, modality_caps, expect, plot,
                  save_cache, load_cache)
    except (ValueError, TypeError, ImportError, FloatingPointError) as err:
        fail(str(err))


def _check_images(paths) -> None:
    """Every image exists and decodes completely (a truncated PNG fails here, not in the middle of a run)."""
    from PIL import Image

    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"image {str(path)!r} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"image {str(path)!r} is not a readable image file ({err})") from None


def _prompt_text(prompt, prompt_file, images) -> tuple[str, str | None]:
    """(prompt text, the answer it should contain or None); the demo document when no prompt is given."""
    if prompt is not None and prompt_file is not None:
        raise ValueError("give either --prompt or --prompt-file, not both")
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt is empty: give the text to answer, or leave --prompt out for the demo document")
    if prompt_file is not None:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {str(prompt_file)!r} is not UTF-8 text") from None
        if not text.strip():
            raise ValueError(f"prompt file {str(prompt_file)!r} is empty")
        return text, None
    if prompt is not None:
        return prompt, None
    if images:
        return ("what shape is in the image?" if len(images) == 1 else "Describe each image."), None
    try:
        return demo_prompt()
    except ImportError as err:
        console.print(f"[yellow]{err}; using a short built-in prompt[/yellow]")
        return DEFAULT_PROMPT, "Ada Lindqvist"


def _run_specs(labels, budget, quantize) -> list[tuple[str, str, float | int, str | None]]:
    """(display label, method label, budget, quantizer) per compressed cache. ``kivi-N`` alone is the full cache in
    KIVI storage; ``method+kivi-N`` stores that method's kept entries KIVI-quantized (as --quantize does for all)."""
    labels = [x.strip() for x in labels if x.strip()]
    budgets = [parse_budget(b) for b in budget.split(",") if b.strip()] if budget else None
    if budget is not None and not budgets:
        raise ValueError("--budget is empty")
    if labels:
        pairs = [(label, b) for b in budgets or [0.25] for label in labels]
    elif budgets:
        pairs = [(label, b) for b in budgets for label in dict.fromkeys(m for m, _ in DEFAULT_RUNS)]
    else:
        pairs = list(DEFAULT_RUNS)
    specs, seen = [], set()
    for label, b in pairs:
        head, plus, tail = label.rpartition("+")
        label, q = (head.strip(), tail.strip()) if plus and tail.strip() in storage_names() else (label, quantize)
        if plus and q != quantize and quantize:
            raise ValueError(f"{label}+{q} is already quantized storage; leave out --quantize {quantize}")
        name = parse_label(label)[0]
        if name in storage_names():
            if q:
                raise ValueError(f"{label} is already quantized storage; leave out --quantize {q}")
            spec = (f"{name} (every token)", "full", 1.0, name)
        else:
            spec = (f"{label} @ {b:g}" + (f" + {q}" if q else ""), label, b, q)
        if spec[0] not in seen:
            seen.add(spec[0])
            specs.append(spec)
    return specs


def _make_cache(lm, label, budget, quantize, caps, params):
    name, label_params, label_caps = parse_label(label)
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(REGISTRY)} (or quantized full storage: "
                         f"{', '.join(storage_names())})")
    return KVCache(lm, name, budget, quantize=quantize, modality_caps={**caps, **label_caps},
                   **{**params, **label_params})


def _generate(model, labels, budget, prompt, prompt_file, max_new_tokens, compare_full, quantize, param, threads,
              chat, images=(), modality_caps=None, expect=None, plot=None, save_cache=None, load_cache=None) -> None:
    _check_images(images)
    text, expected = _prompt_text(prompt, prompt_file, images)
    expected = expect if expect is not None else expected
    if expected is not None and not expected.strip():
        raise ValueError("--expect is empty")
    caps = parse_caps(modality_caps or "")
    specs = _run_specs(labels, budget, quantize)
    params = parse_params(param)
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise ValueError(f"--plot {str(plot)!r}: give a .png path")
    if save_cache is not None and len(specs) != 1:
        raise ValueError(f"--save-cache saves one method's cache: give one --method (this run has {len(specs)} "
                         "compressed caches)")
    if load_cache is not None:
        if not Path(load_cache).is_file():
            raise ValueError(f"--load-cache {str(load_cache)!r} does not exist")
        if len(labels) > 1 or budget is not None or quantize or param or modality_caps or images:
            raise ValueError("--load-cache takes the method, budget and parameters from the file: give at most one "
                             "--method (checked against the file) and no --budget/--quantize/--param/"
                             "--modality-caps/--image")
    n_threads = pin_threads(threads or None)

    hf_logging.disable_progress_bar()
    with console.status(f"loading {model}"):
        lm, tok = load_model(model)
    if load_cache is not None:
        cache = saved.load_cache(load_cache, lm, method=parse_label(labels[0])[0] if labels else None)
        shown = f"{cache.method.name} @ {cache.budget.value:g} (loaded: {cache.get_seq_length()} tokens)"
        runs = [_Run(shown, cache.method.name, cache)]
    else:
        runs = [_Run(shown, q if label == "full" and q else label, _make_cache(lm, label, b, q, caps, params))
                for shown, label, b, q in specs]  # every method and budget is checked before the first prefill
    processor, extra = (tok if hasattr(tok, "image_processor") else None), {}
    if images and processor is None:
        raise ValueError(f"--image needs a vision-language model (--model modalkv-vlm); {model!r} is text-only")
    if processor is not None:  # modalkv's VLM: its chat format, images first, then the prompt
        tok = processor.tokenizer
        ids = torch.tensor([vlm.expand_ids(tok, vlm.chat_text(image_prompt(len(images), text)),
                                           lm.config.image_seq_length)])
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if images:
            extra = {"pixel_values": vlm.load_images(list(images), processor)}
        layout = detect_modality(lm.config, ids)
        for run in runs:
            if run.cache.get_seq_length() == 0:
                run.cache.set_modality(layout)
    else:
        question = text
        if chat and getattr(tok, "chat_template", None):
            question = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
        enc = tok(question, return_tensors="pt", add_special_tokens=not chat)
    eos = [t for t in {tok.eos_token_id, getattr(lm.generation_config, "eos_token_id", None)} if t is not None]
    eos = {int(e) for x in eos for e in (x if isinstance(x, (list, tuple)) else [x])}
    full = None
    if compare_full:
        full = _Run("full (DynamicCache)", "full", DynamicCache(config=lm.config.get_text_config(decoder=True)))
        runs.insert(0, full)

    if "logits_to_keep" in inspect.signature(lm.forward).parameters:
        extra["logits_to_keep"] = 1  # the prompt's last logits only (not 2k x 49k floats per prefill)
    for run in runs:  # prefill one cache after the other (each timed alone); the first token comes from it
        with console.status(f"prefill with {run.label}"):
            _prefill(lm, run, enc, eos, extra, tok)
        if save_cache is not None and run is not full:  # the compressed prompt, before the answer is appended
            saved.save_cache(run.cache, save_cache)
    with console.status(f"decoding with {len(runs)} cache(s), one step of each in turn"):
        _decode_interleaved(lm, runs, enc["input_ids"].shape[1], max_new_tokens, eos)
    for run in runs:
        run.memory = cache_bytes(run.cache)

    console.print(f"[bold]model[/bold] {model}  [bold]prompt[/bold] {enc['input_ids'].shape[1]} tokens  "
                  f"[bold]threads[/bold] {n_threads}")
    if prompt is None and prompt_file is None and not images:
        console.print(f"[bold]demo question:[/bold] {DEMO_QUESTION} [dim](about the first of the Wikipedia "
                      "articles in the prompt)[/dim]")
    agree = agreement(runs, full, expected, tok)
    console.print(results_table(runs, full, expected, agree, tok))
    console.print(verdict(runs, full, expected, agree))
    criterion = (f"it contains {expected!r}" if expected is not None else "the same tokens as the full cache's")
    console.print(f"[dim]Keeps answer: {criterion}; n/N tok: its first n tokens equal the full cache's N (yellow "
                  "from where it departs). KV kept counts metadata (positions, scales, a method's state); 'x less' = "
                  "full cache bytes / kept. Decode: median step time, first token excluded, the caches decoding one "
                  "step each in turn (machine load hits every row alike); below it the full cache's ms/token / this "
                  f"cache's, same run. Process peak RSS {fmt_bytes(peak_rss_bytes())}.[/dim]")
    if plot is not None:
        console.print(f"plot: {plot_comparison(runs, full, agree, Path(plot), model, enc['input_ids'].shape[1])}")
    if save_cache is not None:
        console.print(f"saved the compressed prompt of {runs[-1].label} ({enc['input_ids'].shape[1]} tokens, "
                      f"{fmt_bytes(Path(save_cache).stat().st_size)} file) to {save_cache}; answer a longer prompt "
                      f"that starts with this one with --load-cache {save_cache}")


def _prefill(lm, run, enc, eos, extra, tok) -> None:
    """Run the prompt into the run's cache (timed) and take the first generated token from its last logits. A
    modalkv cache goes through :func:`modalkv.prefill` (methods with a context pass run it, and the prefill time
    includes it); a cache that already holds the prompt's first tokens (--load-cache) takes only the rest."""
    if not isinstance(run.cache, KVCache):
        res = greedy_generate(lm, enc["input_ids"], enc["attention_mask"], run.cache, 1, eos, **extra)
        run.prefill_s, run.tokens, run.done = res.prefill_s, res.tokens[0], not res.tokens[0]
        return
    ids, seen = enc["input_ids"], run.cache.get_seq_length()
    if seen:
        held = run.cache.context_ids
        if held is None or ids.shape[1] <= seen or not torch.equal(ids[:, :seen], held):
            raise ValueError(f"the prompt ({ids.shape[1]} tokens) does not start with the {seen} tokens of the loaded "
                             "cache: give the saved prompt followed by the new text (and --no-chat if the first "
                             "tokens differ because of the chat template)")
    t0 = time.perf_counter()
    out = prefill(lm, run.cache, ids, None if seen else enc["attention_mask"], tokenizer=tok, **extra)
    run.prefill_s = time.perf_counter() - t0
    first = int(out.logits[0, -1].argmax())
    run.tokens, run.done = ([], True) if first in eos else ([first], False)


@torch.no_grad()
def _decode_interleaved(lm, runs, prompt_len: int, max_new_tokens: int, eos) -> None:
    """Greedy decoding of every run, one step of each in turn (the order rotating every step), each step timed."""
    kwargs = {id(run): cache_kwargs(lm, run.cache) for run in runs}
    for step in range(1, max_new_tokens):
        active = [run for run in runs if not run.done]
        if not active:
            break
        shift = step % len(active)
        for run in active[shift:] + active[:shift]:
            mask = torch.ones(1, prompt_len + step, dtype=torch.long)
            t0 = time.perf_counter()
            out = lm(input_ids=torch.tensor([[run.tokens[-1]]]), attention_mask=mask,
                     position_ids=torch.tensor([[prompt_len + step - 1]]), use_cache=True, **kwargs[id(run)])
            nxt = int(out.logits[0, -1].argmax())
            run.step_ms.append((time.perf_counter() - t0) * 1e3)
            if nxt in eos:
                run.done = True
            else:
                run.tokens.append(nxt)

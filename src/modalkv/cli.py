"""Command-line interface: ``modalkv methods`` and ``modalkv generate``."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import inspect
import statistics

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

from . import saved, vlm, vlm_train
from .budget import check_budget_value, parse_caps
from .cache import KVCache, cache_kwargs
from .context import prefill
from .data import DEMO_QUESTION, demo_prompt
from .measure import cache_bytes, greedy_generate, peak_rss_bytes, pin_threads
from .methods import REGISTRY, make_method, parse_label
from .modality import detect_modality
from .models import MODEL_REGISTRY, VLM_NAME, load_model
from .storage import storage_names
from .tasks import TASKS
from .tasks.multimodal import image_prompt, interleaved_examples

# Imported by the commands that use them: PIL (modalkv[vlm]) and matplotlib (modalkv[plot]), optional extras; the
# benchmark harness (it loads pandas, a second or so that every other command would pay) and the continual benchmark.

app = typer.Typer(add_completion=False, no_args_is_help=True, help="modalkv: KV-cache compression that frees memory.")
console = Console(width=max(120, Console().width))
err_console = Console(stderr=True)

DEFAULT_PROMPT = (
    "The museum opened in 1887 and its first curator, Ada Lindqvist, catalogued 4,310 objects. "
    "Question: who was the museum's first curator, and how many objects did she catalogue?"
)


def _parse_budget(text: str) -> float | int:
    """'0.25' -> 0.25 (ratio), '512' -> 512 (tokens)."""
    try:
        return int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise ValueError(f"budget must be a ratio in (0, 1] or a token count, got {text!r}") from None


def _parse_params(items: list[str]) -> dict:
    """KEY=VALUE pairs, values parsed as JSON when possible (so window=8 is an int, pooling=avg a string)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"method parameter {item!r} must look like KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


@app.command()
def methods() -> None:
    """List the available methods (and storage formats) with one line each."""
    table = Table(show_header=True, header_style="bold")
    table.add_column("method")
    table.add_column("parameters")
    table.add_column("what it does")
    for name, cls in REGISTRY.items():
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.init)
        table.add_row(name, params, cls.summary)
    console.print(table)
    console.print(f"Quantized storage (composes with any method, --quantize): {', '.join(storage_names())}")
    console.print("Continual adaptation (not a compression method): InduceKV, a fixed-size bank of induced KV "
                  "memories for a frozen model (modalkv.continual; benchmark: modalkv continual)")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


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


def _fail(message: str) -> None:
    """A bad input: one line on stderr, exit code 2, no traceback."""
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
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
        _fail(str(err))


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
    budgets = [_parse_budget(b) for b in budget.split(",") if b.strip()] if budget else None
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
    params = _parse_params(param)
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
    agree = _agreement(runs, full, expected, tok)
    console.print(_table(runs, full, expected, agree, tok))
    console.print(_verdict(runs, full, expected, agree))
    criterion = (f"it contains {expected!r}" if expected is not None else "the same tokens as the full cache's")
    console.print(f"[dim]Keeps answer: {criterion}; n/N tok: its first n tokens equal the full cache's N (yellow "
                  "from where it departs). KV kept counts metadata (positions, scales, a method's state); 'x less' = "
                  "full cache bytes / kept. Decode: median step time, first token excluded, the caches decoding one "
                  "step each in turn (machine load hits every row alike); below it the full cache's ms/token / this "
                  f"cache's, same run. Process peak RSS {_fmt_bytes(peak_rss_bytes())}.[/dim]")
    if plot is not None:
        console.print(f"plot: {_plot_comparison(runs, full, agree, Path(plot), model, enc['input_ids'].shape[1])}")
    if save_cache is not None:
        console.print(f"saved the compressed prompt of {runs[-1].label} ({enc['input_ids'].shape[1]} tokens, "
                      f"{_fmt_bytes(Path(save_cache).stat().st_size)} file) to {save_cache}; answer a longer prompt "
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


def _agreement(runs, full, expected, tok) -> dict:
    """Per run: (leading tokens equal to the full cache's, the full answer's length or None, answer kept or None).
    The answer is kept when it contains ``expected`` if given, else when it equals the full cache's answer."""
    out = {}
    for run in runs:
        same = n = None
        if full is not None:
            n = len(full.tokens)
            same = next((i for i, (a, b) in enumerate(zip(run.tokens, full.tokens)) if a != b),
                        min(len(run.tokens), n))
        if expected is not None:
            kept = expected.strip().lower() in tok.decode(run.tokens, skip_special_tokens=True).lower()
        elif full is not None:
            kept = run.tokens == full.tokens
        else:
            kept = None
        out[run.label] = (same, n, kept)
    return out


def _table(runs, full, expected, agree, tok):
    """One row per cache: its answer (yellow from where it departs from the full cache's), whether it keeps the
    answer, KV bytes kept and compression, prefill seconds, decode ms/token and its ratio to the full cache's."""
    table = Table(show_header=True, header_style="bold", show_lines=True)
    table.add_column("cache", max_width=22)
    table.add_column("answer", ratio=1)
    if full is not None or expected is not None:
        table.add_column("keeps\nanswer", no_wrap=True)
    table.add_column("KV kept", justify="right", no_wrap=True)
    table.add_column("prefill s", justify="right", no_wrap=True)
    table.add_column("decode\nms/token", justify="right", no_wrap=True)
    for run in runs:
        same, n, kept = agree[run.label]
        answer = Text(tok.decode(run.tokens[:same] if same is not None else run.tokens, skip_special_tokens=True))
        if same is not None and same < len(run.tokens):
            answer.append(tok.decode(run.tokens[same:], skip_special_tokens=True), style="yellow")
        row = [run.label, answer]
        if full is not None or expected is not None:
            verdict = "" if kept is None else ("yes" if kept else "[red]no[/red]")
            tokens = "" if run is full or same is None else f"{same}/{n} tok"
            row.append("—" if run is full and expected is None else "\n".join(x for x in (verdict, tokens) if x))
        ratio = run.memory["compression_ratio"]
        row.append(_fmt_bytes(run.memory["kept_bytes"]) + ("" if run is full else f"\n{ratio:.2f}x less" if ratio >= 1
                                                           else f"\n{1 / ratio:.2f}x more"))
        row.append(f"{run.prefill_s:.2f}")
        speed = f"{run.decode_ms:.1f}"
        if full is not None and run is not full:
            speed += f"\n{full.decode_ms / run.decode_ms:.2f}x"
        row.append(speed)
        table.add_row(*row)
    return table


def _verdict(runs, full, expected, agree) -> str:
    """One line: which compressed caches keep the answer and which do not."""
    compressed = [run for run in runs if run is not full]
    if full is None and expected is None:
        return "(add --compare-full to see whether compression keeps the full cache's answer)"
    what = f"the answer ({expected!r})" if expected is not None else "the full cache's answer"
    keep = [run.label for run in compressed if agree[run.label][2]]
    lose = [run.label for run in compressed if not agree[run.label][2]]
    if not lose:
        return f"[green]Every compressed cache keeps {what}.[/green]"
    line = f"[bold]Compression does not keep {what} with:[/bold] {', '.join(lose)}."
    if keep:
        line += f" It does with: {', '.join(keep)}."
    return line


def _plot_comparison(runs, full, agree, path: Path, model: str, prompt_tokens: int) -> Path:
    """KV bytes kept against decode ms/token, one point per cache: filled where the answer is kept, a cross where
    it is not; the method's colour as in `modalkv report`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .bench.report import method_styles

    styles = method_styles([run.method for run in runs])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = [run.memory["kept_bytes"] / 2**20 for run in runs]
    ys = [run.decode_ms for run in runs]
    if full is not None:
        ax.axhline(full.decode_ms, color="0.6", ls=":", lw=1, zorder=1)
        ax.axvline(full.memory["kept_bytes"] / 2**20, color="0.6", ls=":", lw=1, zorder=1)
    for run, x, y in zip(runs, xs, ys):
        kept = agree[run.label][2]
        ax.scatter([x], [y], s=90, marker="X" if kept is False else "o", color=styles[run.method][0], zorder=3,
                   edgecolors="k" if run is full else "none")
        ax.annotate(run.label, (x, y), xytext=(7, 4), textcoords="offset points", fontsize=8)
    ax.set(xlabel="KV bytes kept (MiB, metadata counted)", ylabel="decode ms/token (median)",
           xlim=(0, max(xs) * 1.45), ylim=(0, max(y for y in ys if y == y) * 1.25 if any(y == y for y in ys) else 1),
           title=f"{model}, {prompt_tokens}-token prompt: memory and decode time of each cache"
                 + ("\n(dotted: the full cache)" if full is not None else ""))
    ax.title.set_fontsize(10)
    if any(kept is not None for _, _, kept in agree.values()):
        ax.legend(handles=[Line2D([], [], marker="o", ls="none", color="0.3", label="answer kept"),
                           Line2D([], [], marker="X", ls="none", color="0.3", label="answer not kept")],
                  loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


@app.command()
def bench(
    config: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="TOML file holding a sweep."),
    models: Optional[list[str]] = typer.Option(None, "--models", help="Models (repeatable)."),
    methods: Optional[list[str]] = typer.Option(None, "--methods", help="Methods besides the full cache."),
    budgets: Optional[list[float]] = typer.Option(None, "--budgets", help="Budgets (ratios)."),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="Tasks (see modalkv.tasks; plus 'fidelity')."),
    lengths: Optional[list[int]] = typer.Option(None, "--lengths", help="Prompt lengths in tokens."),
    samples: Optional[int] = typer.Option(None, help="Seeds per (task, length)."),
    threads: Optional[int] = typer.Option(None, help="Pinned torch threads."),
    out: Optional[str] = typer.Option(None, help="Results CSV (appended; finished cells are skipped)."),
    executor: Optional[str] = typer.Option(None, help="local (default) or ray."),
    quantize: Optional[str] = typer.Option(None, help="Quantized storage for every method: kivi-2/4/8."),
    modality_caps: Optional[str] = typer.Option(None, help="Per-modality caps for every eviction method, e.g. "
                                                           "image=0.1,text=0.5 (or per method: snapkv@image=0.1)."),
) -> None:
    """Run a benchmark sweep: accuracy, KV memory and decode speed per cell, resumable."""
    from .bench import BenchConfig, run_bench

    overrides = dict(models=models or None, methods=methods or None, budgets=budgets or None,
                     tasks=tasks or None, lengths=lengths or None, samples=samples, threads=threads, out=out,
                     executor=executor, quantize=quantize, modality_caps=modality_caps)
    try:
        cfg = BenchConfig.from_file(config, **overrides) if config else BenchConfig(
            **{k: v for k, v in overrides.items() if v is not None})
        _check_bench(cfg)
    except (ValueError, TypeError) as err:
        _fail(str(err))
    path = run_bench(cfg)
    console.print(f"results: {path} (sidecar {path.with_suffix('.json')}); make tables and plots with "
                  f"`modalkv report {path}`")


def _check_bench(cfg) -> None:
    for label in cfg.methods:
        m, params, _ = parse_label(cfg.label(label))  # checks the caps too
        if m not in REGISTRY and m not in storage_names():
            raise ValueError(f"unknown method {m!r}; available: {', '.join(REGISTRY)} "
                             f"(or quantized full storage: {', '.join(storage_names())})")
        if m in REGISTRY:
            make_method(m, **params)  # unknown or out-of-range parameters fail here, before any model loads
    for t in cfg.tasks:
        if t not in TASKS and t != "fidelity":
            raise ValueError(f"unknown task {t!r}; available: {', '.join(sorted(TASKS))}, fidelity")
    for b in cfg.budgets:
        check_budget_value(float(b), "budget")
    for m in cfg.models:
        vlm = m.split("@")[0] == VLM_NAME
        if m not in MODEL_REGISTRY and not vlm and not Path(m).is_dir():
            raise ValueError(f"unknown model {m!r}; known: {', '.join(MODEL_REGISTRY)}, {VLM_NAME}[@tokens per "
                             "image] or a local folder")
        visual = [t for t in cfg.tasks if getattr(TASKS.get(t), "multimodal", False)]
        if visual and not vlm:
            raise ValueError(f"task(s) {', '.join(visual)} need a vision-language model ({VLM_NAME}); {m!r} is "
                             "text-only: run them in a separate sweep")
    if cfg.executor not in ("local", "ray"):
        raise ValueError(f"unknown executor {cfg.executor!r}; use 'local' or 'ray'")


@app.command()
def report(
    results: list[Path] = typer.Argument(..., exists=True, dir_okay=False,
                                         help="Results CSV(s) from `modalkv bench` (and kvpress's side-by-side run)."),
    out_dir: Optional[Path] = typer.Option(None, help="Where to write the report (default: beside the results)."),
    name: Optional[str] = typer.Option(None, help="Base name of the report files (default: the first results file's)."),
) -> None:
    """Write Markdown tables and PNG plots from one or more results files (shown together)."""
    from .bench import write_report

    try:
        md = write_report(results[0], out_dir, extra=results[1:], name=name)
    except ValueError as err:
        _fail(str(err))
    console.print(f"wrote {md}")


@app.command()
def continual(
    learners: str = typer.Option(",".join(["frozen", "growing", "inducekv", "inducekv-bilevel", "inducekv-random",
                                           "lora"]), help="Comma-separated learners to run in the same run."),
    suite: str = typer.Option("facts", help="facts: Wikipedia facts by topic (cities, scientists, artists, leaders) "
                                             "on a text model; vqa: easy-VQA by question type on the VLM."),
    model: Optional[str] = typer.Option(None, help="Default smollm2-135m (facts) or modalkv-vlm (vqa); InduceKV "
                                                   "needs full-attention RoPE layers."),
    per_task: int = typer.Option(32, help="Training examples per task."),
    test_per_task: int = typer.Option(32, help="vqa: test questions per task (facts are asked back)."),
    budget_entries: int = typer.Option(32, help="InduceKV's fixed byte budget, as this many entries + calibration."),
    ell: int = typer.Option(64, help="Payload tokens per layer and KV head of one entry."),
    top_k: int = typer.Option(2, help="Entries retrieved and placed before each query."),
    query: str = typer.Option("q_train", help="Test question template: q_train (held-in), q_test or q_para (paraphrases), held_out (both)."),
    param: list[str] = typer.Option([], help="Extra InduceKV parameter KEY=VALUE (repeatable), e.g. bilevel_steps=5."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(2),
    out: Path = typer.Option(Path("continual_results"), help="Output stem: writes .csv, .json, .md and plots."),
) -> None:
    """Continual benchmark: InduceKV's fixed-size memory bank against frozen, growing memory and sequential LoRA."""
    from .bench.continual import ContinualConfig, run, write_report

    cfg = ContinualConfig(suite=suite, model=model or ("modalkv-vlm" if suite == "vqa" else "smollm2-135m"),
                          test_per_task=test_per_task, learners=[x.strip() for x in learners.split(",") if x.strip()],
                          per_task=per_task, seed=seed, budget_entries=budget_entries, ell=ell, top_k=top_k,
                          selection_kwargs=_parse_params(param), query=query, threads=threads)
    res = run(cfg, out, log=console.print)
    md = write_report(Path(out).with_suffix(".json"))
    for name, s in res["summary"]["learners"].items():
        console.print(f"{name:18s} Avg {s['avg']:.3f}  Last {s['last']:.3f}  BWT {s['bwt']:+.3f}  "
                      f"final state {s['final_bytes'] / 2**20:.1f} MiB")
    console.print(f"wrote {md}")


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", help="A bundled model or a local transformers folder."),
    method: str = typer.Option("snapkv", help="snapkv or streamingllm (one entry count per request)."),
    budget: float = typer.Option(1.0, help="Default budget, a ratio in (0, 1]; a request sets its own with "
                                           "vllm_xargs={\"modalkv_budget\": 0.25}. 1.0 = the full cache."),
    param: list[str] = typer.Option([], "--param", "-p", help="Method parameter KEY=VALUE (repeatable)."),
    host: str = typer.Option("127.0.0.1", help="Address the server listens on."),
    port: int = typer.Option(8000, help="Port."),
    kv_space: int = typer.Option(1, help="vLLM's KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE)."),
    max_model_len: int = typer.Option(4096, help="Longest prompt + output in tokens."),
    dry_run: bool = typer.Option(False, help="Print the server command instead of starting it."),
) -> None:
    """Serve a model with vLLM's OpenAI-compatible server, KV compressed by modalkv (needs scripts/vllm_setup.sh)."""
    from .serving.launch import describe, serve_command
    from .serving.policy import ServingConfig

    try:
        argv, env = serve_command(model, ServingConfig(method, budget, _parse_params(param)), host, port,
                                  max_model_len, kv_space)
    except (ValueError, TypeError, FileNotFoundError) as err:
        _fail(str(err))
    if dry_run:
        console.print(describe(argv, env), markup=False, highlight=False, soft_wrap=True)
        return
    os.execve(argv[0], argv, env)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()


@app.command("train-vlm")
def train_vlm(
    vision_minutes: float = typer.Option(5.0, help="Stage 1: vision tower on shape/colour labels."),
    vqa_minutes: float = typer.Option(40.0, help="Stage 2: projector + LoRA through the frozen SmolLM2, one image "
                                                 "per question."),
    mixed_minutes: float = typer.Option(15.0, help="Stage 3: the same, on multi-image, long-text and describe "
                                                   "prompts (the formats of the multimodal tasks, training split)."),
    batch: int = typer.Option(16, help="Stage 2 batch size."),
    mixed_batch: int = typer.Option(6, help="Stage 3 batch size (longer prompts)."),
    bf16: bool = typer.Option(True, help="bfloat16 autocast in stages 2-3 (fp32 weights)."),
    eval_n: int = typer.Option(1000, help="easy-VQA test questions to score at the end (0: all 9,673)."),
    threads: int = typer.Option(2, help="Pinned torch threads."),
    seed: int = typer.Option(0),
    resume: Path = typer.Option(None, help="Start from these trained weights (a folder written by train-vlm) "
                                           "instead of a fresh vision tower; stages with 0 minutes are skipped."),
    out: Path = typer.Option(None, help="Where to write the weights (default: the package's assets)."),
) -> None:
    """Train modalkv's small VLM (SmolLM2 + SigLIP-style tower + projector + LoRA) on easy-VQA; ship its weights."""
    pin_threads(threads)
    torch.manual_seed(seed)
    log: list[str] = []
    record: dict = {}
    if resume:
        model, processor = vlm.load_vlm(folder=resume, merge=False)
        spec = vlm.VLMSpec(**json.loads((resume / "vlm.json").read_text())["spec"])
        record["resumed_from"] = json.loads((resume / "vlm.json").read_text())["training"]
    else:
        spec = vlm.VLMSpec()
        model, processor = vlm.build(spec)
    t0 = time.time()
    if vision_minutes > 0:
        record["vision_steps"] = vlm_train.train_vision(model, processor, vision_minutes, seed=seed, log=log)
    if vqa_minutes > 0:
        record["vqa_steps"] = vlm_train.train_vqa(model, processor, spec, vqa_minutes, batch=batch, seed=seed,
                                                 log=log, bf16=bf16)
    if mixed_minutes > 0:
        record["mixed_steps"] = vlm_train.train_vqa(model, processor, spec, mixed_minutes, batch=mixed_batch,
                                                   seed=seed, log=log, bf16=bf16, stage="mixed",
                                                   examples=interleaved_examples(processor.tokenizer, seed))
    train_s = time.time() - t0
    record.update(batch=batch, mixed_batch=mixed_batch, seed=seed, bf16=bf16, train_seconds=round(train_s),
                  minutes={"vision": vision_minutes, "vqa": vqa_minutes, "mixed": mixed_minutes}, log_tail=log[-5:])
    folder = vlm_train.save(model, spec, record, out or vlm.ASSET_DIR)
    model, processor = vlm.load_vlm(folder=folder)
    res = vlm_train.evaluate(model, processor, n=eval_n or None, seed=seed)
    meta = json.loads((folder / "vlm.json").read_text())
    meta["evaluation"] = res
    (folder / "vlm.json").write_text(json.dumps(meta, indent=2))
    console.print(f"trained in {train_s / 60:.1f} min; easy-VQA test exact match {res['accuracy']:.3f} "
                  f"(colour {res['accuracy_color']:.3f}, shape {res['accuracy_shape']:.3f}, "
                  f"yes/no {res['accuracy_yes/no']:.3f}; n={res['n']}); weights in {folder}")

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

import torch
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="modalkv: KV-cache compression that frees memory.")
console = Console(width=max(120, Console().width))

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
    """List the available methods (and quantizers) with one line each."""
    from .methods import REGISTRY

    table = Table(show_header=True, header_style="bold")
    table.add_column("method")
    table.add_column("parameters")
    table.add_column("what it does")
    for name, cls in REGISTRY.items():
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.init)
        table.add_row(name, params, cls.summary)
    console.print(table)
    console.print("Quantized storage (composes with any method, --quantize): kivi-2, kivi-4, kivi-8")
    console.print("Continual adaptation (not a compression method): InduceKV, a fixed-size bank of induced KV "
                  "memories for a frozen model (modalkv.inducekv; benchmark: modalkv continual)")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command()
def generate(
    model: str = typer.Option("smollm2-135m", help="Registry name (smollm2-135m, gemma3-270m, modalkv-vlm[@N]) or a "
                                                   "local folder."),
    method: str = typer.Option("snapkv", help="Compression method (see `modalkv methods`)."),
    budget: str = typer.Option("0.25", help="Ratio of the prompt in (0, 1] or an absolute token count."),
    prompt: Optional[str] = typer.Option(None, help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Read the prompt from a file."),
    max_new_tokens: int = typer.Option(48, min=1, help="Tokens to generate."),
    compare_full: bool = typer.Option(False, "--compare-full", help="Also run the full cache and compare."),
    quantize: Optional[str] = typer.Option(None, help="Quantized storage: kivi-2, kivi-4 or kivi-8."),
    param: list[str] = typer.Option([], "--param", "-p", help="Method parameter KEY=VALUE (repeatable)."),
    threads: int = typer.Option(0, help="Pin torch to this many threads (0: torch's default)."),
    chat: bool = typer.Option(True, help="Wrap the prompt in the model's chat template."),
    image: list[Path] = typer.Option([], "--image", help="An image for a vision-language model (repeatable; with "
                                                         "--model modalkv-vlm). The prompt follows the images."),
    modality_caps: Optional[str] = typer.Option(None, help="Per-modality caps, e.g. image=0.1,text=0.5 (ratios of "
                                                           "each modality's prompt tokens)."),
) -> None:
    """Generate with a compressed cache; print the answer and a memory/speed table."""
    try:
        _generate(model, method, budget, prompt, prompt_file, max_new_tokens, compare_full, quantize, param, threads, chat,
                  image, modality_caps)
    except (ValueError, TypeError, ImportError, FloatingPointError) as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(2) from None


def _generate(model, method, budget, prompt, prompt_file, max_new_tokens, compare_full, quantize, param, threads,
              chat, images=(), modality_caps=None) -> None:
    import torch
    from transformers import DynamicCache

    from .cache import KVCache
    from .measure import cache_bytes, greedy_generate, peak_rss_bytes, pin_threads
    from .models import load_model

    from .budget import parse_caps

    if prompt is not None and prompt_file is not None:
        raise ValueError("give either --prompt or --prompt-file, not both")
    for path in images:
        if not Path(path).is_file():
            raise ValueError(f"image {str(path)!r} does not exist")
    caps = parse_caps(modality_caps or "")
    expected = None
    if images and prompt is None and prompt_file is None:
        text = "what shape is in the image?" if len(images) == 1 else "Describe each image."
    elif prompt_file is not None:
        text = prompt_file.read_text()
    elif prompt is not None:
        text = prompt
    else:  # the demo: ~2.2k tokens of real Wikipedia summaries and a question about one of them
        from .data import demo_prompt

        try:
            text, expected = demo_prompt()
        except ImportError as err:
            console.print(f"[yellow]{err}; using a short built-in prompt[/yellow]")
            text = DEFAULT_PROMPT
    n_threads = pin_threads(threads or None)
    budget_value = _parse_budget(budget)
    params = _parse_params(param)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with console.status(f"loading {model}"):
        lm, tok = load_model(model)
    cache = KVCache(lm, method, budget_value, quantize=quantize, modality_caps=caps, **params)  # validates early
    processor, extra = (tok if hasattr(tok, "image_processor") else None), {}
    if images and processor is None:
        raise ValueError(f"--image needs a vision-language model (--model modalkv-vlm); {model!r} is text-only")
    if processor is not None:  # modalkv's VLM: its chat format, images first, then the prompt
        from . import vlm
        from .modality import detect_modality
        from .tasks.multimodal import image_prompt

        tok = processor.tokenizer
        ids = torch.tensor([vlm.expand_ids(tok, vlm.chat_text(image_prompt(len(images), text)),
                                           lm.config.image_seq_length)])
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if images:
            extra = {"pixel_values": vlm.load_images(list(images), processor)}
        cache.set_modality(detect_modality(lm.config, ids))
    else:
        if chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=not chat)
    eos = [t for t in {tok.eos_token_id, getattr(lm.generation_config, "eos_token_id", None)} if t is not None]
    eos = [e for x in eos for e in (x if isinstance(x, (list, tuple)) else [x])]

    rows = []
    runs = [(f"{method} @ {budget}" + (f" + {quantize}" if quantize else ""), cache)]
    if compare_full:
        runs.append(("full (transformers DynamicCache)", DynamicCache(config=lm.config.get_text_config(decoder=True))))
    answers = {}
    for label, c in runs:
        with console.status(f"generating with {label}"):
            res = greedy_generate(lm, enc["input_ids"], enc["attention_mask"], c, max_new_tokens, eos, **extra)
        mem = cache_bytes(c)
        answers[label] = res.tokens[0]
        rows.append((label, mem, res))

    console.print(f"[bold]model[/bold] {model}  [bold]prompt[/bold] {enc['input_ids'].shape[1]} tokens  "
                  f"[bold]threads[/bold] {n_threads}")
    console.print("[bold]answer:[/bold] " + tok.decode(answers[runs[0][0]], skip_special_tokens=True).strip())
    if expected is not None:
        console.print(f"[dim](demo question; the text says {expected})[/dim]")
    if compare_full:
        full_answer = answers[runs[1][0]]
        console.print("[bold]full cache answer:[/bold] " + tok.decode(full_answer, skip_special_tokens=True).strip())

    table = Table(show_header=True, header_style="bold")
    for col in ("cache", "KV bytes full", "KV bytes kept", "compression", "allocated", "prefill s", "decode ms/token"):
        table.add_column(col, justify="right" if col != "cache" else "left")
    base = rows[-1][2].decode_ms if compare_full else None
    for label, mem, res in rows:
        speed = f"{res.decode_ms:.1f}"
        if base and label != rows[-1][0] and res.step_ms:
            speed += f" ({base / res.decode_ms:.2f}x)"
        table.add_row(label, _fmt_bytes(mem["full_bytes"]), _fmt_bytes(mem["kept_bytes"]),
                      f"{mem['compression_ratio']:.2f}x", _fmt_bytes(mem["allocated_bytes"]),
                      f"{res.prefill_s:.2f}", speed)
    console.print(table)
    if compare_full:
        same = answers[runs[0][0]] == answers[runs[1][0]]
        console.print(f"answers agree with the full cache: [bold]{'yes' if same else 'no'}[/bold]")
    console.print(f"process peak RSS: {_fmt_bytes(peak_rss_bytes())}; decode ms/token is the median step time "
                  f"(first token excluded); speed-up in brackets is full / compressed in this run.")
    del torch


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
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(2) from None
    path = run_bench(cfg)
    console.print(f"results: {path} (sidecar {path.with_suffix('.json')}); make tables and plots with "
                  f"`modalkv report {path}`")


def _check_bench(cfg) -> None:
    from .budget import check_budget_value
    from .methods import QUANTIZERS, REGISTRY, make_method, parse_label
    from .models import MODEL_REGISTRY, VLM_NAME
    from .tasks import TASKS

    for label in cfg.methods:
        m, params, _ = parse_label(cfg.label(label))  # checks the caps too
        if m not in REGISTRY and m not in QUANTIZERS:
            raise ValueError(f"unknown method {m!r}; available: {', '.join(REGISTRY)} "
                             f"(or quantized full storage: {', '.join(QUANTIZERS)})")
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

    md = write_report(results[0], out_dir, extra=results[1:], name=name)
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
    query: str = typer.Option("q_train", help="Test question template: q_train (held-in) or q_test (paraphrase)."),
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
    from . import vlm
    from .measure import pin_threads
    from .tasks.multimodal import interleaved_examples

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
        record["vision_steps"] = vlm.train_vision(model, processor, vision_minutes, seed=seed, log=log)
    if vqa_minutes > 0:
        record["vqa_steps"] = vlm.train_vqa(model, processor, spec, vqa_minutes, batch=batch, seed=seed, log=log,
                                           bf16=bf16)
    if mixed_minutes > 0:
        record["mixed_steps"] = vlm.train_vqa(model, processor, spec, mixed_minutes, batch=mixed_batch, seed=seed,
                                             log=log, bf16=bf16, stage="mixed",
                                             examples=interleaved_examples(processor.tokenizer, seed))
    train_s = time.time() - t0
    record.update(batch=batch, mixed_batch=mixed_batch, seed=seed, bf16=bf16, train_seconds=round(train_s),
                  minutes={"vision": vision_minutes, "vqa": vqa_minutes, "mixed": mixed_minutes}, log_tail=log[-5:])
    folder = vlm.save(model, spec, record, out or vlm.ASSET_DIR)
    model, processor = vlm.load_vlm(folder=folder)
    res = vlm.evaluate(model, processor, n=eval_n or None, seed=seed)
    meta = json.loads((folder / "vlm.json").read_text())
    meta["evaluation"] = res
    (folder / "vlm.json").write_text(json.dumps(meta, indent=2))
    console.print(f"trained in {train_s / 60:.1f} min; easy-VQA test exact match {res['accuracy']:.3f} "
                  f"(colour {res['accuracy_color']:.3f}, shape {res['accuracy_shape']:.3f}, "
                  f"yes/no {res['accuracy_yes/no']:.3f}; n={res['n']}); weights in {folder}")

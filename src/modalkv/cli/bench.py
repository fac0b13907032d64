"""The benchmark commands: ``modalkv bench`` (a sweep), ``modalkv report`` (its tables and plots) and
``modalkv continual`` (the continual-learning benchmark)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..bench import BenchConfig, run_bench, write_report
from ..bench import continual as continual_bench
from ..budget import check_budget_value
from ..methods import REGISTRY, make_method, parse_label
from ..models import MODEL_REGISTRY, VLM_NAME
from ..storage import storage_names
from ..tasks import TASKS
from .common import console, fail, parse_params


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
    overrides = dict(models=models or None, methods=methods or None, budgets=budgets or None,
                     tasks=tasks or None, lengths=lengths or None, samples=samples, threads=threads, out=out,
                     executor=executor, quantize=quantize, modality_caps=modality_caps)
    try:
        cfg = BenchConfig.from_file(config, **overrides) if config else BenchConfig(
            **{k: v for k, v in overrides.items() if v is not None})
        check_bench(cfg)
    except (ValueError, TypeError) as err:
        fail(str(err))
    path = run_bench(cfg)
    console.print(f"results: {path} (sidecar {path.with_suffix('.json')}); make tables and plots with "
                  f"`modalkv report {path}`")


def check_bench(cfg) -> None:
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


def report(
    results: list[Path] = typer.Argument(..., exists=True, dir_okay=False,
                                         help="Results CSV(s) from `modalkv bench` (and kvpress's side-by-side run)."),
    out_dir: Optional[Path] = typer.Option(None, help="Where to write the report (default: beside the results)."),
    name: Optional[str] = typer.Option(None, help="Base name of the report files (default: the first results file's)."),
) -> None:
    """Write Markdown tables and PNG plots from one or more results files (shown together)."""
    try:
        md = write_report(results[0], out_dir, extra=results[1:], name=name)
    except ValueError as err:
        fail(str(err))
    console.print(f"wrote {md}")


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
    cfg = continual_bench.ContinualConfig(suite=suite, model=model or ("modalkv-vlm" if suite == "vqa" else "smollm2-135m"),
                          test_per_task=test_per_task, learners=[x.strip() for x in learners.split(",") if x.strip()],
                          per_task=per_task, seed=seed, budget_entries=budget_entries, ell=ell, top_k=top_k,
                          selection_kwargs=parse_params(param), query=query, threads=threads)
    res = continual_bench.run(cfg, out, log=console.print)
    md = continual_bench.write_report(Path(out).with_suffix(".json"))
    for name, s in res["summary"]["learners"].items():
        console.print(f"{name:18s} Avg {s['avg']:.3f}  Last {s['last']:.3f}  BWT {s['bwt']:+.3f}  "
                      f"final state {s['final_bytes'] / 2**20:.1f} MiB")
    console.print(f"wrote {md}")

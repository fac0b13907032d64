"""``modalkv train-vlm``: train modalkv's small VLM and write its weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import typer

from .. import vlm, vlm_train
from ..measure import pin_threads
from ..tasks.multimodal import interleaved_examples
from .common import console


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

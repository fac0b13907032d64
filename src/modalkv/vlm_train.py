"""Training and evaluation of modalkv's small VLM (:mod:`modalkv.vlm`): ``modalkv train-vlm``.

About an hour on 2 CPU cores by default: stage 1 teaches the vision tower shape and colour labels read off the
training questions; stage 2 trains projector + LoRA (+ the vision tower at a lower rate) through the frozen LM on the
answers, one image per question; stage 3 continues on the prompt formats of the multimodal tasks (several labelled
images, an image followed by text, "Describe each image.") drawn from the training split
(:func:`modalkv.tasks.multimodal.interleaved_examples`). Evaluation: exact match of the generated answer on the
easy-VQA test set. :func:`save` writes the tensors that are not SmolLM2's; :func:`modalkv.vlm.load_vlm` reads them.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .vlm import (
    ASSET_DIR,
    COLORS,
    IMAGE_TOKEN,
    SHAPES,
    VLMSpec,
    add_lora,
    chat_text,
    easy_vqa_split,
    expand_ids,
    image_labels,
    load_images,
    prompt_ids,
)


def _log(msg: str, log):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if log is not None:
        log.append(line)


def train_vision(model, processor, minutes: float, batch: int = 64, lr: float = 1e-3, seed: int = 0, log=None):
    """Stage 1: the vision tower learns shape and colour (two linear heads on mean-pooled patch features)."""
    labels = image_labels("train")
    paths = sorted(labels)
    pixels = load_images(paths, processor)
    y = torch.tensor([labels[p] for p in paths])
    tower = model.model.vision_tower
    heads = torch.nn.Linear(tower.config.hidden_size, len(SHAPES) + len(COLORS))
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    tower.train()
    t0, step = time.time(), 0
    while time.time() - t0 < minutes * 60:
        idx = torch.randint(0, len(paths), (batch,), generator=g)
        feats = tower(pixel_values=pixels[idx]).last_hidden_state.mean(1)
        logits = heads(feats)
        loss = F.cross_entropy(logits[:, : len(SHAPES)], y[idx, 0]) + F.cross_entropy(logits[:, len(SHAPES):], y[idx, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            acc = ((logits[:, : len(SHAPES)].argmax(-1) == y[idx, 0]) & (logits[:, len(SHAPES):].argmax(-1) == y[idx, 1]))
            _log(f"vision step {step} loss {loss.item():.3f} batch acc {acc.float().mean():.2f}", log)
    tower.eval()
    return step


def _batch(processor, questions, answers, tokens_per_image: int):
    """Right-padded input ids, labels (the answer and the end of turn only) and attention mask of one-image
    questions (stage 2's format)."""
    return _batch_examples(processor, [(IMAGE_TOKEN + "\n" + q, a, []) for q, a in zip(questions, answers)],
                           tokens_per_image)[:3]


def _batch_examples(processor, examples, tokens_per_image: int):
    """(ids, labels, mask, image paths in token order) of ``(content, answer, paths)`` examples, right-padded;
    the loss is on the answer and the end of turn only."""
    tok = processor.tokenizer
    rows, labels, paths = [], [], []
    for content, answer, image_paths in examples:
        prompt = expand_ids(tok, chat_text(content), tokens_per_image)
        target = tok(answer + "<|im_end|>", add_special_tokens=False).input_ids
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
        paths += list(image_paths)
    n = max(map(len, rows))
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    lab = torch.full((len(rows), n), -100)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], lab[i, : len(l)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(l), 1
    return ids, lab, mask, paths


def vqa_examples(seed: int = 0):
    """Stage 2's stream: every easy-VQA training question once per epoch, shuffled, one image each."""
    q, a, paths = easy_vqa_split("train")
    order = list(range(len(q)))
    rng = random.Random(seed)
    while True:
        rng.shuffle(order)
        for i in order:
            yield IMAGE_TOKEN + "\n" + q[i], a[i], [paths[i]]


def train_vqa(model, processor, spec: VLMSpec, minutes: float, batch: int = 16, lr: float = 3e-4,
              vision_lr: float = 5e-5, seed: int = 0, log=None, bf16: bool = True, max_steps: int | None = None,
              examples=None, stage: str = "vqa") -> int:
    """Stage 2 (and 3): projector + LoRA (+ vision tower at ``vision_lr``) through the frozen LM, loss on the answers.

    ``examples``: an iterator of ``(content, answer, image paths)`` (default :func:`vqa_examples`; stage 3 passes
    :func:`modalkv.tasks.multimodal.interleaved_examples`). ``bf16``: autocast matmuls to bfloat16 (fp32 weights
    and optimizer state); 1.5x faster per step on this project's AVX512-BF16 CPU (batch 16: ~5 s vs ~7.5 s).
    Warm-up 20 steps, then cosine decay over the time budget."""
    examples = examples if examples is not None else vqa_examples(seed)
    lora = add_lora(model, spec)
    groups = [{"params": list(model.model.multi_modal_projector.parameters()) + lora, "lr": lr},
              {"params": list(model.model.vision_tower.parameters()), "lr": vision_lr}]
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    model.train()
    t0, step, losses = time.time(), 0, []
    budget = minutes * 60
    while time.time() - t0 < budget and (max_steps is None or step < max_steps):
        ids, labels, mask, paths = _batch_examples(processor, [next(examples) for _ in range(batch)],
                                                   spec.tokens_per_image)
        pixels = load_images(paths, processor)
        frac = (time.time() - t0) / budget
        for g, base in zip(opt.param_groups, (lr, vision_lr)):
            g["lr"] = base * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        step += 1
        if step % 10 == 0:
            _log(f"{stage} step {step} ({step * batch} examples) loss {sum(losses[-10:]) / 10:.3f}", log)
    model.eval()
    return step


@torch.no_grad()
def evaluate(model, processor, n: int | None = None, batch: int = 32, seed: int = 0) -> dict:
    """Exact match of the generated one-word answer on easy-VQA's test split (``n`` random questions, or all),
    overall and by question type (colour, shape, yes/no)."""
    spec_tokens = model.config.image_seq_length
    q, a, paths = easy_vqa_split("test")
    idx = list(range(len(q)))
    if n is not None and n < len(idx):
        idx = sorted(random.Random(seed).sample(idx, n))
    tok = processor.tokenizer
    hits = {"color": [], "shape": [], "yes/no": []}
    for s in range(0, len(idx), batch):
        chunk = idx[s: s + batch]
        rows = [prompt_ids(tok, q[i], spec_tokens) for i in chunk]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):  # left padding for generation
            ids[j, width - len(r):], mask[j, width - len(r):] = torch.tensor(r), 1
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=load_images([paths[i] for i in chunk],
                             processor), max_new_tokens=3, do_sample=False)
        for j, i in enumerate(chunk):
            words = tok.decode(out[j, width:], skip_special_tokens=True).strip().lower().split()
            got = words[0].strip(".,!") if words else ""
            kind = "yes/no" if a[i] in ("yes", "no") else ("shape" if a[i] in SHAPES else "color")
            hits[kind].append(got == a[i])
    total = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    return {"accuracy": total, "n": sum(len(v) for v in hits.values()),
            **{f"accuracy_{k}": (sum(v) / len(v) if v else float("nan")) for k, v in hits.items()}}


# -- shipping -----------------------------------------------------------------------------------------------------

def trained_state(model) -> dict[str, torch.Tensor]:
    """The tensors that are not SmolLM2's: vision tower, projector, LoRA adapters (fp16)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name or ".vision_tower." in f".{name}" or "multi_modal_projector" in name:
            out[name] = p.detach().to(torch.float16).contiguous()
    return out


def save(model, spec: VLMSpec, record: dict, folder: Path | None = None) -> Path:
    """Write the trained tensors (:func:`trained_state`) and ``vlm.json`` (spec and training record) to ``folder``
    (default: the package's assets); returns the folder."""
    folder = Path(folder) if folder is not None else ASSET_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_file(trained_state(model), folder / "weights.safetensors")
    (folder / "vlm.json").write_text(json.dumps({"spec": asdict(spec), "training": record}, indent=2))
    return folder

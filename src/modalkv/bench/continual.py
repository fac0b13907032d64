"""The continual benchmark: a stream of tasks, accuracy on every seen task after each stage, and the adaptation
state's bytes — InduceKV against the frozen model, an unbounded growing memory and sequential LoRA, in one run.

``modalkv continual`` runs it; :func:`run` is the library entry point. Every learner sees the same training
examples of each task once per stage (LoRA for several epochs), keeps nothing of the raw data afterwards, and is
evaluated on the same queries; per-query latency is measured in the same run and reported against the frozen model.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..continual import InduceKV, continual_metrics
from ..measure import pin_threads
from ..models import load_model
from ..tasks import continual as ct

LEARNERS = ("frozen", "growing", "inducekv", "inducekv-bilevel", "inducekv-random", "lora")


@dataclass
class ContinualConfig:
    suite: str = "facts"  # facts (Wikipedia facts by topic, text model) or vqa (easy-VQA by question type, VLM)
    model: str = "smollm2-135m"
    learners: list = field(default_factory=lambda: list(LEARNERS))
    per_task: int = 32
    seed: int = 0
    budget_entries: int = 32  # InduceKV's byte budget, expressed as this many entries plus the fixed part
    ell: int = 64
    top_k: int = 2
    selection_kwargs: dict = field(default_factory=dict)  # extra InduceKV parameters (all InduceKV learners)
    query: str = "q_train"  # facts: the question asked at test: q_train (held-in), q_test / q_para (paraphrases) or
    # held_out (both paraphrases)
    test_per_task: int = 32  # vqa: test-split questions per task
    max_new_tokens: int = 8
    lora_rank: int = 8
    lora_epochs: int = 8
    lora_lr: float = 1e-3
    lora_batch: int = 8
    threads: int = 2


def _inducekv(cfg: ContinualConfig, learner: str, model) -> InduceKV:
    if learner == "growing":
        return InduceKV(budget_bytes=None, selection="all", ell=cfg.ell, top_k=cfg.top_k, seed=cfg.seed,
                        **cfg.selection_kwargs)
    selection = {"inducekv": "greedy", "inducekv-bilevel": "bilevel", "inducekv-random": "random"}[learner]
    budget = InduceKV.budget_for(model, cfg.budget_entries, ell=cfg.ell, **cfg.selection_kwargs)
    return InduceKV(budget_bytes=budget, selection=selection, ell=cfg.ell, top_k=cfg.top_k, seed=cfg.seed,
                    **cfg.selection_kwargs)


class _Lora:
    """Sequential LoRA fine-tuning of a copy of the model on each task's training text (the naive baseline)."""

    def __init__(self, cfg: ContinualConfig, model):
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        # the language model's projections only (a VLM's vision tower has q/k/v projections too)
        targets = r".*(?:language_model|model\.layers)\.\d+\..*(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        self.model = get_peft_model(copy.deepcopy(model), LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                                                                     target_modules=targets, lora_dropout=0.0))
        self.opt = None

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if "lora_" in n)

    def learn(self, examples, seed: int) -> None:
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lora_lr, weight_decay=0.0)  # fresh per task: plain sequential
        gen = torch.Generator().manual_seed(seed)
        for _ in range(self.cfg.lora_epochs):
            order = torch.randperm(len(examples), generator=gen).tolist()
            for s in range(0, len(order), self.cfg.lora_batch):
                chosen = [examples[i] for i in order[s : s + self.cfg.lora_batch]]
                batch = [ex.prefix for ex in chosen]
                extra = {}
                if "pixel_values" in chosen[0].model_kwargs:
                    extra["pixel_values"] = torch.cat([ex.model_kwargs["pixel_values"] for ex in chosen])
                n = max(b.numel() for b in batch)
                ids = torch.zeros(len(batch), n, dtype=torch.long)
                mask = torch.zeros(len(batch), n, dtype=torch.long)
                for r, b in enumerate(batch):
                    ids[r, : b.numel()] = b
                    mask[r, : b.numel()] = 1
                labels = ids.masked_fill(mask == 0, -100)
                loss = self.model(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.model.eval()

def run(cfg: ContinualConfig, out: Path | None = None, log=print) -> dict:
    """Run the benchmark; returns {"rows": [...], "summary": {...}} and writes CSV + JSON when ``out`` is given."""
    unknown = [x for x in cfg.learners if x not in LEARNERS]
    if unknown:
        raise ValueError(f"unknown continual learner(s) {unknown}; choose from {', '.join(LEARNERS)}")
    if cfg.query not in ("q_train", "q_calib", "q_test", "q_para", "held_out"):
        raise ValueError(f"query template {cfg.query!r}: use q_train, q_calib, q_test, q_para or held_out")
    if cfg.suite not in ("facts", "vqa"):
        raise ValueError(f"unknown continual suite {cfg.suite!r}; use 'facts' or 'vqa'")
    pin_threads(cfg.threads)
    model, tok = load_model(cfg.model)
    if cfg.suite == "facts":
        fact_tasks = ct.fact_tasks(cfg.per_task, cfg.seed)
        names = [t.name for t in fact_tasks]
        examples = [ct.fact_examples(tok, t, i) for i, t in enumerate(fact_tasks)]
        queries = [ct.fact_queries(tok, t, cfg.query) for t in fact_tasks]
        check = ct.is_correct
    else:
        if not hasattr(model.config, "image_seq_length"):
            raise ValueError(f"suite 'vqa' needs a vision-language model (modalkv-vlm); {cfg.model!r} is not one")
        names, examples, queries = ct.vqa_tasks(tok, model.config.image_seq_length, cfg.per_task,
                                                cfg.test_per_task, cfg.seed)
        check = ct.first_word_correct
        tok = tok.tokenizer
    rows: list[dict] = []
    summary: dict = {"config": asdict(cfg), "tasks": names, "learners": {}, "same_loop_latency": True}
    plain = InduceKV(budget_bytes=None, selection="all", ell=cfg.ell)  # never trained: an empty bank
    for learner in cfg.learners:
        torch.manual_seed(cfg.seed)
        state = None if learner == "frozen" else _Lora(cfg, model) if learner == "lora" else _inducekv(cfg, learner,
                                                                                                         model)
        acc: list[list[float]] = []
        latency: list[float] = []
        for stage, task in enumerate(names):
            t0 = time.perf_counter()
            info: dict = {}
            if isinstance(state, InduceKV):
                info = state.add_task(model, stage, examples[stage])
            elif isinstance(state, _Lora):
                state.learn(examples[stage], cfg.seed + stage)
            learn_s = time.perf_counter() - t0
            nbytes = state.bank.nbytes if isinstance(state, InduceKV) else state.nbytes if state is not None else 0
            row_acc = []
            for j in range(stage + 1):
                ok = 0
                routed = 0
                for q in queries[j]:
                    t1 = time.perf_counter()
                    # one greedy loop for every learner (an empty bank is the frozen model, tested), a fixed
                    # number of tokens: per-token latencies compare like with like
                    runner = state if isinstance(state, InduceKV) else plain
                    net = state.model if isinstance(state, _Lora) else model
                    toks, ginfo = runner.generate(net, q.ids, cfg.max_new_tokens, span=q.span, **q.model_kwargs)
                    routed += sum(t == j for t in ginfo["tasks"])
                    if stage == len(names) - 1:
                        latency.append((time.perf_counter() - t1) * 1e3 / max(1, len(toks)))
                    ok += check(tok.decode(toks, skip_special_tokens=True), q.answer)
                a = ok / len(queries[j])
                row_acc.append(a)
                rows.append({"learner": learner, "stage": stage, "stage_task": task, "task": names[j],
                             "task_id": j, "accuracy": a, "state_bytes": nbytes, "learn_s": round(learn_s, 2),
                             "entries": len(state.bank) if isinstance(state, InduceKV) else 0,
                             "entries_of_task": (state.bank.tasks().get(j, 0) if isinstance(state, InduceKV) else 0),
                             "routed_to_task": routed / (len(queries[j]) * max(1, cfg.top_k))
                             if isinstance(state, InduceKV) else None})
            acc.append(row_acc)
            log(f"{learner:18s} stage {stage} ({task}): acc {[round(x, 3) for x in row_acc]} "
                f"bytes {nbytes / 2**20:.1f} MiB learn {learn_s:.1f}s {info.get('per_task', '')}")
        summary["learners"][learner] = {**continual_metrics(acc), "acc": acc, "ms_per_token_median":
                                        statistics.median(latency) if latency else None,
                                        "final_bytes": rows[-1]["state_bytes"],
                                        "bytes_per_stage": [r["state_bytes"] for r in rows if r["learner"] == learner
                                                            and r["task_id"] == 0]}
    base = summary["learners"].get("frozen", {}).get("ms_per_token_median")
    for s in summary["learners"].values():
        s["latency_vs_frozen"] = s["ms_per_token_median"] / base if base and s["ms_per_token_median"] else None
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(out.with_suffix(".csv"), index=False)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return {"rows": rows, "summary": summary}


def write_report(summary_json: Path, out_md: Path | None = None) -> Path:
    """Markdown tables + PNG plots (accuracy per task after each stage; bytes over stages) from :func:`run`'s JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = json.loads(Path(summary_json).read_text())
    tasks = summary["tasks"]
    learners = summary["learners"]
    stem = Path(summary_json).with_suffix("")
    out_md = Path(out_md) if out_md else stem.with_suffix(".md")
    timed = summary.get("same_loop_latency", False)  # older runs timed the frozen model through another loop
    lines = ["| learner | Avg | Last | BWT | forgetting | state bytes per stage (MiB) |"
             + (" ms/token vs frozen |" if timed else ""), "|---|---:|---:|---:|---:|---|" + ("---:|" if timed else "")]
    for name, s in learners.items():
        mib = " / ".join(f"{b / 2**20:.1f}" for b in s["bytes_per_stage"])
        lat = f" {s['latency_vs_frozen']:.2f}x |" if timed and s.get("latency_vs_frozen") else (" |" if timed else "")
        lines.append(f"| {name} | {s['avg']:.3f} | {s['last']:.3f} | {s['bwt']:+.3f} | {s['forgetting']:.3f} | {mib} "
                     f"|{lat}")
    lines += ["", "Accuracy on each task (columns) after each stage (rows):", ""]
    for name, s in learners.items():
        lines += [f"**{name}**", "", "| after | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for i, row in enumerate(s["acc"]):
            cells = [f"{a:.3f}" for a in row] + [""] * (len(tasks) - len(row))
            lines.append(f"| {tasks[i]} | " + " | ".join(cells) + " |")
        lines.append("")
    fig, axes = plt.subplots(1, len(learners), figsize=(3.2 * len(learners), 3), sharey=True, squeeze=False)
    for ax, (name, s) in zip(axes[0], learners.items()):
        for j, t in enumerate(tasks):
            xs = list(range(j, len(s["acc"])))
            ax.plot(xs, [s["acc"][i][j] for i in xs], marker="o", label=t)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(tasks)))
        ax.set_xlabel("stage")
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    acc_png = stem.parent / f"{stem.name}_accuracy.png"
    fig.savefig(acc_png, dpi=110)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, s in learners.items():
        ax.plot(range(len(s["bytes_per_stage"])), [b / 2**20 for b in s["bytes_per_stage"]], marker="o", label=name)
    ax.set_xlabel("stage")
    ax.set_ylabel("adaptation state (MiB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    bytes_png = stem.parent / f"{stem.name}_bytes.png"
    fig.savefig(bytes_png, dpi=110)
    plt.close("all")
    lines += [f"![accuracy]({acc_png.name})", "", f"![bytes]({bytes_png.name})", ""]
    out_md.write_text("\n".join(lines))
    return out_md

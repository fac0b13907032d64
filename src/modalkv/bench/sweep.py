"""A benchmark sweep and its results file: the configuration (:class:`BenchConfig`, its groups and cells), the CSV
the cells' rows are appended to (one schema, :data:`COLUMNS`; finished cells are skipped on a rerun), the JSON sidecar
recording each run's configuration and environment, and the ratios of every row to the full cache of its group."""

from __future__ import annotations

import itertools
import json
import os
import platform
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
import transformers

from .. import __version__
from ..storage import storage_names

KEYS = ["library", "model", "task", "length", "seed", "method", "budget"]
COLUMNS = KEYS + [
    "prompt_tokens", "score", "kl", "top1", "output", "kv_full_bytes", "kv_kept_bytes", "kv_allocated_bytes",
    "compression", "kv_state_bytes", "kv_shared_bytes", "prefill_s", "compress_s", "decode_ms", "tokens_per_s",
    "decode_steps", "rss_bytes", "peak_rss_bytes", "cell_peak_rss_bytes",
]


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    methods: list[str] = field(default_factory=lambda: ["streamingllm", "h2o", "snapkv", "pyramidkv", "adakv"])
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    tasks: list[str] = field(default_factory=lambda: ["niah_single", "niah_multikey", "vt", "fidelity"])
    lengths: list[int] = field(default_factory=lambda: [2048])
    samples: int = 3
    threads: int = 1
    seed0: int = 0
    out: str = "results/bench.csv"
    executor: str = "local"
    quantize: str | None = None
    modality_caps: str | None = None  # e.g. "image=0.1,text=0.5": added to every eviction method's label

    def label(self, method: str) -> str:
        """The cell's method label: ``method`` or ``method@caps`` (see :func:`modalkv.methods.parse_label`)."""
        if self.modality_caps and "@" not in method and method not in storage_names():
            return f"{method}@{self.modality_caps}"
        return method

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "BenchConfig":
        data = tomllib.loads(Path(path).read_text())
        data = data.get("bench", data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def groups(self):
        """(model, task, length, seed) groups, each sharing one prefill."""
        for model, task, length, s in itertools.product(self.models, self.tasks, self.lengths, range(self.samples)):
            yield model, task, length, self.seed0 + s

    def cells(self, model, task, length, seed):
        yield dict(library="modalkv", model=model, task=task, length=length, seed=seed, method="full", budget=1.0)
        for method in self.methods:
            # a quantizer (KIVI) stores every token: one cell at budget 1.0
            for budget in [1.0] if method in storage_names() else self.budgets:
                yield dict(library="modalkv", model=model, task=task, length=length, seed=seed,
                           method=self.label(method), budget=float(budget))


def cell_key(row: dict) -> tuple:
    return tuple(str(row[k]) if k != "budget" else f"{float(row[k]):g}" for k in KEYS)


def done_keys(path: Path) -> set:
    if not path.exists():
        return set()
    df = pd.read_csv(path)
    return {cell_key(r) for r in df.to_dict("records")}


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path) as f:
            header = f.readline().strip().split(",")
        if header != COLUMNS:
            raise ValueError(f"{path} was written with other columns ({len(header)} vs {len(COLUMNS)} now, by an "
                             f"older modalkv); write to a new results file")
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)  # one schema for every task (and for kvpress rows)
    df.to_csv(path, mode="a", header=not path.exists(), index=False)


def environment() -> dict:
    return {
        "modalkv": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_sidecar(path: Path, config: BenchConfig) -> None:
    side = path.with_suffix(".json")
    side.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(side.read_text())["runs"] if side.exists() else []
    runs.append({"config": asdict(config), "environment": environment()})
    side.write_text(json.dumps({"runs": runs}, indent=2))


def add_ratios(df):
    """Decode speed-up and memory ratio of every row against the full cache of the same group and library."""
    group = ["library", "model", "task", "length", "seed"]
    full = df[df.method == "full"].set_index(group)[["decode_ms", "kv_kept_bytes", "score"]]
    full.columns = ["full_decode_ms", "full_kv_kept_bytes", "full_score"]
    df = df.drop(columns=[c for c in full.columns if c in df.columns]).join(full, on=group)
    df["speedup_vs_full"] = df.full_decode_ms / df.decode_ms
    df["kv_ratio_vs_full"] = df.kv_kept_bytes / df.full_kv_kept_bytes
    return df

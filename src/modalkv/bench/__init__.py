"""Benchmark harness: ``modalkv bench`` (run cells) and ``modalkv report`` (tables and plots)."""

from .report import write_report
from .runner import run_bench
from .sweep import BenchConfig, add_ratios

__all__ = ["BenchConfig", "run_bench", "add_ratios", "write_report"]

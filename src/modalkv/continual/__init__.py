"""Continual adaptation of a frozen model through a fixed-size bank of induced KV memories (InduceKV).

:class:`InduceKV` is the method; :mod:`.memory` holds the examples, entries and bank, :mod:`.selection` the
consolidation (greedy, bilevel, random) and the retrieval calibration, :mod:`.frozen` the forward passes through
the frozen model. The benchmark is :mod:`modalkv.bench.continual`, the task streams :mod:`modalkv.tasks.continual`.
"""

from .frozen import embed, sequence_nll
from .memory import Candidates, Example, MemoryBank, extract_candidates
from .method import InduceKV, continual_metrics
from .selection import Bilevel, greedy_select, k_center, project_capped_simplex

__all__ = ["Example", "InduceKV", "MemoryBank", "Candidates", "Bilevel", "extract_candidates", "embed",
           "sequence_nll", "continual_metrics", "project_capped_simplex", "greedy_select", "k_center"]

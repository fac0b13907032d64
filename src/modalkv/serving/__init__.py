"""modalkv compression inside vLLM's CPU build (an optional plugin; see docs/serving.md).

Nothing here imports vLLM: :mod:`modalkv.serving.policy` (budgets, block plans, the selection) is plain modalkv and
runs anywhere; :mod:`modalkv.serving.vllm_patches` holds every change to vLLM internals and is imported only by the
plugin entry point :func:`modalkv.serving.plugin.register`, inside vLLM's own processes.
"""

from .policy import SERVABLE_METHODS, ServingConfig, block_plan, select_kept

__all__ = ["SERVABLE_METHODS", "ServingConfig", "block_plan", "select_kept"]

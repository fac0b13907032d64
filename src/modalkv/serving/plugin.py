"""vLLM general-plugin entry point (``vllm.general_plugins``): vLLM calls :func:`register` in each of its processes.

The patches are applied only when the server was started for modalkv (``MODALKV_VLLM_METHOD`` set, as
``modalkv serve`` does); otherwise vLLM runs unchanged even though this package is installed in its environment.
"""

from __future__ import annotations

import os

from .policy import ENV_METHOD


def register() -> None:
    if not os.environ.get(ENV_METHOD):
        return
    from . import vllm_patches  # refuses another vLLM version with a clear error

    vllm_patches.install()

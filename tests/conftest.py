"""Pytest fixtures and settings; the shared helpers are in helpers.py (``from helpers import ...``)."""

from __future__ import annotations

import warnings

import pytest
import torch

# Re-exported for test files on other branches that still write ``from conftest import ...`` (to be removed once
# they are merged).
from helpers import (  # noqa: F401
    EVICTING,
    SMALL,
    VOCAB,
    Recorder,
    clone_model,
    left_pad,
    masked_reference,
    prompt,
    run_steps,
    tiny_gemma3,
    tiny_llama,
)

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)


@pytest.fixture(params=["sdpa", "eager"])
def impl(request):
    return request.param

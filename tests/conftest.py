"""Pytest fixtures and settings; the shared helpers are in helpers.py (test files write ``from helpers import ...``)."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)


@pytest.fixture(params=["sdpa", "eager"])
def impl(request):
    return request.param

"""Shared fixtures. Ray-based fixtures (one local Ray per test session) live here too."""

from __future__ import annotations

import os

import pytest
import torch

# Keep tests deterministic and light on this 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

"""MIL tests use one torch thread: the models are tiny, and on a shared 2-core machine a second OpenMP
thread spins against other processes (10x slower under load) instead of helping."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(_few_threads: None) -> None:
    torch.set_num_threads(1)

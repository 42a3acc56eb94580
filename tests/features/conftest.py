"""Feature tests run torch on ONE intra-op thread.

With several engineers' test runs sharing two cores, two OpenMP threads spin against each other: building
ResNet-50 took 9.5 s with 2 threads vs 1.0 s with 1 (measured under a load average of ~10). DataLoader workers
already take the other core in the loader tests.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(_few_threads: None) -> None:  # runs after the root conftest's 2-thread setting
    import torch

    torch.set_num_threads(1)

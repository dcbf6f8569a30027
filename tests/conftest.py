"""Shared test setup: make ``tests.*`` importable under plain ``pytest`` too, one intra-op thread, a fixed seed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The test models are tiny: with several intra-op threads on a busy 2-core machine every small matmul pays
# for thread wake-ups (measured: 0.7 s vs 3 ms per tiny-Llama forward).  LORAKIT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("LORAKIT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _global_seed() -> None:
    """Each test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(1234)

"""Shared test setup: one torch thread (tiny matmuls run far faster than with two contending
threads on a small CI machine), quiet optional-kernel warnings, the `gpu` fixture. Helpers the
tests import live in tests/helpers.py."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")

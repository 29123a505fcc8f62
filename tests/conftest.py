"""Shared fixtures."""

import os

import pytest
import torch

# The CLI keeps freed memory in glibc (alexnet/runtime/memory.py) when it starts. Tests call
# main() inside long-lived test processes, where that setting would stay for every later
# test; full runs with it lost a test worker now and then (not understood yet). The setting
# itself is tested in a fresh process (test_engines.py).
os.environ.setdefault("ALEXNET_MALLOC", "default")


@pytest.fixture
def one_thread():
    """Tiny convolutions are fastest (and least disturbed by a busy machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

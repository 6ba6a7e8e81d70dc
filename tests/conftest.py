"""Fixtures shared by several test modules."""

import pytest


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and stay fast on a loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

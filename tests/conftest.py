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


def pytest_collection_modifyitems(config, items):
    """End-to-end (`workflow`) tests first: with `-n 2` the long ones then overlap instead of ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("workflow") is None)

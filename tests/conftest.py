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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """End-to-end (`workflow`) tests first: with `-n 2` the long ones then overlap instead of ending the run alone.
    Under `--dist loadgroup`, an `xdist_group` test whose nodeid lacks its `@group` would be scheduled on
    any worker (pytest-xdist 3.8 with pytest 9.2 silently does this): stop instead of running a group twice."""
    items.sort(key=lambda item: item.get_closest_marker("workflow") is None)
    if getattr(config.option, "loadgroup", False):
        ungrouped = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if ungrouped:
            raise pytest.UsageError(f"--dist loadgroup does not group {ungrouped[0]} (and {len(ungrouped) - 1} more): "
                                    "pytest-xdist cannot tag this pytest's nodeids; install the pinned pytest")

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


# Seconds each long test took in CI (2 workers on 2 cores), for ordering only: with `-n 2 --dist loadgroup`
# a worker takes the next test when it is nearly idle, so longest-first keeps the two ending together.
DURATION_HINTS = {
    "test_workflow_on_stories260k_and_incremental_reruns": 320,
    "test_workflow_on_random_qwen2": 220,
    "test_every_baseline_runs_through_the_plan_and_search_rules": 190,
    "test_recovery_of_a_compressed_and_the_dense_model_reported_against_their_sources": 170,
    "test_local_gpu_jobs_run_one_at_a_time_unless_shared": 150,
    "test_killed_speed_resumes_with_the_remaining_rounds": 110,
    "test_killed_compress_resumes_with_the_identical_checkpoint": 90,
    "test_killed_zero_shot_resumes_from_the_request_cache": 75,
    "test_killed_activations_stage_resumes_where_it_stopped": 70,
    "test_killed_perplexity_resumes_with_the_identical_result": 60,
    "test_activations_run_fits_its_memory_request_and_disk_formula": 46,
    "test_a_failed_rule_prints_its_error_line_on_the_console": 38,
}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """End-to-end (`workflow`) tests first, longest first: with `-n 2` the long ones then overlap instead of
    ending the run alone (the xdist groups, several tests each, are scheduled before any single test).
    Under `--dist loadgroup`, an `xdist_group` test whose nodeid lacks its `@group` would be scheduled on
    any worker (pytest-xdist 3.8 with pytest 9.2 silently does this): stop instead of running a group twice."""
    items.sort(key=lambda item: (item.get_closest_marker("workflow") is None,
                                 -DURATION_HINTS.get(getattr(item, "originalname", item.name), 0)))
    if getattr(config.option, "loadgroup", False):
        ungrouped = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if ungrouped:
            raise pytest.UsageError(f"--dist loadgroup does not group {ungrouped[0]} (and {len(ungrouped) - 1} more): "
                                    "pytest-xdist cannot tag this pytest's nodeids; install the pinned pytest")

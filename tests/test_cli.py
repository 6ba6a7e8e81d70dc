"""`flattengpt plan|similarity|show` on a small results tree, run as a subprocess."""

import subprocess
import sys

import numpy as np
import pytest

from flattengpt.plan import make_plan
from flattengpt.provenance import write_json
from flattengpt.similarity import compute_all

from .test_similarity import random_states, write_activations


def flattengpt(*args):
    return subprocess.run([sys.executable, "-m", "flattengpt.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results/tiny/calib/{similarity, remove-2/plan.json, by-hand/plan.json}, as the workflow lays them out."""
    root = tmp_path_factory.mktemp("run") / "results"
    calib = root / "tiny" / "calib"
    act = write_activations(calib / "activations", random_states(num_layers=6, seed=3))
    arrays = compute_all(act, calib / "similarity", cka_max_tokens=20)
    counts = {"total": 1000, "per_block": [100] * 6}
    write_json(calib / "remove-2" / "plan.json", make_plan(arrays["cosine"], counts, {"remove_blocks": 2}).to_json())
    plan_file = root.parent / "my_plan.yaml"
    plan_file.write_text("groups: [[1, 2, 3]]\n")
    write_json(calib / "by-hand" / "plan.json",
               make_plan(arrays["cosine"], counts, {"plan_file": str(plan_file)}).to_json())
    return root, arrays


def test_plan_command(results):
    root, arrays = results
    path = root / "tiny" / "calib" / "remove-2" / "plan.json"
    done = flattengpt("plan", path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"== plan {path}" in out
    assert "target          remove_blocks=2" in out
    assert "blocks          6 -> 4 (k = 2 removed)" in out
    assert "parameters      1,000 -> 800 (ratio removed 0.2000)" in out
    assert "new block 0: block 0 kept" in out
    # the steps table: two rows, the first merge is the most similar adjacent pair of blocks
    first = int(np.argmax(np.diag(arrays["cosine"], 1)[:-1]))
    assert f"    1  {first}" in out and "greedy steps" in out


def test_plan_command_on_a_folder_lists_every_plan(results):
    root, _ = results
    done = flattengpt("plan", root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("== plan ") == 2
    assert "plan written by hand" in done.stdout and "blocks 1-3 flattened (3 blocks" in done.stdout


def test_similarity_command(results):
    root, arrays = results
    done = flattengpt("similarity", root, "--matrix", "cosine", "--top", "3")
    assert done.returncode == 0, done.stderr
    S = arrays["cosine"]
    i, j = np.triu_indices(7, 1)
    best = np.argsort(-S[i, j], kind="stable")[:3]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("    ") and line.split()[0].isdigit()]
    assert [(r[1], r[2]) for r in rows] == [(f"X{i[b]}", f"X{j[b]}") for b in best]
    assert [float(r[4]) for r in rows] == pytest.approx(S[i[best], j[best]], abs=1e-6)


def test_similarity_smallest_distance_and_lowest_influence(results):
    root, arrays = results
    sim_dir = root / "tiny" / "calib" / "similarity"
    done = flattengpt("similarity", sim_dir, "--matrix", "angular_distance", "--top", "1")
    D = arrays["angular_distance"]
    off = D + np.eye(7) * 9
    i, j = np.unravel_index(np.argmin(np.triu(off) + np.tril(np.ones((7, 7))) * 9), D.shape)
    assert f"X{i}  X{j}" in done.stdout
    done = flattengpt("similarity", sim_dir / "block_influence.csv", "--matrix", "block_influence", "--top", "2")
    lowest = np.argsort(arrays["block_influence"], kind="stable")[:2]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("    ") and line.split()[0].isdigit()]
    assert [int(r[1]) for r in rows] == list(lowest)


def test_show_command(results):
    root, _ = results
    done = flattengpt("show", root)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("== similarity ") == 1 and out.count("== plan ") == 2
    assert out.index("== similarity") < out.index("== plan")
    for view in ("cosine:", "cka:", "angular_distance:", "block influence"):
        assert view in out


def test_missing_results_are_reported(tmp_path):
    done = flattengpt("plan", tmp_path)
    assert done.returncode == 1 and "no plan.json" in done.stderr
    done = flattengpt("show", tmp_path / "nowhere")
    assert done.returncode == 1 and "not a directory" in done.stderr

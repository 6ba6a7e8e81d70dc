"""The real Snakemake workflow, run end to end on tiny real and random models.

Each test works in its own directory with its own config.yaml and calls the Snakemake CLI in a
subprocess, as a user would.
"""

import json
import re
import subprocess
import sys

import pytest
import yaml

from flattengpt.activations import load_layer
from flattengpt.similarity import load_matrix

from .models_for_tests import REPO, STORIES, make_model_with_tokenizer

pytestmark = pytest.mark.workflow

SIMILARITY = ["cosine", "angular_distance", "cka", "block_influence"]


def snakemake(workdir, *args, check=True):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--scheduler", "greedy", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def planned_jobs(workdir) -> dict[str, int]:
    """rule -> job count of a dry run."""
    out = snakemake(workdir, "-n").stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def write_config(workdir, config):
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def base_config(model_path, n_samples=6, seq_len=32):
    return {
        "models": {"tiny": {"source": "local", "path": str(model_path)}},
        "calibration": {"plays": {"source": "embedded", "name": "shakespeare-calibration",
                                  "n_samples": n_samples, "seq_len": seq_len, "seed": 1}},
        "targets": {"k2": {"remove_blocks": 2}},
        "compute": {"device": "cpu", "threads": 1},
    }


def assert_outputs(workdir, num_layers, n_samples, seq_len):
    root = workdir / "results" / "tiny" / "plays"
    model = json.loads((workdir / "results" / "tiny" / "model.json").read_text())
    assert model["num_hidden_layers"] == num_layers
    manifest = json.loads((root / "activations" / "manifest.json").read_text())
    assert manifest["files"] == [f"layer_{i:03d}.safetensors" for i in range(num_layers + 1)]
    hidden, positions = load_layer(root / "activations", num_layers)
    assert hidden.shape == (n_samples, seq_len, model["hidden_size"])
    for name in SIMILARITY:
        assert (root / "similarity" / f"{name}.png").stat().st_size > 1000
    cosine, labels = load_matrix(root / "similarity" / "cosine.csv")
    assert cosine.shape == (num_layers + 1, num_layers + 1) and len(labels) == num_layers + 1
    plan = json.loads((root / "k2" / "plan.json").read_text())
    assert plan["remove_blocks"] == 2 and sum(len(g) for g in plan["groups"]) == num_layers
    assert len(plan["groups"]) == num_layers - 2
    assert plan["provenance"]["package"]["source_sha256"]
    for log in ("calibration", "activations", "similarity"):
        assert (root / "logs" / f"{log}.log").stat().st_size > 0
    return plan


@pytest.mark.skipif(not STORIES.exists(), reason="needs ../shared/data")
def test_workflow_on_stories260k_and_incremental_reruns(tmp_path):
    write_config(tmp_path, base_config(STORIES))
    snakemake(tmp_path)
    assert_outputs(tmp_path, num_layers=5, n_samples=6, seq_len=32)

    assert planned_jobs(tmp_path) == {}, "a second invocation has nothing to do"

    config = base_config(STORIES)
    config["targets"]["k2"]["remove_blocks"] = 1
    write_config(tmp_path, config)
    assert planned_jobs(tmp_path) == {"plan": 1, "all": 1}, "a changed target reruns only the plan"

    config = base_config(STORIES, n_samples=5)
    write_config(tmp_path, config)
    assert planned_jobs(tmp_path) == {"calibration": 1, "activations": 1, "similarity": 1, "plan": 1, "all": 1}
    snakemake(tmp_path)
    assert_outputs(tmp_path, num_layers=5, n_samples=5, seq_len=32)


def test_workflow_on_random_qwen2(tmp_path):
    model = make_model_with_tokenizer(tmp_path / "model", "qwen2", num_hidden_layers=6)
    config = base_config(model)
    config["targets"]["k2"]["max_group_size"] = 2
    config["targets"]["ratio"] = {"ratio": 0.3}
    write_config(tmp_path, config)
    snakemake(tmp_path)
    plan = assert_outputs(tmp_path, num_layers=6, n_samples=6, seq_len=32)
    assert max(len(g) for g in plan["groups"]) <= 2
    ratio_plan = json.loads((tmp_path / "results" / "tiny" / "plays" / "ratio" / "plan.json").read_text())
    assert ratio_plan["remove_blocks"] >= 1 and 0 < ratio_plan["ratio_achieved"] < 1


def test_bad_config_fails_before_any_job(tmp_path):
    write_config(tmp_path, {
        "models": {"m": {"source": "local", "path": str(tmp_path / "missing")}},
        "calibration": {"c": {"source": "local", "path": str(tmp_path / "nope.txt")}},
        "targets": {"t": {"remove_blocks": 3}, "r": {"ratio": 1.2}},
    })
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "targets.r.ratio: 1.2 is greater than or equal to the maximum of 1" in text
    write_config(tmp_path, {
        "models": {"m": {"source": "local", "path": str(tmp_path / "missing")}},
        "calibration": {"c": {"source": "local", "path": str(tmp_path / "nope.txt")}},
        "targets": {"t": {"remove_blocks": 3}},
    })
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "models.m.path" in text and "calibration.c.path" in text
    assert not (tmp_path / "results").exists()


def test_lint_is_clean(tmp_path):
    write_config(tmp_path, base_config(make_model_with_tokenizer(tmp_path / "model", "llama")))
    result = snakemake(tmp_path, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr

"""A hub model id resolves offline from a Hugging Face cache, as on an air-gapped compute node.

The cache is laid out by hand exactly as huggingface_hub writes it (refs/main -> snapshot folder);
huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE at import, so each check runs in a subprocess.
"""

import json
import os
import shutil
import subprocess
import sys

from .models_for_tests import make_model_with_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache, model_dir, repo_id="tiny-org/tiny-qwen2"):
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def run_offline(cache, code):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_hub_id_resolves_from_offline_cache(tmp_path):
    snapshot = fill_cache(tmp_path / "hub", make_model_with_tokenizer(tmp_path / "model", "qwen2"))
    path = run_offline(tmp_path / "hub", "from flattengpt.models import resolve_model; "
                       "print(resolve_model({'source': 'hub', 'id': 'tiny-org/tiny-qwen2'}))")
    assert os.path.samefile(path, snapshot)
    layers = run_offline(tmp_path / "hub", "from flattengpt.config import model_config_json; "
                         "print(model_config_json({'source': 'hub', 'id': 'tiny-org/tiny-qwen2'})['num_hidden_layers'])")
    assert int(layers) == json.loads((snapshot / "config.json").read_text())["num_hidden_layers"]


def test_uncached_hub_id_fails_clearly_offline(tmp_path):
    (tmp_path / "hub").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", "from flattengpt.models import resolve_model; "
                             "resolve_model({'source': 'hub', 'id': 'nobody/nothing'})"],
                            capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "nobody/nothing" in result.stderr

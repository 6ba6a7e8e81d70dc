"""Every long stage survives SIGKILL: kill the whole Snakemake run mid-stage, then resume as documented.

The documented resume after a kill is `snakemake --unlock`, then the same command again. Each test
starts the Snakemake CLI in its own process group, waits until the stage under test has saved some
progress (its state file under .resume/), kills the whole group with SIGKILL, resumes, and checks
that the log says it resumed, that the state is gone and that the output equals an uninterrupted
run's (the same stage function called here, on the same inputs, with the job's one thread).
Tiny random models and small local texts keep each test short; zero-shot needs ../shared's task files.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from .models_for_tests import REPO, SAMPLE_TEXT, SHARED, STORIES, make_model_with_tokenizer
from .test_workflow import AIR_GAPPED, base_config, snakemake, write_config

pytestmark = pytest.mark.workflow

def kill_when(workdir, targets, saved_enough, timeout=400):
    """Run Snakemake on `targets`; SIGKILL its whole process group once `saved_enough()` is true."""
    # the command test_workflow.snakemake runs, so that the resume is "the same command again"
    # (the speed stage's resume key includes its thread count, which follows --cores)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--scheduler", "greedy", *targets]
    output = open(workdir / "killed-run.out", "w")
    proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=AIR_GAPPED)
    deadline, progress = time.time() + timeout, None
    while time.time() < deadline and proc.poll() is None:
        try:
            progress = saved_enough()
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, sqlite3.Error):
            progress = None
        if progress:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    output.close()
    assert progress, ("the stage ended (or never started) before it could be killed mid-way:\n"
                      + (workdir / "killed-run.out").read_text()[-3000:])
    return progress


def resume(workdir, targets):
    """The documented resume: unlock, then the same command again."""
    snakemake(workdir, "--unlock")
    result = snakemake(workdir, *targets, check=False)
    text = result.stdout + result.stderr
    assert "IncompleteFilesException" not in text, "the plain rerun after a kill needs rerun-incomplete:\n" + text
    assert result.returncode == 0, text
    return result


def state(path):
    return json.loads(path.read_text())


def uninterrupted(stage, *args, **kwargs):
    """A stage called in this process with one thread, as the rule's job runs it (compute.threads: 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return stage(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def small_config(tmp_path, layers=12, n_samples=8, seq_len=128):
    """base_config on a deep random model, with small local texts: tokenizing the embedded corpora takes longer
    than the stages under test."""
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 12)
    config = base_config(deep_model(tmp_path, layers))
    config["calibration"]["plays"] = {"source": "local", "path": str(text), "n_samples": n_samples,
                                      "seq_len": seq_len, "seed": 1}
    config["evaluation"]["perplexity"]["corpora"] = {"tragedies": {"source": "local", "path": str(text)}}
    return config


def deep_model(root, layers=12):
    """A random Llama slow enough per block to be caught mid-stage on a 2-core machine."""
    return make_model_with_tokenizer(root / "model", "llama", num_hidden_layers=layers, hidden_size=256,
                                     intermediate_size=768, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                     max_position_embeddings=512)


def test_killed_perplexity_resumes_with_the_identical_result(tmp_path):
    from flattengpt.stages import perplexity_stage

    config = small_config(tmp_path)
    config["evaluation"]["perplexity"].update(seq_len=256, max_windows=10, batch_size=1, checkpoint_every=1)
    write_config(tmp_path, config)
    target = ["results/tiny/dense/eval/perplexity/tragedies.json"]
    state_dir = tmp_path / "results" / "tiny" / "dense" / "eval" / ".resume" / "perplexity.tragedies"
    killed_at = kill_when(tmp_path, target, lambda: len(state(state_dir / "state.json")["nll"]) >= 2 and
                          len(state(state_dir / "state.json")["nll"]))
    out = tmp_path / target[0]
    assert not out.exists()

    resume(tmp_path, target)
    resumed = json.loads(out.read_text())
    assert resumed["resumed_from_window"] >= killed_at and resumed["n_windows"] == 10
    log = (tmp_path / "results" / "tiny" / "dense" / "eval" / "logs" / "perplexity.tragedies.log").read_text()
    assert f"resuming from saved progress: {resumed['resumed_from_window']} of 10 windows" in log
    assert not state_dir.exists(), "the state is removed on completion"

    options = {key: config["evaluation"]["perplexity"][key] for key in ("seq_len", "max_windows", "batch_size")}
    fresh = uninterrupted(perplexity_stage, tmp_path / "results" / "tiny" / "model.json", None, "tragedies",
                          config["evaluation"]["perplexity"]["corpora"]["tragedies"], options,
                          {"device": "cpu", "dtype": "float32"}, tmp_path / "fresh.json", {}, checkpoint_every=1)
    assert fresh["resumed_from_window"] == 0
    assert fresh["perplexity"] == resumed["perplexity"] and fresh["mean_nll"] == resumed["mean_nll"], \
        "bit-identical to an uninterrupted run"
    assert fresh["n_predicted_tokens"] == resumed["n_predicted_tokens"]


def test_killed_compress_resumes_with_the_identical_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from flattengpt.stages import compress_stage

    config = small_config(tmp_path)
    config["methods"] = {"flattengpt": {"method": "flattengpt"}}
    write_config(tmp_path, config)
    root = tmp_path / "results" / "tiny" / "plays" / "k2"
    target = ["results/tiny/plays/k2/flattengpt/model"]
    state_file = root / ".resume" / "flattengpt" / "state.json"
    killed_at = kill_when(tmp_path, target, lambda: state(state_file)["next_group"] >= 2 and
                          state(state_file)["next_group"])

    resume(tmp_path, target)
    model_dir = root / "flattengpt" / "model"
    resumed = json.loads((model_dir / "compression.json").read_text())
    assert resumed["resumed_from_group"] >= killed_at
    log = (root / "logs" / "compress.flattengpt.log").read_text()
    assert f"resuming after group {resumed['resumed_from_group'] - 1}" in log
    assert not state_file.parent.exists()
    resumed_tensors = {f.name: load_file(f) for f in sorted(model_dir.glob("*.safetensors"))}

    method = {"method": "flattengpt", "lambda_factor": 10, "compensation_target": "flattened",
              "attn_compensation": False}
    fresh = uninterrupted(compress_stage, tmp_path / "results" / "tiny" / "model.json",
                          tmp_path / "results" / "tiny" / "plays" / "tokens.safetensors", root / "flattengpt" / "plan.json",
                          tmp_path / "fresh", None, method, {"device": "cpu", "dtype": "float32", "batch_size": 8}, {})
    assert fresh["resumed_from_group"] == 0
    assert fresh["calibration_nll"] == resumed["calibration_nll"] and fresh["groups"] == resumed["groups"]
    fresh_tensors = {f.name: load_file(f) for f in sorted((tmp_path / "fresh").glob("*.safetensors"))}
    assert fresh_tensors.keys() == resumed_tensors.keys()
    for name, tensors in fresh_tensors.items():
        assert tensors.keys() == resumed_tensors[name].keys()
        for key, tensor in tensors.items():
            assert torch.equal(tensor, resumed_tensors[name][key]), key


def test_killed_speed_resumes_with_the_remaining_rounds(tmp_path):
    from flattengpt.stages import speed_stage

    config = small_config(tmp_path, layers=6)
    config["methods"] = {"drop": {"method": "drop"}}
    config["evaluation"]["speed"] = {"prompt_len": 64, "decode_tokens": 4, "warmup": 1, "repeats": 12}
    write_config(tmp_path, config)
    base = tmp_path / "results" / "tiny" / "plays" / "k2" / "drop"
    target = ["results/tiny/plays/k2/drop/eval/speed.json"]
    state_file = base / "eval" / ".resume" / "speed" / "state.json"
    killed_at = kill_when(tmp_path, target, lambda: len(state(state_file)["seconds"]["dense"]["prefill"]))

    resume(tmp_path, target)
    resumed = json.loads((base / "eval" / "speed.json").read_text())
    assert resumed["resume"]["resumed"] and resumed["resume"]["memory_pass"] == ["dense", "compressed"]
    assert resumed["resume"]["timed_runs"]["dense"]["prefill"] >= killed_at
    assert "resuming from saved progress" in (base / "eval" / "logs" / "speed.log").read_text()
    assert not state_file.parent.exists()

    options = {"batch_size": 1, "interleave": True, **config["evaluation"]["speed"]}
    fresh = uninterrupted(speed_stage, tmp_path / "results" / "tiny" / "model.json", base / "model", options,
                          {"device": "cpu", "dtype": "float32"}, tmp_path / "fresh.json", {})
    assert not fresh["resume"]["resumed"]

    def shape(value):
        """The record's structure: keys, list lengths and types, not the timings."""
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items() if k != "resume"}
        if isinstance(value, list):
            return [shape(v) for v in value]
        return type(value).__name__

    assert shape(resumed["models"]) == shape(fresh["models"]) and resumed.keys() == fresh.keys()
    assert len(resumed["models"]["dense"]["decode_ms_per_token_runs"]) == 12
    assert resumed["settings"].keys() == fresh["settings"].keys()


@pytest.mark.skipif(SHARED is None or not STORIES.exists(), reason="needs ../shared/data (task files, stories260K)")
def test_killed_zero_shot_resumes_from_the_request_cache(tmp_path):
    """The JSON-lines request cache (one line per scored request, flushed as it comes) is the saved progress."""
    pytest.importorskip("lm_eval")
    config = base_config(STORIES)
    config["evaluation"]["zero_shot"] = {"tasks": ["arc_easy"], "limit": 150, "batch_size": 1,
                                         "data_dir": str(SHARED / "tasks" / "lm_eval_jsonl")}
    write_config(tmp_path, config)
    target = ["results/tiny/dense/eval/zero_shot/arc_easy.json"]
    resume_dir = tmp_path / "results" / "tiny" / "dense" / "eval" / ".resume"

    def scored():
        files = list(resume_dir.glob("zero_shot.arc_easy.*.jsonl"))
        if len(files) != 1:
            return 0
        rows = files[0].read_text().count("\n")  # complete lines: scored requests
        return rows if rows >= 20 else 0

    killed_at = kill_when(tmp_path, target, scored)
    resume(tmp_path, target)
    log = (tmp_path / "results" / "tiny" / "dense" / "eval" / "logs" / "zero_shot.arc_easy.log").read_text()
    cached = [int(line.split("Cached requests: ")[1].split(",")[0]) for line in log.splitlines()
              if "Cached requests: " in line]
    assert cached and max(cached) >= killed_at, "the rerun scored only the requests the killed run had not"
    assert not list(resume_dir.glob("zero_shot.arc_easy.*")), "the cache is removed on completion"
    assert not list(tmp_path.rglob("*.db")), "no SQLite (pickling) cache is ever written"
    out = tmp_path / target[0]
    resumed = json.loads(out.read_text())

    from flattengpt.stages import zero_shot_stage

    options = {"data_dir": config["evaluation"]["zero_shot"]["data_dir"], "limit": 150, "num_fewshot": 0,
               "batch_size": 1}
    fresh = uninterrupted(zero_shot_stage, tmp_path / "results" / "tiny" / "model.json", None, "arc_easy", options,
                          {"device": "cpu", "dtype": "float32"}, tmp_path / "fresh" / "eval" / "zero_shot" / "a.json",
                          {})
    assert fresh["metrics"] == resumed["metrics"] and fresh["n_samples"] == resumed["n_samples"]

"""Sizing of 7B-70B runs: exact parameter counts from config.json, the README table, the resources a
Slurm dry run resolves, and one GPU job at a time on a local machine."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from flattengpt import sizing
from flattengpt.checkpoint import Checkpoint
from flattengpt.cli import main

from .models_for_tests import ARCHITECTURES, REPO, make_model, make_model_with_tokenizer


# ----------------------------------------------------------------------------- shapes and parameter counts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parameter_count_from_config_json_matches_the_checkpoint(tmp_path, arch):
    path = make_model(tmp_path, arch)
    shapes = sizing.Shapes.from_config(json.loads((path / "config.json").read_text()))
    counts = Checkpoint(path).parameter_counts()
    assert shapes.total_params == counts["total"]
    assert shapes.block_params == counts["per_block"][0]
    assert shapes.non_block_params == counts["non_block"]


def test_llama2_parameter_counts_and_paper_targets():
    shapes = {name: sizing.Shapes.from_config(config) for name, config in sizing.LLAMA2_CONFIGS.items()}
    assert shapes["LLaMA-2-7B"].total_params == 6_738_415_616
    assert shapes["LLaMA-2-13B"].total_params == 13_015_864_320
    assert shapes["LLaMA-2-70B"].total_params == 68_976_648_192
    # METHOD.md: 7 of 32, 10 of 40 and 16 of 80 blocks at the paper's ratios
    assert [shapes[name].remove_blocks_for(sizing.PAPER_RATIOS[name]) for name in shapes] == [7, 10, 16]


def test_missing_shape_field_names_the_field():
    config = dict(sizing.LLAMA2_CONFIGS["LLaMA-2-7B"])
    del config["intermediate_size"]
    with pytest.raises(sizing.SizingError, match="intermediate_size"):
        sizing.Shapes.from_config(config)


def test_formulas_follow_the_code():
    """A few terms written out by hand from the module docstring's formulas."""
    shapes = sizing.Shapes.from_config(sizing.LLAMA2_CONFIGS["LLaMA-2-7B"])
    settings = sizing.default_settings(n_samples=128, seq_len=2048, max_tokens=None, store_dtype="float32",
                                       dtype="float32", device="cpu")
    need = sizing.stage_need("activations", shapes, settings)
    hidden_state = 128 * 2048 * 4096 * 4
    assert need.disk_bytes == 33 * 128 * 2048 * 4096 * 4 + 2 * hidden_state  # all tokens, float32 + resume state
    assert need.gpus == 0 and need.device_bytes == 0  # cpu: everything on the host
    capped = sizing.stage_need("activations", shapes, sizing.replace(settings, max_tokens=32768, store_dtype="bfloat16"))
    assert capped.disk_bytes == 33 * 32768 * 4096 * 2 + 2 * hidden_state  # 256 positions of each of 128 sequences
    assert sizing.retry_factor(1) == 1 and sizing.retry_factor(3) == 2


def test_visible_gpus():
    assert sizing.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert sizing.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert sizing.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == 1


# ----------------------------------------------------------------------------- README and CLI


def test_readme_table_is_current():
    readme = (REPO / "README.md").read_text()
    assert sizing.readme_table(readme) == sizing.readme_section(), (
        "README.md's sizing section is stale: run `flattengpt resources-table --readme README.md`")


def test_cli_resources_sizes_a_config_json(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(sizing.LLAMA2_CONFIGS["LLaMA-2-70B"]))
    assert main(["resources", str(config), "--n-samples", "128", "--seq-len", "2048", "--dtype", "bfloat16",
                 "--ratio", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "68,976,648,192" in out and "k = 16 blocks removed" in out
    assert re.search(r"^\s+compress\s+1\s", out, re.M)
    assert main(["resources", str(tmp_path / "missing.json")]) == 1


# ----------------------------------------------------------------------------- the workflow's resource function

SLURM_PROFILE = REPO / "slurm" / "config.yaml"


def _dry_run_jobs(stdout: str) -> list[dict]:
    """(rule, wildcards, resources) of every job a dry run prints."""
    jobs = []
    for block in re.split(r"\n(?=\[.*\]\n(?:local)?rule )", stdout):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if not rule or not res:
            continue
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        jobs.append({"rule": rule.group(1),
                     "wildcards": dict(kv.split("=", 1) for kv in wildcards.group(1).split(", ")) if wildcards else {},
                     "resources": dict(kv.split("=", 1) for kv in res.group(1).split(", "))})
    return jobs


@pytest.mark.workflow
@pytest.mark.skipif(not SLURM_PROFILE.is_file(), reason="slurm/config.yaml (the Slurm profile) is not in this checkout")
def test_slurm_dry_run_resolves_the_readme_figures(tmp_path):
    """`snakemake -n --profile slurm` on LLaMA-2-7B and 70B given as config.json alone (no weights)."""
    models = {}
    for key, name in (("llama2-7b", "LLaMA-2-7B"), ("llama2-70b", "LLaMA-2-70B")):
        model_dir = tmp_path / "models" / key
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text(json.dumps(sizing.LLAMA2_CONFIGS[name]))
        models[key] = {"source": "local", "path": str(model_dir)}
    config = {
        "models": models,
        "calibration": {"paper": {"source": "embedded", "name": "shakespeare-calibration", "n_samples": 128,
                                  "seq_len": 2048}},
        "targets": {"r21": {"ratio": 0.21, "max_group_size": 2}, "r20": {"ratio": 0.20, "max_group_size": 2}},
        "runs": [{"model": "llama2-7b", "calibration": "paper", "target": "r21"},
                 {"model": "llama2-70b", "calibration": "paper", "target": "r20"}],
        "evaluation": {"perplexity": {"corpora": {"eval": {"source": "embedded", "name": "shakespeare-eval"}}}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")  # --profile slurm resolves ./slurm in the working directory
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile", "slurm", "--snakefile",
                             str(REPO / "Snakefile")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = _dry_run_jobs(result.stdout)
    assert jobs, result.stdout

    readme = (REPO / "README.md").read_text()
    names = {"llama2-7b": "LLaMA-2-7B", "llama2-70b": "LLaMA-2-70B"}
    base = sizing.default_settings(n_samples=128, seq_len=2048)
    seen = set()
    for job in jobs:
        stage = job["rule"]
        if stage not in sizing.GPU_STAGES:
            continue
        name = names[job["wildcards"]["model"]]
        shapes = sizing.Shapes.from_config(sizing.LLAMA2_CONFIGS[name])
        settings = sizing.replace(base, remove_blocks=shapes.remove_blocks_for(sizing.PAPER_RATIOS[name]))
        need = sizing.stage_need(stage, shapes, settings)
        expected = sizing.slurm_resources(need)
        got = job["resources"]
        assert (int(got["gpu"]), int(got["mem_mb"]), int(got["runtime"])) == \
            (expected["gpu"], expected["mem_mb"], expected["runtime"]), (stage, name, got)
        # the same figures are the README table's row
        row = (f"| {name} | {shapes.total_params:,} | {stage} | {need.gpus} | {sizing._gib(need.device_bytes)} "
               f"| {sizing._gib(need.host_bytes)} | {sizing._gib(need.disk_bytes)} | {need.minutes} |")
        assert row in readme, row
        seen.add((name, stage))
    assert {stage for _, stage in seen} >= {"activations", "compress", "perplexity", "speed", "generate"}
    assert {name for name, _ in seen} == {"LLaMA-2-7B", "LLaMA-2-70B"}


def test_cheap_rules_run_on_the_submit_host():
    """model, calibration, similarity, plan and report never wait in the Slurm queue; heavy rules get sized resources."""
    text = {p.stem: p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk")}
    rules = {}
    for source in text.values():
        for match in re.finditer(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", source, re.M | re.S):
            rules[match.group(1)] = match.group(2)
    for rule in ("model", "calibration", "similarity", "plan", "report"):
        assert "localrule: True" in rules[rule], rule
    for rule in sizing.GPU_STAGES:
        assert f'**stage_resources("{rule}")' in rules[rule] and f'stage_threads("{rule}")' in rules[rule], rule
        assert "lambda" not in rules[rule], rule


# ----------------------------------------------------------------------------- local GPU jobs


def _job_events(log: str, rule: str) -> list[str]:
    """'start'/'end' of every job of `rule`, in the order Snakemake logged them ('rule r:' ... 'jobid: N', 'Finished jobid: N')."""
    events, jobs = [], set()
    for block in re.split(r"^\[[^\]\n]+\]\n", log, flags=re.M):
        start = re.match(rf"(?:local)?rule {rule}:", block)
        jobid = re.search(r"jobid: (\d+)", block)
        if start and jobid:
            jobs.add(jobid.group(1))
            events.append("start")
        finished = re.match(r"Finished jobid: (\d+)", block)
        if finished and finished.group(1) in jobs:
            events.append("end")
    return events


@pytest.mark.workflow
def test_local_gpu_jobs_run_one_at_a_time_unless_shared(tmp_path):
    """Two GPU-requesting compress jobs with 2 free cores: one after the other, unless cluster.share_gpu
    (the same workdir twice, the second time forcing only the two compress jobs)."""
    model = make_model_with_tokenizer(tmp_path / "models", "llama")
    config = {
        "models": {"tiny": {"source": "local", "path": str(model)}},
        "calibration": {"plays": {"source": "embedded", "name": "shakespeare-calibration", "n_samples": 4,
                                  "seq_len": 16}},
        "targets": {"k1": {"remove_blocks": 1}},
        "methods": {"drop": {"method": "drop"}, "flatten-only": {"method": "flatten-only"}},
        "compute": {"device": "auto", "threads": 1},
    }
    targets = [f"results/tiny/plays/k1/{m}/model" for m in ("drop", "flatten-only")]
    # A visible GPU as far as the workflow can tell; torch finds no CUDA here, so `auto` runs on the CPU.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    for share_gpu, force in ((False, []), (True, ["--forcerun", "compress"])):
        config["cluster"] = {"share_gpu": share_gpu}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                                 "--cores", "2", "--scheduler", "greedy", *targets, *force], cwd=tmp_path,
                                capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        log = result.stdout + result.stderr
        assert re.search(r"resources: .*gpu=1", log), log  # each compress job asks for the GPU slot
        events = _job_events(log, "compress")
        if share_gpu:
            assert events == ["start", "start", "end", "end"], log  # both run at once on the one card
        else:
            assert events == ["start", "end", "start", "end"], log  # the second starts when the first has ended


def test_activations_run_fits_its_memory_request_and_disk_formula(tmp_path):
    """A real activations run on the CPU (a random Llama, 32 x 512 tokens) fits the memory its job asks for,
    and writes the disk the formula says.

    Only an upper bound is asserted: inside pytest the allocator reuses memory freed by earlier tests,
    so the measured rise is not the stage's own peak (measured in a fresh process on this machine:
    609 MiB above the level before the run, formula 531 MiB before the margins x 1.10 + 3 GiB).
    """
    import threading

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flattengpt.activations import compute_activations

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=8000, max_position_embeddings=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 8000, (32, 512))
    compute_activations(tmp_path / "m", ids[:2, :16], tmp_path / "warm", state_dir=tmp_path / "ws", batch_size=8)

    def rss():
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    base, peak, stop = rss(), [0], threading.Event()

    def sample():
        while not stop.wait(0.002):
            peak[0] = max(peak[0], rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    compute_activations(tmp_path / "m", ids, tmp_path / "out", state_dir=tmp_path / "s", batch_size=8,
                        store_dtype="float32", max_tokens=None, dtype="float32", checkpoint_every=1)
    stop.set()
    thread.join()
    shapes = sizing.Shapes.from_config(json.loads((tmp_path / "m" / "config.json").read_text()))
    settings = sizing.default_settings(n_samples=32, seq_len=512, batch_size=8, dtype="float32",
                                       store_dtype="float32", max_tokens=None, device="cpu")
    need = sizing.stage_need("activations", shapes, settings)
    formula = (need.host_bytes - sizing.HOST_BASE) / sizing.HOST_SLACK
    measured = peak[0] - base
    assert measured <= need.host_bytes, (measured / 2**20, formula / 2**20)
    files = sum(f.stat().st_size for f in (tmp_path / "out").glob("layer_*.safetensors"))
    assert abs(files - (5 * 32 * 512 * 1024 * 4)) < 2**20  # (L+1) * n*T*H*s, plus headers

"""The shipped Slurm profile against a real Slurm (a single-node controller + node daemon).

`.ci/run` starts one with `.ci/slurm-up.sh` and sets FLATTENGPT_REQUIRE_SLURM=1, so that in CI
these tests fail rather than skip when the cluster is not reachable. Elsewhere they skip unless
`sinfo` answers. Each run uses the repository's `slurm/` profile unchanged, from a working
directory that holds the workflow as a user's checkout does, and calls
`snakemake --cores 8 --profile slurm` as the README says.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from flattengpt.joblock import JobConflictError, claim_output, claim_path

from .models_for_tests import REPO, make_model_with_tokenizer
from .test_workflow import AIR_GAPPED, base_config, write_config

# one cluster: its tests run one after another on one xdist worker (`--dist loadgroup`)
pytestmark = [pytest.mark.workflow, pytest.mark.xdist_group("slurm")]

WORKFLOW_FILES = ["Snakefile", "workflow", "scripts", "envs", "slurm", "profiles"]
# the profile's first status check comes after 20 s, every later one 10 s later than the one before
FAST_POLLING = ["--slurm-init-seconds-before-status-checks", "2"]


def slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return result.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in result.stdout.split())


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not slurm_up():
        if os.environ.get("FLATTENGPT_REQUIRE_SLURM") == "1":
            pytest.fail("FLATTENGPT_REQUIRE_SLURM=1 but no Slurm controller answers `sinfo` (see .ci/slurm-up.sh)")
        pytest.skip("no Slurm cluster here (`sinfo` does not answer); .ci/slurm-up.sh starts one")


def checkout(workdir):
    """A working directory laid out like the repository: the workflow files, and the user's config."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        (workdir / name).symlink_to(REPO / name)
    return workdir


def snakemake_cmd(*args):
    return [sys.executable, "-m", "snakemake", *args]


def run(workdir, *args, check=True):
    result = subprocess.run(snakemake_cmd(*args), cwd=workdir, capture_output=True, text=True, env=AIR_GAPPED)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def slurm_run(workdir, *targets, check=True, retries=0):
    return run(workdir, "--cores", "8", "--profile", "slurm", *FAST_POLLING, "--retries", str(retries), *targets,
               check=check)


def submitted(output: str) -> dict[str, str]:
    """rule -> Slurm job id, from the executor's 'Job N has been submitted with SLURM jobid M (log: ...)' lines."""
    return {m.group(2): m.group(1)
            for m in re.finditer(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/", output)}


def job_field(job_id: str, field: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S*)", text)
    return match.group(1) if match else ""


def small_config(model, **overrides):
    config = base_config(model)
    config["compute"] = {"device": "auto", "threads": 1}  # auto: the cluster is asked for a GPU
    config["methods"] = {"flattengpt": {"method": "flattengpt"}}
    config["evaluation"]["speed"]["enabled"] = False
    config.update(overrides)
    return config


def test_profile_runs_the_workflow_through_sbatch_like_a_local_run(tmp_path):
    model = make_model_with_tokenizer(tmp_path / "model", "llama")
    targets = ["results/tiny/plays/k2/flattengpt/model", "results/tiny/plays/k2/flattengpt/eval/perplexity/tragedies.json"]
    on_slurm, local = checkout(tmp_path / "slurm"), checkout(tmp_path / "local")
    for workdir in (on_slurm, local):
        write_config(workdir, small_config(model))

    result = slurm_run(on_slurm, *targets)
    jobs = submitted(result.stdout + result.stderr)
    # heavy rules went through sbatch; cheap ones (model, calibration, similarity, plan) ran on the submit host
    assert {"activations", "compress", "perplexity"} <= set(jobs), result.stderr
    assert not {"model", "calibration", "plan"} & set(jobs)
    for rule, job_id in jobs.items():
        assert list((on_slurm / ".snakemake" / "slurm_logs").glob(f"rule_{rule}/**/{job_id}.log")), rule
    # device: auto asked the cluster for a GPU, with the memory the resource function computed
    for rule in ("activations", "compress", "perplexity"):
        assert "gpu:1" in job_field(jobs[rule], "TresPerJob"), rule  # sbatch --gpus=1
    assert job_field(jobs["compress"], "JobState") == "COMPLETED"

    run(local, "--cores", "2", *targets)
    name = "results/tiny/plays/k2/flattengpt"
    for shard in sorted((local / name / "model").glob("*.safetensors")):
        expected, got = load_file(shard), load_file(on_slurm / name / "model" / shard.name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), shard.name
    ppl = [json.loads((w / name / "eval/perplexity/tragedies.json").read_text()) for w in (local, on_slurm)]
    assert ppl[0]["perplexity"] == ppl[1]["perplexity"]
    assert not list(on_slurm.glob("results/**/*.claim")), "claims are released when jobs end"


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_run_orphan_is_refused_then_cancelled_and_compress_resumes(tmp_path):
    """SIGKILL of Snakemake leaves its compress job running; the resume refuses to run beside it, cancel-orphans
    scancels it, and the rerun continues from the last finished group to the uninterrupted result."""
    model = make_model_with_tokenizer(tmp_path / "model", "llama", num_hidden_layers=12, hidden_size=256,
                                      intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=32)
    workdir = checkout(tmp_path / "wd")
    config = small_config(model)
    config["calibration"]["plays"].update(n_samples=16, seq_len=256)
    config["targets"] = {"k5": {"remove_blocks": 5, "max_group_size": 2}}
    write_config(workdir, config)
    target = "results/tiny/plays/k5/flattengpt/model"
    out = workdir / target
    state = workdir / "results/tiny/plays/k5/.resume/flattengpt/state.json"

    # the stages before compress run locally: the other test covers them on Slurm, and each Slurm job costs
    # about half a minute of status polling here
    run(workdir, "--cores", "2", "results/tiny/plays/k5/flattengpt/plan.json")
    proc = subprocess.Popen(snakemake_cmd("--cores", "8", "--profile", "slurm", *FAST_POLLING, "--retries", "0",
                                          target), cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=AIR_GAPPED)

    def groups_done():
        try:
            return json.loads(state.read_text())["next_group"] >= 1
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return proc.poll() is not None and "ended"
    assert _wait_for(groups_done, 400, "compress to finish a group") is True, "the run ended before compress"
    orphan = json.loads(claim_path(out).read_text())["slurm_job_id"]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # trap: the job outlives Snakemake; hold it so that it is certainly still live when the resume starts
    assert job_field(orphan, "JobState") == "RUNNING"
    subprocess.run(["scontrol", "suspend", orphan], check=True)
    try:
        run(workdir, "--profile", "slurm", "--unlock")
        refused = slurm_run(workdir, target, check=False)
        assert refused.returncode != 0
        text = refused.stdout + refused.stderr
        assert "still live" in text and orphan in text and "flattengpt cancel-orphans" in text, text
        assert not submitted(text), "nothing was submitted beside the orphan"
        assert job_field(orphan, "JobState") == "SUSPENDED"
        # the job-level claim refuses a copy that gets past the workflow check (e.g. from another directory)
        with pytest.raises(JobConflictError, match=f"scancel {orphan}"):
            claim_output(out)
    finally:
        subprocess.run(["scontrol", "resume", orphan])

    cancel = subprocess.run([sys.executable, "-m", "flattengpt.cli", "cancel-orphans"], cwd=workdir,
                            capture_output=True, text=True)
    assert cancel.returncode == 0 and f"cancelled: job {orphan}" in cancel.stdout, cancel.stdout + cancel.stderr
    assert job_field(orphan, "JobState") in ("CANCELLED", "")
    finished = json.loads(state.read_text())["next_group"]

    run(workdir, "--profile", "slurm", "--unlock")
    resumed = slurm_run(workdir, target)
    assert submitted(resumed.stdout + resumed.stderr).keys() == {"compress"}
    record = json.loads((out / "compression.json").read_text())
    assert record["resumed_from_group"] >= finished >= 1
    log = (workdir / "results/tiny/plays/k5/logs/compress.flattengpt.log").read_text()
    assert f"resuming after group {record['resumed_from_group'] - 1}" in log
    assert not state.parent.exists(), "progress is removed when the stage completes"

    # identical to an uninterrupted compression of the same plan and tokens
    from flattengpt.compress import compress_model
    from flattengpt.data import load_tokens

    ids, _ = load_tokens(workdir / "results/tiny/plays/tokens.safetensors")
    plan = json.loads((workdir / "results/tiny/plays/k5/flattengpt/plan.json").read_text())
    compress_model(model, plan["groups"], ids, tmp_path / "fresh")
    for shard in sorted((tmp_path / "fresh").glob("*.safetensors")):
        expected, got = load_file(shard), load_file(out / shard.name)
        assert all(torch.equal(expected[k], got[k]) for k in expected), shard.name


def test_claim_of_a_live_slurm_job_refuses_until_it_is_cancelled(tmp_path):
    job = subprocess.run(["sbatch", "--parsable", "--wrap", "sleep 300", "-o", "/dev/null"], capture_output=True,
                         text=True, check=True).stdout.strip()
    output = tmp_path / "out"
    try:
        _wait_for(lambda: job_field(job, "JobState") == "RUNNING", 60, "the job to start")
        claim_path(output).write_text(json.dumps({"host": "node-x", "pid": 1, "slurm_job_id": job}))
        with pytest.raises(JobConflictError, match=f"Slurm job {job} is RUNNING"):
            claim_output(output)
    finally:
        subprocess.run(["scancel", job])
    _wait_for(lambda: job_field(job, "JobState") in ("CANCELLED", ""), 60, "the job to end")
    claim = claim_output(output)  # the holder is gone: its claim is stale and taken over
    assert json.loads(claim.read_text())["pid"] == os.getpid()

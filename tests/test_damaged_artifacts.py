"""No damaged artifact passes for a finished one, and a kill at any moment resumes to the same files.

One uninterrupted run of a small full workflow (tiny random llama; calibration, activations,
similarity, plan, compress with `drop`, perplexity, generations, report) is built once for this module. Then:

- **the damage table**: each case copies that finished tree, damages one artifact the way a user
  would meet it (a truncated file, a deleted tokenizer, half a plan, a flipped byte, a deleted or
  corrupt manifest, a changed model file) and runs the workflow's own command. The run must refuse
  before any job starts, name the damaged file, the rule that wrote it and the `--forcerun` command
  that rebuilds it, and leave every file of the tree as it was (nothing deleted, nothing rewritten).
  For half a plan.json (the case that used to delete both checkpoints), the refusal's own command is
  run and must make the tree whole again, equal to the uninterrupted run.
  The config-time half of the table (plan files, text files, JSON lines, model directories,
  devices, names) is tests/test_input_validation.py: those are refused before any job, in-process.
- **kill and resume**: the same run from scratch, SIGKILLed (the whole process group) at 10 seeded
  random moments of its timeline, each time resumed with the documented command (`snakemake
  --unlock`, then the same command), then compared file by file with the uninterrupted run: tensors
  exactly, JSON and CSV without timings, provenance and paths, every manifest verified, no temporary
  file left (an orphan temporary checkpoint planted before the first run included).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flattengpt.integrity import MANIFEST_SUFFIX, scan_results

from .models_for_tests import REPO, make_model_with_tokenizer
from .test_workflow import AIR_GAPPED, base_config, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.xdist_group("damaged-artifacts")]

RESULTS = Path("results")
PLAYS = RESULTS / "tiny" / "plays"
DROP = PLAYS / "k2" / "drop"


def command(workdir) -> list[str]:
    """The documented command (`snakemake --cores 2`), pointed at this repository's Snakefile."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--cores", "2", "--scheduler", "greedy"]


def run(workdir, *args) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir) + list(args), capture_output=True, text=True, env=AIR_GAPPED)


def small_config(model) -> dict:
    config = base_config(model)
    config["methods"] = {"drop": {"method": "drop"}}  # 9 jobs: every stage once, the run stays short
    config["evaluation"]["dense"] = False
    config["evaluation"]["speed"]["enabled"] = False
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(workdir, seconds) of one uninterrupted run."""
    root = tmp_path_factory.mktemp("finished")
    model = make_model_with_tokenizer(root / "model", "llama")
    workdir = root / "work"
    workdir.mkdir()
    write_config(workdir, small_config(model))
    started = time.perf_counter()
    result = run(workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir, time.perf_counter() - started


def snapshot(workdir) -> dict[str, str]:
    """sha256 of every file under results/ and of the model directory (relative paths)."""
    files = {}
    for path in sorted((workdir / RESULTS).rglob("*")):
        if path.is_file():
            files[path.relative_to(workdir).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def copy_tree(finished, tmp_path) -> Path:
    workdir = tmp_path / "work"
    shutil.copytree(finished[0], workdir, symlinks=True)
    return workdir


# ----------------------------------------------------------------------------- the damage table


def truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(int(path.stat().st_size * keep))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def change_a_digit(path: Path) -> None:
    """Same size, still valid JSON: a value changed (e.g. rms_norm_eps 1e-06 -> 2e-06)."""
    text = path.read_text()
    index = re.search(r"\d", text[text.index("rms_norm_eps"):]).start() + text.index("rms_norm_eps")
    path.write_text(text[:index] + str((int(text[index]) + 1) % 10) + text[index + 1:])


def first(pattern: str):
    return lambda workdir: sorted(workdir.glob(pattern))[0]


# name: (what to damage, how, the artifact the refusal names, the rule that wrote it, a phrase of the problem)
DAMAGES = {
    "truncated activations layer": (first("results/tiny/plays/activations/layer_002.safetensors"), truncate,
                                    PLAYS / "activations", "activations", "(truncated)"),
    "activations' own manifest deleted": (first("results/tiny/plays/activations/manifest.json"), Path.unlink,
                                          PLAYS / "activations", "activations", "manifest.json"),
    "calibration tokens cut": (first("results/tiny/plays/tokens.safetensors"), truncate,
                               PLAYS / "tokens.safetensors", "calibration", "(truncated)"),
    "calibration record flipped byte": (first("results/tiny/plays/calibration.json"), flip_byte,
                                        PLAYS / "calibration.json", "calibration", "recorded content"),
    "similarity matrix flipped byte": (first("results/tiny/plays/similarity/cosine.csv"), flip_byte,
                                       PLAYS / "similarity" / "cosine.csv", "similarity", "recorded content"),
    "half of plan.json cut off": (first("results/tiny/plays/k2/drop/plan.json"), truncate,
                                  DROP / "plan.json", "plan", "(truncated)"),
    "checkpoint without tokenizer.json": (first("results/tiny/plays/k2/drop/model/tokenizer.json"), Path.unlink,
                                          DROP / "model", "compress", "tokenizer.json"),
    "checkpoint without compression.json": (first("results/tiny/plays/k2/drop/model/compression.json"),
                                            Path.unlink, DROP / "model", "compress", "compression.json"),
    "checkpoint shard cut in half": (first("results/tiny/plays/k2/drop/model/*.safetensors"), truncate,
                                     DROP / "model", "compress", "(truncated)"),
    "checkpoint shard flipped byte": (first("results/tiny/plays/k2/drop/model/*.safetensors"), flip_byte,
                                      DROP / "model", "compress", "recorded content"),
    "perplexity result truncated": (first("results/tiny/plays/k2/drop/eval/perplexity/tragedies.json"), truncate,
                                    DROP / "eval" / "perplexity" / "tragedies.json", "perplexity", "(truncated)"),
    "report table appended to": (first("results/report/results.csv"),
                                 lambda p: p.write_text(p.read_text() + "x,y\n"),
                                 RESULTS / "report" / "results.csv", "report", "appended to"),
    "a manifest that is not JSON": (first(f"results/tiny/plays/k2/drop/plan.json{MANIFEST_SUFFIX}"),
                                    lambda p: p.write_text('{"files": '), DROP / "plan.json", None,
                                    "is not valid JSON"),
    "model config.json changed (same size)": (lambda w: Path(json.loads(
        (w / "results/tiny/model.json").read_text())["path"]) / "config.json", change_a_digit,
        RESULTS / "tiny" / "model.json", "model", "model file config.json"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_artifact_is_refused_before_any_job_and_nothing_is_removed(finished, tmp_path, case):
    where, damage, artifact, rule, phrase = DAMAGES[case]
    workdir = copy_tree(finished, tmp_path)
    if case.startswith("model config.json"):  # the model lives beside the finished tree: use a copy
        model = tmp_path / "model"
        shutil.copytree(json.loads((workdir / "results/tiny/model.json").read_text())["path"], model)
        config = small_config(model)
        write_config(workdir, config)
        # the copy is what rule model recorded: rewrite model.json's record of where it lives, as a move would
        record = workdir / "results/tiny/model.json"
        manifest = workdir / f"results/tiny/model.json{MANIFEST_SUFFIX}"
        text = json.loads(manifest.read_text())
        text["covers"] = {str(model.resolve()): list(text["covers"].values())[0]}
        manifest.write_text(json.dumps(text))
        where = lambda w: model / "config.json"  # noqa: E731
    damage(where(workdir))
    before = snapshot(workdir)
    result = run(workdir)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "nothing was run or deleted" in text, text
    assert f"damaged artifact {artifact.as_posix()}" in text, text
    if rule:
        assert f"(written by rule {rule})" in text
    assert phrase in text
    assert f"--forcerun {artifact.as_posix()}" in text
    assert "Building DAG of jobs" not in text and "Select jobs to execute" not in text  # refused before the DAG
    assert snapshot(workdir) == before  # nothing removed, nothing rewritten (the damaged file included)
    if case == "half of plan.json cut off":  # after a hard kill the rebuild needs --unlock first: never refused
        assert run(workdir, "--unlock").returncode == 0


@pytest.mark.parametrize("case", ["half of plan.json cut off"])
def test_the_refusals_command_makes_the_tree_whole(finished, tmp_path, case):
    where, damage, artifact, _, _ = DAMAGES[case]
    workdir = copy_tree(finished, tmp_path)
    damage(where(workdir))
    text = run(workdir).stderr
    rebuild = re.search(r"rebuild it with: .* --forcerun (\S+)", text).group(1)
    assert rebuild == artifact.as_posix()
    result = run(workdir, "--forcerun", rebuild)
    assert result.returncode == 0, result.stdout + result.stderr
    assert scan_results(workdir / RESULTS) == []
    assert same_results(finished[0], workdir) == []


def test_a_job_whose_input_lost_its_manifest_fails_naming_it_and_is_not_retried(finished, tmp_path):
    """An input without a manifest (interrupted, or written by an older version) is refused by the job
    that would read it; the failure is deterministic, so `retries: 1` does not repeat the work, and
    the upstream artifacts are all still there."""
    workdir = copy_tree(finished, tmp_path)
    plan = workdir / DROP / "plan.json"
    Path(str(plan) + MANIFEST_SUFFIX).unlink()
    shutil.rmtree(workdir / DROP / "model")  # so that compress runs and reads the plan
    upstream = {k: v for k, v in snapshot(workdir).items() if not k.startswith(DROP.as_posix() + "/model")
                and not k.startswith(DROP.as_posix() + "/eval") and not k.startswith("results/report")
                and "/logs/" not in k}
    result = run(workdir, "--keep-going")
    text = result.stdout + result.stderr
    assert result.returncode != 0
    # the console line names the file (failures.py), and the retry did not redo the work
    assert (f"rule compress failed: flattengpt.runtime.NotRetriedError: not retried: the previous attempt of this "
            f"job failed on something a retry cannot change (IntegrityError: rule compress: input not what its job "
            f"wrote, nothing was read: {DROP.as_posix()}/plan.json: {DROP.as_posix()}/plan.json has no manifest") in text
    log = (workdir / "results/tiny/plays/k2/logs/compress.drop.log").read_text()
    assert "rebuild it with: " in log and f"--forcerun {DROP.as_posix()}/plan.json" in log
    assert "compressing" not in log.lower() and "Writing model shards" not in log
    after = snapshot(workdir)
    assert all(after.get(k) == v for k, v in upstream.items())


# ----------------------------------------------------------------------------- kill and resume

VOLATILE = re.compile(r"provenance|sha256|created|seconds|time|elapsed|duration|peak|rss|host|finished|started|"
                      r"^path$|model_dir|_dir$|log", re.I)


def stable(value):
    """A JSON value without timings, provenance and absolute paths."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not VOLATILE.search(k)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return "<path>"
    return value


def compared_files(workdir) -> list[str]:
    root = workdir / RESULTS
    return sorted(p.relative_to(workdir).as_posix() for p in root.rglob("*")
                  if p.is_file() and not {"logs", "benchmarks", ".resume"} & set(p.relative_to(root).parts)
                  and not p.name.endswith((MANIFEST_SUFFIX, ".claim", ".failure.json")))


def same_results(reference, workdir) -> list[str]:
    """The differences between two results trees (empty when the same)."""
    import pandas as pd
    from safetensors.torch import load_file

    want, got = compared_files(reference), compared_files(workdir)
    differences = [f"only in the reference: {p}" for p in sorted(set(want) - set(got))]
    differences += [f"only in the resumed run: {p}" for p in sorted(set(got) - set(want))]
    for name in sorted(set(want) & set(got)):
        a, b = reference / name, workdir / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(a), load_file(b)
            if ta.keys() != tb.keys() or any(not ta[k].equal(tb[k]) for k in ta):
                differences.append(f"tensors differ: {name}")
        elif name.endswith(".json"):
            if stable(json.loads(a.read_text())) != stable(json.loads(b.read_text())):
                differences.append(f"JSON differs: {name}")
        elif name.endswith(".csv"):
            da, db = pd.read_csv(a), pd.read_csv(b)
            keep = [c for c in da.columns if not VOLATILE.search(c)]
            if list(da.columns) != list(db.columns) or not da[keep].equals(db[keep]):
                differences.append(f"CSV differs: {name}")
    leftovers = [p for p in (workdir / RESULTS).rglob("*.tmp")]
    differences += [f"temporary left behind: {p}" for p in leftovers]
    return differences


def test_killed_at_ten_random_moments_the_documented_resume_gives_the_same_files(finished, tmp_path):
    reference, seconds = finished
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(reference / "config.yaml", workdir / "config.yaml")
    # what a job killed while writing its checkpoint leaves (provenance.atomic_dir): removed when it reruns
    orphan = workdir / DROP / ".model.k1ll3d00.tmp"
    orphan.mkdir(parents=True)
    (orphan / "model-00001-of-00001.safetensors").write_bytes(b"partial")
    rng = random.Random(15)
    moments = sorted(rng.uniform(0.03, 0.97) * seconds for _ in range(10))  # on the uninterrupted timeline
    spent, kills, log = 0.0, 0, []
    for moment in moments:
        wait = max(0.5, moment - spent)
        out = open(workdir / f"killed-{kills}.out", "w")
        proc = subprocess.Popen(command(workdir), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=AIR_GAPPED)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        out.close()
        spent += wait
        log.append(f"{wait:.1f}s: {'killed' if proc.returncode == -signal.SIGKILL else proc.returncode}")
        if proc.returncode == 0:
            break  # finished before this moment came: the later moments have nothing to kill
        unlock = run(workdir, "--unlock")  # the documented resume: unlock, then the same command again
        assert unlock.returncode == 0, unlock.stderr
    assert kills >= 7, log
    result = run(workdir)
    text = result.stdout + result.stderr
    assert "IncompleteFilesException" not in text and result.returncode == 0, text
    assert scan_results(workdir / RESULTS) == []
    assert same_results(reference, workdir) == [], log  # includes: no temporary file left anywhere
    assert not orphan.exists()

"""Manifests (flattengpt.integrity) and model-directory checks, without Snakemake.

Each check is run against a damage made by hand (truncation, a deleted file, a flipped byte of the
same size) and against the intact artifact, so that a check that always passes or always fails is
caught; the workflow-level table is tests/test_damaged_artifacts.py.
"""

import json
import struct

import pytest

from flattengpt.checkpoint import model_dir_problems
from flattengpt.integrity import (IntegrityError, artifact_problems, forced_by, manifest_path, rebuild_command,
                                  refusal, remove_orphans, scan_results, verify_artifact, write_manifest)

from .models_for_tests import make_model, make_model_with_tokenizer


def flip_one_byte(path, offset=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def checkpoint_dir(tmp_path):
    out = tmp_path / "results" / "m" / "model"
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"a": 1}')
    (out / "weights.bin").write_bytes(bytes(range(256)) * 64)  # 16 KiB
    (out / "sub").mkdir()
    (out / "sub" / "tokenizer.json").write_text('{"vocab": [1, 2, 3]}')
    write_manifest(out, "compress", {"method": "drop"})
    return out


def test_a_whole_directory_passes_and_its_manifest_records_every_file(checkpoint_dir):
    manifest = json.loads(manifest_path(checkpoint_dir).read_text())
    assert manifest["rule"] == "compress" and manifest["wildcards"] == {"method": "drop"}
    assert sorted(manifest["files"]) == ["config.json", "sub/tokenizer.json", "weights.bin"]
    assert manifest["files"]["weights.bin"]["size"] == 16384
    assert artifact_problems(checkpoint_dir, hash_max_bytes=None) == []
    verify_artifact(checkpoint_dir, hash_max_bytes=None)


def test_truncation_deletion_and_content_changes_are_found(checkpoint_dir):
    (checkpoint_dir / "sub" / "tokenizer.json").unlink()
    with open(checkpoint_dir / "weights.bin", "r+b") as handle:
        handle.truncate(100)
    flip_one_byte(checkpoint_dir / "config.json")
    problems = artifact_problems(checkpoint_dir, hash_max_bytes=None)
    assert len(problems) == 3
    assert any("sub/tokenizer.json" in p and "missing" in p for p in problems)
    assert any("weights.bin" in p and "100 bytes, the manifest records 16384 (truncated)" in p for p in problems)
    assert any("config.json" in p and "content" in p for p in problems)
    with pytest.raises(IntegrityError) as caught:
        verify_artifact(checkpoint_dir, hash_max_bytes=None)
    message = str(caught.value)
    assert "written by rule compress" in message and f"--forcerun {checkpoint_dir.as_posix()}" in message


def test_contents_are_compared_only_up_to_the_hash_limit(checkpoint_dir):
    flip_one_byte(checkpoint_dir / "weights.bin", offset=5)  # same size, other bytes
    assert artifact_problems(checkpoint_dir, hash_max_bytes=1024) == []  # 16 KiB > limit: its size only
    assert len(artifact_problems(checkpoint_dir, hash_max_bytes=16384)) == 1
    assert len(artifact_problems(checkpoint_dir, hash_max_bytes=None)) == 1


def test_a_file_artifact_and_what_a_manifest_covers(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"x" * 4096)
    record = tmp_path / "results" / "model.json"
    record.parent.mkdir()
    record.write_text('{"path": "model"}')
    write_manifest(record, "model", covers=[model_dir], hash_max_bytes=1024)
    covers = json.loads(manifest_path(record).read_text())["covers"][str(model_dir.resolve())]
    assert covers == {"model.safetensors": {"size": 4096}}  # bigger than the limit: no hash recorded
    assert artifact_problems(record, None) == []
    (model_dir / "model.safetensors").write_bytes(b"x" * 100)
    (problem,) = artifact_problems(record, None)
    assert problem.startswith("model file model.safetensors") and "truncated" in problem
    record.write_text('{"path": "mode1"}')  # same size, other content
    assert len(artifact_problems(record, None)) == 2


def test_no_manifest_and_a_damaged_manifest_are_reported(tmp_path):
    artifact = tmp_path / "plan.json"
    artifact.write_text("{}")
    (problem,) = artifact_problems(artifact, None)
    assert "has no manifest" in problem and "interrupted" in problem
    write_manifest(artifact, "plan")
    manifest_path(artifact).write_text('{"files": ')
    with pytest.raises(IntegrityError, match="its manifest .* is not valid JSON"):
        artifact_problems(artifact, None)


def test_the_scan_skips_what_is_missing_as_a_whole_and_what_this_run_rebuilds(tmp_path, checkpoint_dir):
    results = tmp_path / "results"
    plan = results / "m" / "plan.json"
    plan.write_text('{"groups": [[1, 2]]}')
    write_manifest(plan, "plan")
    gone = results / "m" / "gone.json"
    gone.write_text("{}")
    write_manifest(gone, "plan")
    gone.unlink()  # missing as a whole: Snakemake rebuilds it
    (results / "m" / ".resume").mkdir()
    (results / "m" / ".resume" / "x.manifest.json").write_text("not scanned")
    assert scan_results(results) == []
    plan.write_text('{"groups": [[1, 3]]}')
    (checkpoint_dir / "config.json").unlink()
    assert [a.name for a, _ in scan_results(results)] == ["model", "plan.json"]
    assert [a.name for a, _ in scan_results(results, rebuilding={plan.as_posix()})] == ["model"]
    assert [a.name for a, _ in scan_results(results, rebuilding={"compress"})] == ["plan.json"]
    assert scan_results(results, rebuild_all=True) == []
    text = refusal(scan_results(results))
    assert text.startswith("2 finished artifact(s)") and "rebuild them all with:" in text


def test_forced_by_reads_snakemakes_force_options():
    assert forced_by(["snakemake", "--cores", "2"]) == (set(), False)
    assert forced_by(["snakemake", "-R", "a", "b", "--cores", "2", "target"]) == ({"a", "b"}, False)
    assert forced_by(["snakemake", "--forcerun=plan", "-F"]) == ({"plan"}, True)


def test_the_rebuild_command_is_the_runs_own_without_dry_run(monkeypatch):
    monkeypatch.setenv("FLATTENGPT_COMMAND", "/venv/bin/snakemake --cores 8 --profile slurm -n")
    assert rebuild_command("results/a b") == "snakemake --cores 8 --profile slurm --forcerun 'results/a b'"
    monkeypatch.setenv("FLATTENGPT_COMMAND", "/v/lib/python3.11/site-packages/snakemake/__main__.py --cores 2")
    assert rebuild_command("x") == "snakemake --cores 2 --forcerun x"
    monkeypatch.delenv("FLATTENGPT_COMMAND")
    assert rebuild_command("x", "y") == "snakemake --cores 2 --forcerun x y"


def test_orphans_of_a_killed_attempt_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "model"
    (tmp_path / ".model.abc123.tmp").mkdir()
    (tmp_path / ".model.abc123.tmp" / "shard").write_text("partial")
    (tmp_path / ".model.json.x.tmp").write_text("another output's temporary: kept")
    (tmp_path / "model.manifest.json").write_text("{}")  # stale: the output was deleted by Snakemake
    state = tmp_path / ".resume" / "compress"
    state.mkdir(parents=True)
    (state / "progress.json").write_text("{}")
    (state / ".progress.json.q.tmp").write_text("partial")
    removed = remove_orphans([out], [state])
    assert sorted(p.name for p in removed) == [".model.abc123.tmp", ".progress.json.q.tmp", "model.manifest.json"]
    assert (tmp_path / ".model.json.x.tmp").exists() and (state / "progress.json").exists()


# ----------------------------------------------------------------------------- model directories


def test_a_complete_model_directory_has_no_problems(tmp_path):
    assert model_dir_problems(make_model_with_tokenizer(tmp_path, "llama")) == []


def test_model_directory_problems_name_the_file_and_the_fix(tmp_path):
    model = make_model(tmp_path, "llama")  # no tokenizer
    (problem,) = model_dir_problems(model)
    assert "no tokenizer" in problem and "save_pretrained" in problem
    weights = model / "model.safetensors"
    (header,) = struct.unpack("<Q", weights.read_bytes()[:8])
    with open(weights, "r+b") as handle:
        handle.truncate(8 + header - 1)
    assert any(str(weights) in p and "truncated" in p for p in model_dir_problems(model))
    weights.rename(model / "pytorch_model.bin")
    (problem,) = model_dir_problems(model)
    assert "no safetensors weights" in problem and "pytorch_model.bin" in problem and "safe_serialization" in problem
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert "2 of the 2 weight shards" in model_dir_problems(model)[0]
    assert "does not exist" in model_dir_problems(tmp_path / "nowhere")[0]

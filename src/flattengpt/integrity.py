"""Integrity of artifacts: a manifest beside every output, checked before anything reads it.

Why: Snakemake calls an output finished when its path exists. A truncated activations file, a
model shard cut in half or a checkpoint missing its tokenizer.json therefore passed for finished,
and only a later job failed, far from the cause (`SafetensorError: invalid header length`, no file
named). So every job records what it wrote, and every job and every start of the workflow checks it:

- **Writing.** When a job's stage has returned, `write_manifest` records for each declared output
  `<output>.manifest.json` beside it: the rule and wildcards that wrote it and, for every file of
  the output (every file under it for a directory), its size and sha256. The model stage also
  records the model directory it resolved (its files are the input of every later stage, but not a
  Snakemake output). A job killed before that line leaves an output without a manifest, which
  Snakemake has marked incomplete and reruns (`rerun-incomplete: true` in the workflow profile).
- **Checking.** `verify_artifact` compares an artifact with its manifest: a missing file or a size
  that differs is always found; the content (sha256) is compared for files up to `hash_max_bytes`
  (`integrity.hash_max_mb`, default 16 MiB: every JSON, CSV, token file and tokenizer; null compares
  every file, which reads every byte: hours for 70B checkpoints, minutes for 135M). The workflow checks
  every manifest under results/ when it starts (before any job, a dry run included) and refuses to
  run while one is damaged, naming the file, the rule that wrote it and the command that rebuilds
  it; every job checks its own inputs again before it reads them (`runtime.start_job`).

An artifact that is missing as a whole is not damaged: Snakemake sees that it is missing and
rebuilds it. A file that a user added inside a directory output is not reported either.
Costs: writing reads every output byte once (sha256 at ~1 GB/s: about 3 minutes for a 140 GB 70B
checkpoint, small beside the hours of its compress job); checking costs one stat per file plus a
hash of each small file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Iterable

MANIFEST_SUFFIX = ".manifest.json"
DEFAULT_HASH_MAX_MB = 16
MANIFEST_VERSION = 1
# the folders under results/ that hold no declared output (resume state, logs, Snakemake's benchmark TSVs)
UNRECORDED_DIRS = {".resume", "logs", "benchmarks"}


class IntegrityError(ValueError):
    """An artifact differs from what the job that wrote it recorded (or has no record)."""


def manifest_path(artifact: str | os.PathLike) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


def hash_limit(hash_max_mb: float | None) -> int | None:
    """`integrity.hash_max_mb` in bytes (None: hash every file)."""
    return None if hash_max_mb is None else int(float(hash_max_mb) * 2**20)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files_of(root: Path) -> list[Path]:
    """Every file of an artifact: itself, or everything under a directory (sorted, links followed)."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file())


def describe_files(root: Path, hash_max_bytes: int | None = None, hash_all: bool = True) -> dict[str, dict]:
    """{relative path ("." for a file artifact): {size, sha256}}; sha256 of every file if hash_all,
    else only of files up to hash_max_bytes (the size alone for bigger ones)."""
    records = {}
    for path in _files_of(root):
        size = path.stat().st_size
        record = {"size": size}
        if hash_all or hash_max_bytes is None or size <= hash_max_bytes:
            record["sha256"] = sha256_file(path)
        records["." if path == root else path.relative_to(root).as_posix()] = record
    return records


def write_manifest(artifact: str | os.PathLike, rule: str, wildcards: dict | None = None,
                   covers: Iterable[str | os.PathLike] = (), hash_max_bytes: int | None = None) -> Path:
    """Record `artifact` (a file or a directory) beside it; `covers`: outside directories or files
    it stands for (the resolved model directory), recorded by size, and by hash up to hash_max_bytes."""
    from .provenance import write_json

    artifact = Path(artifact)
    if not artifact.exists():
        raise IntegrityError(f"rule {rule} finished but its output {artifact} does not exist")
    record = {
        "manifest_version": MANIFEST_VERSION,
        "artifact": artifact.as_posix(),
        "type": "directory" if artifact.is_dir() else "file",
        "rule": rule,
        "wildcards": dict(wildcards or {}),
        "files": describe_files(artifact),
        "covers": {str(Path(c).resolve()): describe_files(Path(c).resolve(), hash_max_bytes, hash_all=False)
                   for c in covers},
    }
    path = manifest_path(artifact)
    write_json(path, record)
    return path


def read_manifest(artifact: str | os.PathLike) -> dict | None:
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"damaged artifact {Path(artifact).as_posix()}: its manifest {path} is not valid JSON "
                             f"({err})") from err


def _compare(root: Path, files: dict[str, dict], hash_max_bytes: int | None, label: str) -> list[str]:
    problems = []
    for relative, want in files.items():
        path = root if relative == "." else root / relative
        name = str(path) if relative == "." else f"{relative} (in {root})"
        if not path.is_file():
            problems.append(f"{label}{name} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{label}{name} is {size} bytes, the manifest records {want['size']} "
                            f"({'truncated' if size < want['size'] else 'replaced or appended to'})")
        elif "sha256" in want and (hash_max_bytes is None or size <= hash_max_bytes):
            if sha256_file(path) != want["sha256"]:
                problems.append(f"{label}{name} has the recorded size but not the recorded content (sha256)")
    return problems


def artifact_problems(artifact: str | os.PathLike, hash_max_bytes: int | None, manifest: dict | None = None
                      ) -> list[str]:
    """What differs between `artifact` and its manifest ([] if whole); the manifest must exist."""
    artifact = Path(artifact)
    manifest = manifest if manifest is not None else read_manifest(artifact)
    if manifest is None:
        return [f"{artifact} has no manifest ({artifact.name}{MANIFEST_SUFFIX}): the job that wrote it was "
                "interrupted before it finished, or an older flattengpt wrote it"]
    problems = _compare(artifact, manifest["files"], hash_max_bytes, "")
    for outside, files in manifest.get("covers", {}).items():
        problems += _compare(Path(outside), files, hash_max_bytes, "model file ")
    return problems


# ----------------------------------------------------------------------------- messages


def rebuild_command(*artifacts: str | os.PathLike) -> str:
    """The command that rebuilds `artifacts`: the workflow's own command line (FLATTENGPT_COMMAND, set
    by the Snakefile) with `--forcerun <artifact>...`, dry-run flags left out."""
    words = shlex.split(os.environ.get("FLATTENGPT_COMMAND", "")) or ["snakemake", "--cores", "2"]
    words = [w for w in words if w not in ("-n", "--dry-run", "--dryrun")]
    if words[0].endswith(("snakemake", "snakemake/__main__.py")):  # a venv's entry point, or `python -m snakemake`
        words[0] = "snakemake"
    return shlex.join(words + ["--forcerun", *[Path(a).as_posix() for a in artifacts]])


def damage_report(artifact: str | os.PathLike, problems: list[str], manifest: dict | None) -> str:
    rule = manifest.get("rule") if manifest else None
    head = f"damaged artifact {Path(artifact).as_posix()}" + (f" (written by rule {rule})" if rule else "")
    lines = [head + ":", *[f"  - {p}" for p in problems]]
    if manifest and manifest.get("covers") and any(p.startswith("model file ") for p in problems):
        lines.append("  the model directory changed after rule model described it: restore its files (a local "
                     "model: copy it again; an embedded one is restored by the command below; a hub one: "
                     "`hf cache delete` that revision, then the command below)")
    lines.append(f"  rebuild it with: {rebuild_command(artifact)}")
    return "\n".join(lines)


def verify_artifact(artifact: str | os.PathLike, hash_max_bytes: int | None) -> None:
    """Raise IntegrityError (the file, the rule that wrote it, the command that rebuilds it) unless whole."""
    manifest = read_manifest(artifact)
    problems = artifact_problems(artifact, hash_max_bytes, manifest)
    if problems:
        raise IntegrityError(damage_report(artifact, problems, manifest))


# ----------------------------------------------------------------------------- the whole results tree


def manifests_under(root: str | os.PathLike) -> list[Path]:
    """Every manifest under `root` (resume state, logs and benchmark folders skipped)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in UNRECORDED_DIRS and not d.endswith(".tmp"))
        found += [Path(folder) / f for f in sorted(files) if f.endswith(MANIFEST_SUFFIX)]
    return found


def scan_results(root: str | os.PathLike = "results", hash_max_bytes: int | None = None,
                 rebuilding: Iterable[str] = (), rebuild_all: bool = False) -> list[tuple[Path, str]]:
    """(artifact, damage report) for every recorded artifact under `root` that is not whole.

    Skipped: an artifact missing as a whole (Snakemake rebuilds it; its stale manifest is removed
    when its job starts), and one this run rebuilds anyway (`rebuilding`: the --forcerun paths and
    rule names; `rebuild_all`: --forceall).
    """
    rebuilding = {Path(r).as_posix() for r in rebuilding}
    reports = []
    for path in manifests_under(root):
        artifact = path.with_name(path.name[: -len(MANIFEST_SUFFIX)])
        if not artifact.exists() or rebuild_all or artifact.as_posix() in rebuilding:
            continue
        try:
            manifest = read_manifest(artifact)
        except IntegrityError as err:
            reports.append((artifact, f"{err}\n  rebuild it with: {rebuild_command(artifact)}"))
            continue
        if manifest.get("rule") in rebuilding:
            continue
        problems = artifact_problems(artifact, hash_max_bytes, manifest)
        if problems:
            reports.append((artifact, damage_report(artifact, problems, manifest)))
    return reports


def forced_by(argv: list[str]) -> tuple[set[str], bool]:
    """(the --forcerun/-R targets, whether --forceall/-F) of a Snakemake command line: what it rebuilds
    anyway (the Snakefile is read before Snakemake's own settings are filled in)."""
    targets, forceall, collecting = set(), False, False
    for word in argv[1:]:
        if word in ("-R", "--forcerun"):
            collecting = True
        elif word.startswith("--forcerun="):
            targets.add(word.split("=", 1)[1])
        elif word in ("-F", "--forceall"):
            forceall, collecting = True, False
        elif word.startswith("-"):
            collecting = False
        elif collecting:
            targets.add(word)
    return targets, forceall


def dry_run(argv: list[str]) -> bool:
    """Whether a Snakemake command line is a dry run (-n, --dry-run, or -n among combined short flags
    such as -np): read from argv because the Snakefile is read before Snakemake's settings are."""
    for word in argv[1:]:
        if word in ("--dry-run", "--dryrun"):
            return True
        if re.fullmatch(r"-[A-Za-z]+", word) and "n" in word:
            return True
    return False


def refusal(damaged: list[tuple[Path, str]]) -> str:
    """The workflow's message when `scan_results` found damage: every report, then one command for all."""
    lines = [f"{len(damaged)} finished artifact(s) under results/ differ from what their jobs recorded; "
             "nothing was run or deleted:", *[report for _, report in damaged]]
    if len(damaged) > 1:
        lines.append(f"rebuild them all with: {rebuild_command(*[a for a, _ in damaged])}")
    return "\n".join(lines)


def start_run(argv: list[str], hash_max_mb: float | None, root: str | os.PathLike = "results") -> str | None:
    """What the Snakefile does once per run, in its main process: export the run's id (a retry of a job
    that failed on a bad input in this run stops at once, runtime.py) and command line (damage reports
    say how to rebuild) to its jobs, then scan `root`; returns the refusal, or None when all is whole.
    `--unlock` (which the rebuild command needs after a hard kill) and `--lint` are never refused."""
    import uuid

    os.environ["FLATTENGPT_RUN_ID"] = uuid.uuid4().hex
    os.environ["FLATTENGPT_COMMAND"] = shlex.join(argv)
    if {"--unlock", "--cleanup-metadata", "--cm", "--lint"} & set(argv):
        return None
    forced, forced_all = forced_by(argv)  # what this run rebuilds anyway
    damaged = scan_results(root, hash_limit(hash_max_mb), forced, forced_all)
    return refusal(damaged) if damaged else None


# ----------------------------------------------------------------------------- what a killed job leaves


def temporary_siblings(output: str | os.PathLike) -> list[Path]:
    """The temporary files and folders that `provenance.atomic_path`/`atomic_dir` make for `output`
    (`.<name>.<random>.tmp` beside it): a job killed while writing leaves them behind."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    # mkstemp/mkdtemp's random part has no dot, so `.model.json.<random>.tmp` is not `model`'s
    pattern = re.compile(rf"\.{re.escape(output.name)}\.[^.]+\.tmp")
    return sorted(p for p in output.parent.iterdir() if pattern.fullmatch(p.name))


def remove_orphans(outputs: Iterable[str | os.PathLike], state_dirs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Delete what a killed earlier attempt of this job left: the temporaries beside its outputs and
    inside its resume state, and the stale manifests of its outputs (Snakemake has deleted the outputs
    themselves). Only the job that holds the output's claim (joblock) calls this. Returns what it removed."""
    removed = []
    for output in outputs:
        stale = [*temporary_siblings(output), manifest_path(output)]
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif path.exists():
                path.unlink()
                removed.append(path)
    for state in state_dirs:
        state = Path(state)
        if state.is_dir():
            for path in sorted(state.rglob(".*.tmp"), reverse=True):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
                removed.append(path)
    return removed

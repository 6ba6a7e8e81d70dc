"""Job set-up shared by the rule scripts: logging into the rule's log file, threads, provenance."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .joblock import claim_output
from .provenance import provenance

# Exceptions that a retry of the same job on the same inputs raises again: a bad input, a missing
# file or package, a damaged artifact. Snakemake's `retries:` (there for a lost node, a time limit or
# an out-of-memory kill) would only repeat them, so the retry stops at once (see _refuse_a_repeat).
# RuntimeError (CUDA out of memory, NCCL) and OSError (a full disk, NFS) stay retried.
DETERMINISTIC_ERRORS = (ValueError, LookupError, TypeError, AttributeError, FileNotFoundError,
                        NotADirectoryError, IsADirectoryError, ImportError)


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB.

    Linux's VmHWM belongs to the address space and starts afresh at exec, unlike getrusage's
    ru_maxrss, which a child inherits from the process that forked it.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plain(value: Any) -> Any:
    """Snakemake's Namedlist/dict-likes as plain JSON-able values."""
    if hasattr(value, "items") and callable(value.items):  # dicts and Snakemake's Namedlists
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class NotRetriedError(ValueError):
    """A retry of a job whose earlier attempt in this run failed on a bad input."""


def _failure_record(snakemake) -> Path:
    return Path(str(snakemake.log[0]) + ".failure.json")


def _refuse_a_repeat(snakemake) -> None:
    """Stop a retry (`retries:`) of a job whose earlier attempt in this same run failed deterministically.

    The Snakefile gives every run an id (FLATTENGPT_RUN_ID, inherited by its jobs); a failed attempt
    records its error and the run id beside its log. A later attempt of the same run finds it and
    stops before any work; a new run (after the user fixed the input) has a new id and runs.
    """
    record_path, run_id = _failure_record(snakemake), os.environ.get("FLATTENGPT_RUN_ID")
    if run_id and record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
        if record.get("run_id") == run_id:
            error = str(record.get("error"))
            if not error.startswith("not retried"):
                head, _, rest = error.partition("\n")
                error = (f"not retried: the previous attempt of this job failed on something a retry cannot change "
                         f"({head}); fix that and run the workflow again" + (f"\n{rest}" if rest else ""))
            raise NotRetriedError(error)
    if record_path.exists():
        record_path.unlink()

    def record_deterministic_failure(kind, error, traceback):
        if run_id and issubclass(kind, DETERMINISTIC_ERRORS):
            try:
                text = str(error) if isinstance(error, NotRetriedError) else f"{kind.__name__}: {error}"
                record_path.write_text(json.dumps({"run_id": run_id, "rule": snakemake.rule, "error": text}))
            except OSError:
                pass
        previous_hook(kind, error, traceback)

    previous_hook = sys.excepthook
    sys.excepthook = record_deterministic_failure


def _hash_limit(snakemake) -> int | None:
    from .integrity import DEFAULT_HASH_MAX_MB, hash_limit

    section = (getattr(snakemake, "config", None) or {}).get("integrity") or {}
    return hash_limit(section.get("hash_max_mb", DEFAULT_HASH_MAX_MB))


def _paths(named) -> list[str]:
    """The paths of a Snakemake Namedlist (nested lists flattened)."""
    out = []
    for item in named:
        out += [str(i) for i in item] if isinstance(item, (list, tuple)) else [str(item)]
    return out


def verify_inputs(snakemake) -> None:
    """Check every input that the workflow wrote (under results/) against its manifest (integrity.py),
    before the stage reads it; all damaged inputs are reported at once."""
    from .integrity import IntegrityError, artifact_problems, damage_report, read_manifest

    limit, damaged, reports = _hash_limit(snakemake), [], []
    for path in dict.fromkeys(_paths(snakemake.input)):
        manifest = read_manifest(path)
        if manifest is None and Path(path).parts[:1] != ("results",):
            continue  # a user's file (text, plan file, task data): checked at config time
        problems = artifact_problems(path, limit, manifest)
        if problems:
            damaged.append(f"{path}: {problems[0]}" if len(problems) == 1 else path)
            reports.append(damage_report(path, problems, manifest))
    if reports:
        # the first line (what the console shows, failures.py) names the inputs; then the full reports
        raise IntegrityError(f"rule {snakemake.rule}: input not what its job wrote, nothing was read: "
                             + "; ".join(damaged) + "\n" + "\n".join(reports))


def start_job(snakemake) -> logging.Logger:
    """Send this job's logging, warnings, progress bars and tracebacks to its `log:` file, claim its
    output, clear what a killed earlier attempt left, and verify its inputs (integrity.py)."""
    log_path = snakemake.log[0]
    sys.stderr = open(log_path, "a", buffering=1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)], force=True)
    logging.captureWarnings(True)
    try:
        import torch

        torch.set_num_threads(max(1, int(snakemake.threads)))
    except ImportError:
        pass
    logger = logging.getLogger(f"flattengpt.{snakemake.rule}")
    logger.info("rule %s, wildcards %s", snakemake.rule, dict(snakemake.wildcards.items()))
    # One writer per output: refuse to run beside a live copy left by a killed Snakemake (joblock.py).
    claim_output(snakemake.output[0])
    _refuse_a_repeat(snakemake)
    from .integrity import remove_orphans

    state_dir = getattr(snakemake.params, "state_dir", None) if hasattr(snakemake, "params") else None
    for path in remove_orphans(_paths(snakemake.output), [state_dir] if state_dir else []):
        logger.info("removed %s, left by an interrupted earlier attempt", path)
    verify_inputs(snakemake)
    return logger


def finish_job(snakemake, covers: dict[str, list[str]] | None = None) -> None:
    """Record every output of this job in its manifest (integrity.py): the last thing a job does, so
    an output without one was not finished. `covers`: {output: [outside paths it stands for]}."""
    from .integrity import write_manifest

    limit = _hash_limit(snakemake)
    for path in _paths(snakemake.output):
        write_manifest(path, snakemake.rule, dict(snakemake.wildcards.items()), (covers or {}).get(path, ()),
                       hash_max_bytes=limit)


def job_provenance(snakemake, inputs: dict | None = None, **extra: Any) -> dict:
    """Provenance for an artifact of this job: the rule's params (its slice of the config), wildcards, inputs."""
    return provenance(
        params={k: _plain(v) for k, v in snakemake.params.items()},
        inputs=inputs,
        rule=snakemake.rule,
        wildcards=dict(snakemake.wildcards.items()),
        **extra,
    )


def optional_input(snakemake, name: str) -> str | None:
    """A named input that an input function may leave empty (e.g. no checkpoint for the dense model)."""
    value = snakemake.input.get(name)
    if not value:
        return None
    return value if isinstance(value, str) else str(value[0])

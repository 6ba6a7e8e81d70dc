"""Job set-up shared by the rule scripts: logging into the rule's log file, threads, provenance."""

from __future__ import annotations

import logging
import sys
from typing import Any

from .joblock import claim_output
from .provenance import provenance


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


def start_job(snakemake) -> logging.Logger:
    """Send this job's logging, warnings, progress bars and tracebacks to its `log:` file."""
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
    return logger


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

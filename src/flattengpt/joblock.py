"""One writer per output: a job claims its output before it starts, and refuses if a live copy holds it.

Why: after a SIGKILL of Snakemake (a lost login shell, a rebooted submit host) its Slurm jobs keep
running. Resuming then submits the same job again, and two copies would write the same resume state
and output side by side. Every rule script claims its first output through `claim_output` (called by
`runtime.start_job`): the claim is a small JSON file beside the output, `<output>.claim`, naming the
host, process and Slurm job that holds it. A second copy that finds a claim whose holder is still
alive (same host: the process exists and started when the claim says; on Slurm: `squeue` still lists
the job as pending or running) stops at once with the command that resolves it. A claim whose holder
is gone (killed, cancelled, finished) is stale and is taken over. The claim is removed when the job's
process exits normally or with an error; a SIGKILL leaves it behind, stale.

The claim is created with O_EXCL, which is atomic on local disks and on NFSv3+, so two copies
starting at the same moment cannot both win a fresh claim.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

# squeue states of a job that may still write (COMPLETING: its processes are being killed)
LIVE_SLURM_STATES = {"PENDING", "RUNNING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
                     "CONFIGURING", "STOPPED", "SIGNALING", "STAGE_OUT", "COMPLETING"}


class JobConflictError(RuntimeError):
    """Another live copy of this job holds its output."""


def claim_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".claim")


def _process_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _this_holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def slurm_job_state(job_id: str) -> str | None:
    """The job's state as squeue reports it, "" if squeue no longer lists it, None if squeue cannot tell."""
    if shutil.which("squeue") is None:
        return None
    try:
        result = subprocess.run(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        # an id the controller forgot (MinJobAge passed) is an error for squeue -j: the job is gone
        return "" if "Invalid job id" in result.stderr else None
    return result.stdout.strip().splitlines()[0].strip() if result.stdout.strip() else ""


def holder_alive(holder: dict) -> tuple[bool, str]:
    """(alive, why) for the holder recorded in a claim."""
    job = holder.get("slurm_job_id")
    if job and job != os.environ.get("SLURM_JOB_ID"):
        state = slurm_job_state(job)
        if state is None:
            return False, f"Slurm job {job} cannot be checked here (no squeue); taking the claim over"
        return state in LIVE_SLURM_STATES, f"Slurm job {job} is {state or 'gone'}"
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        alive = pid > 0 and pid != os.getpid() and _process_start(pid) == holder.get("process_start")
        return alive, f"process {pid} on {holder.get('host')} is {'running' if alive else 'gone'}"
    if job:  # our own Slurm job, requeued or retried under the same id
        return False, f"Slurm job {job} is this job"
    return True, (f"process {holder.get('pid')} on host {holder.get('host')} cannot be checked from "
                  f"{socket.gethostname()}")


def _resolution(holder: dict, claim: Path) -> str:
    job = holder.get("slurm_job_id")
    if job:
        return (f"cancel it first: `scancel {job}` (or `flattengpt cancel-orphans`, which cancels every job of "
                f"Snakemake runs that were killed), then `snakemake --unlock` and rerun the same command")
    return (f"stop that process, or if you are sure nothing writes there any more, delete {claim}; "
            "then rerun the same command")


def claim_output(output: str | os.PathLike, wait_completing_s: float = 120.0) -> Path:
    """Claim `output` for this process (released at exit); JobConflictError if a live copy holds it."""
    claim = claim_path(output)
    claim.parent.mkdir(parents=True, exist_ok=True)
    me = _this_holder()
    deadline = time.monotonic() + wait_completing_s
    while True:
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(claim.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}  # a claim written halfway by a killed job: stale
            alive, why = holder_alive(holder) if holder else (False, "the claim is unreadable")
            if alive and "COMPLETING" in why and time.monotonic() < deadline:
                time.sleep(2)  # a cancelled job is being torn down; it writes nothing more once gone
                continue
            if alive:
                raise JobConflictError(
                    f"{output} is being written by another copy of this job ({why}; claimed "
                    f"{holder.get('claimed_at', '?')}, claim file {claim}); a second copy would write beside "
                    f"it. {_resolution(holder, claim)}")
            log.info("taking over the stale claim on %s (%s)", output, why)
            claim.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    atexit.register(release_claim, claim, me)
    return claim


def release_claim(claim: Path, holder: dict) -> None:
    """Remove the claim if it is still ours (a stale-claim takeover may have replaced it)."""
    try:
        current = json.loads(claim.read_text())
        if (current.get("host"), current.get("pid")) == (holder["host"], holder["pid"]):
            claim.unlink()
    except (OSError, json.JSONDecodeError):
        pass

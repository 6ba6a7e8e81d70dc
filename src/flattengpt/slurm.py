"""Slurm jobs left running by a killed Snakemake, found and cancelled before a resume.

The Slurm executor names every job after its run (`sbatch --job-name <run id>`) and prints
"SLURM run ID: <run id>" into the run's log under .snakemake/log/. When Snakemake itself dies
(SIGKILL, a lost login node) its jobs keep running; a resumed run would submit them again and two
copies would write the same output. So:

- `orphan_jobs(workdir)` lists the live jobs of every earlier run of this working directory;
- the workflow's `onstart` calls `refuse_orphans` under the Slurm executor: a resume stops before it
  submits anything while such jobs run, naming them and the command that cancels them;
- `flattengpt cancel-orphans` cancels them (`scancel`) and waits until Slurm has let them go.

Each job also claims its output (joblock.py), which catches copies this check cannot see (another
working directory, a job submitted by hand).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .joblock import LIVE_SLURM_STATES

RUN_ID = re.compile(r"SLURM run ID: ([0-9a-f-]{36})")


class OrphanJobsError(RuntimeError):
    pass


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    run_id: str
    state: str
    comment: str  # rule_<rule>_wildcards_<...>, as the executor sets it

    def describe(self) -> str:
        return f"job {self.job_id} ({self.comment or 'no comment'}, {self.state}, run {self.run_id})"


def run_ids(workdir: str | Path = ".") -> list[str]:
    """Run ids of every Slurm-executor run recorded in the working directory's Snakemake logs."""
    found = []
    for log in sorted((Path(workdir) / ".snakemake" / "log").glob("*.snakemake.log")):
        try:
            found += RUN_ID.findall(log.read_text(errors="replace"))
        except OSError:
            continue
    return list(dict.fromkeys(found))


def jobs_of_runs(ids: list[str]) -> list[SlurmJob]:
    """Jobs squeue still lists (any state) whose name is one of the run ids."""
    if not ids or shutil.which("squeue") is None:
        return []
    result = subprocess.run(["squeue", "-h", "-t", "all", "--name", ",".join(ids), "-o", "%i|%j|%T|%k"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise OrphanJobsError(f"squeue failed ({result.stderr.strip()}); is the Slurm controller reachable?")
    jobs = []
    for line in result.stdout.splitlines():
        job_id, name, state, comment = (line.split("|", 3) + ["", "", "", ""])[:4]
        jobs.append(SlurmJob(job_id.strip(), name.strip(), state.strip(), comment.strip()))
    return jobs


def orphan_jobs(workdir: str | Path = ".") -> list[SlurmJob]:
    """Live (pending, running, suspended, completing) jobs of earlier runs of this working directory."""
    return [job for job in jobs_of_runs(run_ids(workdir)) if job.state in LIVE_SLURM_STATES]


def refuse_orphans(workdir: str | Path = ".") -> None:
    """Stop a run that would submit beside live jobs of a killed one (called from the workflow's onstart)."""
    jobs = orphan_jobs(workdir)
    if jobs:
        listing = "\n  ".join(job.describe() for job in jobs)
        raise OrphanJobsError(
            f"{len(jobs)} Slurm job(s) of an earlier Snakemake run of this directory are still live:\n  {listing}\n"
            "A second copy would write beside them. Cancel them with `flattengpt cancel-orphans` (or scancel the "
            "ids above), then `snakemake --unlock` and rerun the same command: every long stage resumes from its "
            "saved progress.")


def cancel_orphans(workdir: str | Path = ".", wait_s: float = 300.0, dry_run: bool = False) -> list[SlurmJob]:
    """scancel the live jobs of earlier runs and wait until squeue no longer shows them live."""
    jobs = orphan_jobs(workdir)
    if not jobs or dry_run:
        return jobs
    subprocess.run(["scancel", *[job.job_id for job in jobs]], check=True, timeout=60)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        live = {job.job_id for job in orphan_jobs(workdir)}
        if not live & {job.job_id for job in jobs}:
            return jobs
        time.sleep(1)
    raise OrphanJobsError(f"jobs {', '.join(j.job_id for j in jobs)} were cancelled but are still live after "
                          f"{wait_s:.0f} s; check `squeue -j <id>` and the node")

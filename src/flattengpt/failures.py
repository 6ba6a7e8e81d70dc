"""Failures that explain themselves: the failed job's own error line on the console, not only in its log.

Snakemake reports a failed job as `Error in rule X: ... log: PATH (check log file(s) for error
details)`. The stage's exception, which names the field or file and the fix, is in PATH. The
workflow's `onerror` handler calls `explain_failures` with Snakemake's main log: for every failed
job it prints the rule, the job's log and the last error line of that log (the exception as Python
printed it, e.g. `ValueError: text too short: ...`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_ERROR_IN_RULE = re.compile(r"^Error in rule (\S+?):?\s*$")
_LOG_LINE = re.compile(r"^\s+log: (.+?) \(check log file\(s\) for error details\)")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b(?::|$)")


def failed_jobs(main_log: str) -> list[tuple[str, list[str]]]:
    """(rule, its log files) for every `Error in rule` block of Snakemake's main log, in order, once each."""
    jobs, rule = [], None
    for line in main_log.splitlines():
        match = _ERROR_IN_RULE.match(line)
        if match:
            rule = match.group(1)
            continue
        match = _LOG_LINE.match(line)
        if match and rule is not None:
            job = (rule, [p.strip() for p in match.group(1).split(",")])
            if job not in jobs:
                jobs.append(job)
            rule = None
    return jobs


def last_error_line(log_text: str) -> str | None:
    """The last line of a log that reads as a raised exception (`SomeError: message`), else None."""
    found = None
    for line in log_text.splitlines():
        stripped = line.strip()
        if _EXCEPTION.match(stripped):
            found = stripped
    return found


def explain_failures(main_log_path, out=None) -> list[str]:
    """Print, for every failed job in Snakemake's main log, its rule, log and error line; return the lines.

    `main_log_path`: what Snakemake hands `onerror` as `log` (a path, or in Snakemake 9 a list of them).
    """
    out = out or sys.stderr
    paths = main_log_path if isinstance(main_log_path, (list, tuple)) else [main_log_path]
    text = "\n".join(Path(p).read_text(errors="replace") for p in paths if p and Path(p).is_file())
    lines = []
    for rule, logs in failed_jobs(text):
        for log in logs:
            path = Path(log)
            error = last_error_line(path.read_text(errors="replace")) if path.is_file() else None
            lines.append(f"rule {rule} failed: {error or 'no error line in its log'} (log: {log})")
    if lines:
        print("\n".join(["", "Why the failed jobs failed (the last error line of each job's log):", *lines, ""]),
              file=out)
    return lines

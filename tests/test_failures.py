"""A failed job's own error line (the field or file, and the fix) reaches the console (issue 15)."""

import pytest

from flattengpt.failures import explain_failures, failed_jobs, last_error_line

from .models_for_tests import make_model_with_tokenizer
from .test_workflow import base_config, snakemake, write_config

MAIN_LOG = """\
Building DAG of jobs...
Error in rule calibration:
    jobid: 3
    input: results/tiny/model.json
    output: results/tiny/plays/tokens.safetensors
    log: {log} (check log file(s) for error details)

Error in rule compress:
    message: compressing
    jobid: 7
    log: {other}, {missing} (check log file(s) for error details)
Shutting down, this might take some time.
"""

TRACEBACK = """\
2026-12-01 calibration: tokenizing
Traceback (most recent call last):
  File "stages.py", line 56, in calibration_stage
    raise ValueError("inner")
ValueError: inner

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "scripts/calibration.py", line 9, in <module>
flattengpt.data.MixError: calibration.c.mix[1]: text too short; use a longer text
[Tue Dec  1 12:00:00 2026]
"""


def test_the_last_exception_line_of_each_failed_jobs_log_is_printed(tmp_path, capsys):
    log, other = tmp_path / "calibration.log", tmp_path / "compress.log"
    log.write_text(TRACEBACK)
    other.write_text("progress 10%\nsafetensors_rust.SafetensorError: Error while deserializing header\n")
    main = tmp_path / "main.log"
    main.write_text(MAIN_LOG.format(log=log, other=other, missing=tmp_path / "gone.log"))
    assert [rule for rule, _ in failed_jobs(main.read_text())] == ["calibration", "compress"]
    lines = explain_failures(main)
    assert lines[0] == (f"rule calibration failed: flattengpt.data.MixError: calibration.c.mix[1]: text too short; "
                        f"use a longer text (log: {log})")
    assert "SafetensorError: Error while deserializing header" in lines[1]
    assert "no error line in its log" in lines[2]
    assert "Why the failed jobs failed" in capsys.readouterr().err
    assert last_error_line("all fine\n") is None and explain_failures(None) == []


@pytest.mark.workflow
def test_a_failed_rule_prints_its_error_line_on_the_console(tmp_path):
    model = make_model_with_tokenizer(tmp_path / "model", "llama", num_hidden_layers=4)
    text = tmp_path / "fox.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)  # 9000 bytes, 7202 tokens
    config = base_config(model)
    # enough bytes for the config-time bound, too few tokens: only the calibration job can tell
    config["calibration"] = {"fox": {"source": "local", "path": str(text), "n_samples": 1, "seq_len": 8000}}
    write_config(tmp_path, config)
    result = snakemake(tmp_path, check=False)
    assert result.returncode != 0
    console = result.stdout + result.stderr
    assert "rule calibration failed: ValueError: text too short: n_samples=1 x seq_len=8000" in console
    assert "use a longer text or fewer/shorter samples" in console
    assert "logs/calibration.log" in console

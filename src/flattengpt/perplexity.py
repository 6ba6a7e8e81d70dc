"""Perplexity as in the paper (METHOD.md section 6), computed one block at a time.

Text is joined with blank lines, tokenized once, and cut into non-overlapping windows of
`seq_len` tokens (a trailing remainder shorter than a window is dropped, as in the GPTQ/SparseGPT
evaluation code the paper follows). Every window's tokens except the first are predicted:
perplexity = exp(mean NLL over n_windows * (seq_len - 1) predictions).

The model is walked with the same block-at-a-time runner as the activations stage, so evaluating
a 70B checkpoint needs one block on the device plus the hidden states of the windows in flight.

Resuming: windows go through the model `checkpoint_every` at a time (one blockwise pass each).
After each pass the summed NLL and prediction count of every window in it are saved to
`state_dir/state.json`, keyed by the checkpoint's fingerprint, the windows' token ids and the
options; a rerun with the same key starts at the first unfinished window. The total is the sum of
the per-window sums in window order, in float64, in both cases, so a resumed run's result is
identical to an uninterrupted one's. The state directory is removed once the result is computed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from .blockwise import BlockwiseModel
from .provenance import json_sha256, tensor_sha256, write_json

log = logging.getLogger(__name__)


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n_windows, seq_len] from a 1-D token stream."""
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return ids[: n_windows * seq_len].view(n_windows, seq_len)


def _load_state(state_dir: Path, key: str) -> tuple[list[float], list[int]]:
    """Per-window sums and counts saved by an interrupted run with the same key, else empty lists."""
    try:
        state = json.loads((state_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return [], []
    if state.get("key") != key or len(state.get("nll", [])) != len(state.get("count", [])):
        log.info("discarding the resume state in %s: it was made from another model, text or options", state_dir)
        return [], []
    return [float(v) for v in state["nll"]], [int(v) for v in state["count"]]


@torch.no_grad()
def perplexity(model_dir, windows: torch.Tensor, *, device: str = "cpu", dtype: str = "float32",
               batch_size: int = 8, checkpoint_every: int | None = None, state_dir: str | Path | None = None,
               fingerprint: str | None = None) -> dict:
    """exp(mean next-token NLL) of `windows` (n x seq_len) under the checkpoint in `model_dir`.

    `checkpoint_every` windows per blockwise pass (default: all in one pass); with `state_dir`,
    progress is saved after every pass and a rerun resumes from it. `fingerprint` names the
    checkpoint in the resume key (default: the fingerprint of its files).
    """
    started = time.perf_counter()
    runner = BlockwiseModel(model_dir, device=device, dtype=dtype)
    n_windows = int(windows.shape[0])
    per_pass = n_windows if checkpoint_every is None else int(checkpoint_every)
    if per_pass < 1:
        raise ValueError(f"evaluation.perplexity.checkpoint_every must be at least 1, got {checkpoint_every}")
    # Batch composition can change the last bits of a block's output, so the passes and batches
    # are part of the key: a state is only reused by a run that would compute the same numbers.
    options = {"dtype": dtype, "batch_size": batch_size, "checkpoint_every": per_pass}
    key = json_sha256({"model": fingerprint or runner.checkpoint.fingerprint(),
                       "windows": tensor_sha256(windows), "options": options})
    nlls, counts = [], []
    if state_dir is not None:
        state_dir = Path(state_dir)
        nlls, counts = _load_state(state_dir, key)
        if nlls:
            log.info("resuming from saved progress: %d of %d windows already evaluated (%s)", len(nlls),
                     n_windows, state_dir)
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
            state_dir.mkdir(parents=True)
    resumed_from = len(nlls)
    for first in range(resumed_from, n_windows, per_pass):
        chunk = windows[first:first + per_pass]
        hidden = None
        for index, hidden in runner.residual_stream(chunk, batch_size=batch_size):
            pass
        nlls += runner.next_token_nlls(hidden, chunk)
        counts += [chunk.shape[1] - 1] * chunk.shape[0]
        del hidden
        if state_dir is not None:
            write_json(state_dir / "state.json", {"key": key, "nll": nlls, "count": counts})
        log.info("windows %d-%d of %d done (%.0f s)", first, first + chunk.shape[0] - 1, n_windows,
                 time.perf_counter() - started)
    total_nll = sum(nlls, 0.0)  # float64, in window order, whether resumed or not
    count = sum(counts)
    mean_nll = total_nll / count
    result = {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "n_windows": n_windows,
              "seq_len": int(windows.shape[1]), "n_predicted_tokens": count,
              "checkpoint_every": per_pass, "resumed_from_window": resumed_from,
              "seconds": round(time.perf_counter() - started, 3)}
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
    return result

"""Perplexity as in the paper (METHOD.md section 6), computed one block at a time.

Text is joined with blank lines, tokenized once, and cut into non-overlapping windows of
`seq_len` tokens (a trailing remainder shorter than a window is dropped, as in the GPTQ/SparseGPT
evaluation code the paper follows). Every window's tokens except the first are predicted:
perplexity = exp(mean NLL over n_windows * (seq_len - 1) predictions).

The model is walked with the same block-at-a-time runner as the activations stage, so evaluating
a 70B checkpoint needs one block on the device plus the hidden states of the evaluated windows.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from .blockwise import BlockwiseModel

log = logging.getLogger(__name__)


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n_windows, seq_len] from a 1-D token stream."""
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return ids[: n_windows * seq_len].view(n_windows, seq_len)


@torch.no_grad()
def perplexity(model_dir, windows: torch.Tensor, *, device: str = "cpu", dtype: str = "float32",
               batch_size: int = 8) -> dict:
    """exp(mean next-token NLL) of `windows` (n x seq_len) under the checkpoint in `model_dir`."""
    started = time.perf_counter()
    runner = BlockwiseModel(model_dir, device=device, dtype=dtype)
    hidden = None
    for index, hidden in runner.residual_stream(windows, batch_size=batch_size):
        if index > 0:  # index 0 is the embedding output
            log.info("block %d/%d done (%.0f s)", index, runner.num_layers, time.perf_counter() - started)
    total_nll, count = runner.next_token_nll(hidden, windows)
    mean_nll = total_nll / count
    return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "n_windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]), "n_predicted_tokens": count,
            "seconds": round(time.perf_counter() - started, 3)}

"""Per-layer calibration activations X_0 .. X_L, computed one block at a time, resumable.

Layout of the output directory (one safetensors file per residual-stream point):

    manifest.json
    layer_000.safetensors   X_0, the embeddings            "hidden": [n_samples, n_positions, hidden]
    ...                                                    "positions": [n_positions] (int64)
    layer_{L}.safetensors   X_L, after the last block, before the final norm

What is stored is a reduced copy sized for 7B-70B models: only the similarity views read it (the
compress stage recomputes its hidden states from the tokens), and all of them are means over
tokens, so a capped, reduced-precision copy gives the same matrices (tests/test_similarity.py
measures how close). Defaults:

- `max_tokens` = 32768 stored tokens per layer: `positions` is a seeded random subset of
  max_tokens // n_samples positions of every sequence, always including the last one (Gromov et
  al.'s angular distance is measured on the last token). null stores every position.
- `store_dtype` = bfloat16: float32's exponent range, so LLaMA's "massive activations" (single
  channels of several thousand; larger in some 70B-class models) can never overflow, as they can
  in float16 (max 65504, checked: a float16 overflow fails the stage and names the option). Its
  8-bit mantissa costs ~2^-9 relative error per element, which averages out over the hidden
  dimension and the tokens of a cosine mean. float32 keeps the exact values.

Sizes, with T = stored tokens = n_samples * n_positions, H = hidden size, b = bytes of store_dtype
and c = bytes of the compute dtype (4 for float32):

- disk of the output: (L+1) * T * H * b, e.g. LLaMA-2-7B at the defaults: 33 * 32768 * 4096 * 2
  = 8.9 GB (142 GB for all 128 x 2048 tokens in float32); LLaMA-2-70B: 81 * 32768 * 8192 * 2 = 43 GB;
- host memory: ~ 2 * n_samples * seq_len * H * c, the running hidden state of every calibration
  token and the next one being written block by block (4.3 GB each for 7B at 128 x 2048), plus
  one block's weights on the device;
- resume state: n_samples * seq_len * H * c (the full hidden state, needed to continue bit-exactly),
  rewritten every `checkpoint_every` blocks, plus the finished (small) layer files.

Resuming: progress goes to `state_dir` (not the declared output, which Snakemake deletes before a
rerun). After each block the finished layer file and, every `checkpoint_every` blocks, the full
hidden state are saved there; a rerun with the same inputs and options continues from the last
saved block. Only at the end are the files moved into `out_dir`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .blockwise import BlockwiseModel, resolve_dtype
from .checkpoint import Checkpoint
from .provenance import atomic_path, json_sha256, tensor_sha256, write_json
from .runtime import peak_rss_mib

log = logging.getLogger(__name__)


# Defaults of the stage, repeated in the schema's `activations:` section (see the module docstring).
DEFAULT_MAX_TOKENS = 32768
DEFAULT_STORE_DTYPE = "bfloat16"
DEFAULT_CHECKPOINT_EVERY = 4


def layer_file(index: int) -> str:
    return f"layer_{index:03d}.safetensors"


def select_positions(n_samples: int, seq_len: int, max_tokens: int | None, seed: int) -> torch.Tensor:
    """Token positions to store for every sequence: all, or a seeded subset that keeps the last one."""
    if max_tokens is None or max_tokens >= n_samples * seq_len:
        return torch.arange(seq_len)
    per_sequence = max(1, max_tokens // n_samples)
    generator = torch.Generator().manual_seed(seed)
    others = torch.randperm(seq_len - 1, generator=generator)[: per_sequence - 1]
    return torch.cat([others.sort().values, torch.tensor([seq_len - 1])])


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def compute_activations(
    model_dir: str | Path,
    input_ids: torch.Tensor,
    out_dir: str | Path,
    *,
    state_dir: str | Path,
    store_dtype: str = DEFAULT_STORE_DTYPE,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
    seed: int = 0,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    provenance: dict | None = None,
) -> dict:
    """Write X_0 .. X_L for `input_ids` (n_samples x seq_len) to `out_dir`; return the manifest."""
    out_dir, state_dir = Path(out_dir), Path(state_dir)
    checkpoint = Checkpoint(model_dir)
    runner = BlockwiseModel(checkpoint, device=device, dtype=dtype)
    num_layers = runner.num_layers
    n_samples, seq_len = input_ids.shape
    positions = select_positions(n_samples, seq_len, max_tokens, seed)
    stored = resolve_dtype(store_dtype)
    if checkpoint_every < 1:
        raise ValueError(f"activations.checkpoint_every must be at least 1, got {checkpoint_every}")
    hidden_size = runner.adapter.shape.hidden_size
    sizes = stage_sizes(num_layers, n_samples, seq_len, len(positions), hidden_size, store_dtype, dtype)
    log.info("storing %d of %d positions per sequence in %s: %.2f GB on disk; host memory ~%.2f GB; "
             "resume state %.2f GB rewritten every %d blocks", len(positions), seq_len, store_dtype,
             sizes["output_bytes"] / 1e9, sizes["host_memory_bytes"] / 1e9, sizes["resume_state_bytes"] / 1e9,
             checkpoint_every)

    options = {"store_dtype": store_dtype, "max_tokens": max_tokens, "dtype": dtype, "seed": seed}
    key = json_sha256({
        "model": checkpoint.fingerprint(),
        "input_ids": tensor_sha256(input_ids),
        "options": options,
    })
    layers_dir = state_dir / "layers"
    resume_file = state_dir / "resume.safetensors"
    start_layer, start_hidden = _load_resume_state(state_dir, key)
    if start_hidden is None:
        shutil.rmtree(state_dir, ignore_errors=True)
        layers_dir.mkdir(parents=True)
        write_json(state_dir / "state.json", {"key": key, "next_layer": 0})
    else:
        log.info("resuming from X_%d (blocks 0..%d already done in %s)", start_layer, start_layer - 1, state_dir)

    metadata = {"provenance": json.dumps(provenance or {}), "options": json.dumps(options)}
    started = time.perf_counter()
    for index, hidden in runner.residual_stream(input_ids, batch_size=batch_size, start_hidden=start_hidden,
                                                 start_layer=start_layer):
        if not torch.isfinite(hidden).all():
            raise FloatingPointError(f"non-finite values in X_{index} (the input of block {index}); "
                                     "try dtype: float32 or check the checkpoint")
        kept = hidden[:, positions].to(stored)
        if not torch.isfinite(kept).all():
            peak = float(hidden[:, positions].abs().max())
            raise FloatingPointError(f"activations.store_dtype: {store_dtype} overflows X_{index} (max |x| = "
                                     f"{peak:.4g}); use store_dtype: bfloat16 (float32's range) or float32")
        _save_tensors(layers_dir / layer_file(index), {"hidden": kept, "positions": positions},
                      {**metadata, "index": str(index)})
        is_last = index == num_layers
        if not is_last and index > start_layer and (index % checkpoint_every == 0):
            _save_tensors(resume_file, {"hidden": hidden}, {"index": str(index)})
            write_json(state_dir / "state.json", {"key": key, "next_layer": index})
        log.info("X_%d stored (%d/%d blocks run, %.1fs, peak RSS %.0f MiB)", index, index, num_layers,
                 time.perf_counter() - started, peak_rss_mib())

    manifest = {
        "num_layers": num_layers,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "positions": len(positions),
        "stored_tokens": n_samples * len(positions),
        "hidden_size": hidden_size,
        "dtype": store_dtype,
        "compute_dtype": dtype,
        "device": str(runner.device),
        "files": [layer_file(i) for i in range(num_layers + 1)],
        "resumed_from_layer": start_layer,
        "checkpoint_every": checkpoint_every,
        "sizes": sizes,
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "options": options,
        "provenance": provenance or {},
    }
    write_json(layers_dir / "manifest.json", manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(layers_dir, out_dir)
    shutil.rmtree(state_dir, ignore_errors=True)
    return manifest


def stage_sizes(num_layers: int, n_samples: int, seq_len: int, n_positions: int, hidden: int,
                store_dtype: str, compute_dtype: str) -> dict:
    """Bytes the stage needs (the formulas of the module docstring), recorded in the manifest."""
    stored = torch.empty((), dtype=resolve_dtype(store_dtype)).element_size()
    compute = torch.empty((), dtype=resolve_dtype(compute_dtype)).element_size()
    full_state = n_samples * seq_len * hidden * compute
    return {"output_bytes": (num_layers + 1) * n_samples * n_positions * hidden * stored,
            "host_memory_bytes": 2 * full_state, "resume_state_bytes": full_state}


def _load_resume_state(state_dir: Path, key: str) -> tuple[int, torch.Tensor | None]:
    """(next block, hidden state) saved by an interrupted run with the same key, else (0, None)."""
    try:
        state = json.loads((state_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0, None
    if state.get("key") != key:
        log.info("discarding resume state in %s: it was made from other inputs or options", state_dir)
        return 0, None
    next_layer = int(state.get("next_layer", 0))
    layer_files_present = all((state_dir / "layers" / layer_file(i)).is_file() for i in range(next_layer + 1))
    if next_layer == 0 or not layer_files_present or not (state_dir / "resume.safetensors").is_file():
        return 0, None
    with safe_open(state_dir / "resume.safetensors", framework="pt") as handle:
        if int(handle.metadata()["index"]) != next_layer:
            return 0, None
        return next_layer, handle.get_tensor("hidden")


def load_layer(act_dir: str | Path, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [n_samples, n_positions, hidden], positions) of X_index."""
    with safe_open(Path(act_dir) / layer_file(index), framework="pt") as handle:
        return handle.get_tensor("hidden"), handle.get_tensor("positions")

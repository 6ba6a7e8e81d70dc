"""The compression driver: apply a flattening plan to a checkpoint and write the shallower model.

Methods (every group is a contiguous run of blocks; groups partition 0..L-1):
    flattengpt    flatten each group into one wide block and prune it back to the original width
                  (METHOD.md sections 3-4), group by group from the bottom, on calibration hidden
                  states propagated through the already compressed lower part of the model
    drop          keep the first block of each group, delete the others
    flatten-only  the unpruned wide blocks, zero-padded to the widest group (an ordinary checkpoint)

Memory: one group's blocks are resident at a time, read lazily from the source safetensors; the
calibration hidden states are the only other large state; finished blocks go to disk as they come.
The output is written to a temporary sibling of `out_dir` and renamed into place at the end.

Peak memory of one flattened group (group_memory_bytes states it as a formula). With d = hidden,
n = m*I the wide MLP width, n_a = m*H*head_dim the wide attention width, P the parameters of one
block, w / s the bytes of the compute / stored dtype, B x T a calibration batch, N x T the
calibration set and b = prune.BLOCK:
    host:    2 N T d w                the group's input and output hidden states (kept on the host)
           + 3 m P s                  stored tensors, their norm-folded copies and the wide block (flatten_group);
                                      afterwards it bounds what stays: the wide block, the pruned attention and
                                      the previous group's output queued for its shard (m P s + P_attn s + P s)
           + 0.5 GiB                  interpreter, torch, libraries
    device:  max over the phases of
      heads:  n_a^2 8 + max(m P w + B T (d + 4 n_a + 4 m KV hd) w + B T^2 w + 128 MiB,   wide layer, activations
                            (2 n_a + 6 n_a / m) d 8 + 4 n_a b 8)                         the o_proj fit
      MLP:    n^2 8 + (P_attn + 3 d n) w [+ m P w, original target]                      Gram, pruned-attention layer
              + 3 B T n w + B T 4 d w + 128 MiB [+ n d 8 cross]                          activations (gate, up, psi)
      solve:  n^2 8 + (2 + [1]) n d 8 + 4 I d 8 + 4 n b 8             C in place; W, C W, [cross]; W_S, rhs, B, C_SS B
    The float64 copy of a feature batch inside Gram.add is capped at 2^24 values (128 MiB); the
    solve's scratch (4 n b 8) is the panel of the blocked Cholesky and the triangular solves.
    Gram.check_finite scans C in row chunks (isfinite on the whole of it would add |C| and three
    n^2 masks, 1.4 n^2 8, the former peak of the MLP phase). The stored tensors are views of the
    memory-mapped safetensors file: their pages count as RSS for as long as anything refers to them.
    solve_device host moves the solve phase's memory to the host. At lambda_factor 0 the leverage
    scores use eigh (C, its eigenvectors and LAPACK's 2 n^2 workspace: +3 n^2 8) and the solve uses
    pinv (about 4 I^2 8). On a CPU run device and host are the same RAM, and where the compute
    dtype is the stored one the layers' weights are the host tensors themselves (not counted twice).
    Not counted: attention score matrices (B m H T^2) where a backend materialises them.

Resuming: with `state_dir`, the state after every finished group (propagated hidden states, the
shards written so far and the not yet sharded tensors) is saved there, keyed by a hash of the
model, the plan, the options and the calibration ids; a rerun with the same key continues after
the last finished group, any other key starts afresh.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapters import BlockShape
from .blockwise import BlockwiseModel
from .checkpoint import Checkpoint
from .flatten import build_block, check_block, flatten_group, names, pad_block, widen
from .prune import (BLOCK, SOLVE_DTYPES, Gram, attention_statistics, head_columns, mlp_statistics, prune_channels,
                    prune_heads, ridge_fit, ridge_lambda, select_channels, select_kv_groups)
from .provenance import atomic_dir, atomic_path, json_sha256, tensor_sha256, write_json
from .runtime import peak_rss_mib

logger = logging.getLogger(__name__)

METHODS = ("flattengpt", "drop", "flatten-only")
TARGETS = ("flattened", "original")
HEAD_SCORINGS = ("output_norm",)
SOLVE_DEVICES = ("auto", "host")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
COPIED_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "*.model", "*.tiktoken", "chat_template*", "generation_config.json")


class CompressionError(ValueError):
    pass


def group_label(g: int, group: list[int]) -> str:
    blocks = f"block {group[0]}" if len(group) == 1 else f"blocks {group[0]}-{group[-1]}"
    return f"group {g} ({blocks})"


def validate_plan(groups, adapter) -> list[list[int]]:
    """Groups as lists of ints, or a CompressionError that names the offending group."""
    num_layers = adapter.num_layers
    if not groups:
        raise CompressionError("the plan has no groups")
    groups = [[int(i) for i in group] for group in groups]
    for g, group in enumerate(groups):
        if not group:
            raise CompressionError(f"group {g} is empty")
        label = f"group {g} (blocks {', '.join(map(str, group))})"
        if group != list(range(group[0], group[0] + len(group))):
            raise CompressionError(f"{label}: not a contiguous ascending run of blocks")
        if group[0] < 0 or group[-1] >= num_layers:
            raise CompressionError(f"{label}: the model has blocks 0-{num_layers - 1} only")
        types = {adapter.layer_type(i) for i in group}
        if len(types) > 1:
            raise CompressionError(f"{label}: mixes attention types {sorted(types)}; "
                                   "a flattened block has one attention mask")
    covered = [i for group in groups for i in group]
    if covered != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(covered))
        repeated = sorted({i for i in covered if covered.count(i) > 1})
        raise CompressionError(
            f"the plan does not match the model: its groups must partition blocks 0-{num_layers - 1} in order "
            f"(missing {missing}, repeated {repeated}, plan {groups})")
    return groups


# ----------------------------------------------------------------------------- output shards and resume state


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})


def _load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


class ShardWriter:
    """Safetensors shards of at most about `max_bytes` (whole blocks each), written as blocks finish."""

    def __init__(self, directory: Path, max_bytes: int, shards=(), weight_map=None, total_bytes: int = 0):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.shards = list(shards)
        self.weight_map = dict(weight_map or {})
        self.total_bytes = total_bytes
        self.pending: dict[str, torch.Tensor] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Queue tensors for the next shard; True if the queued ones were written out first."""
        flushed = bool(self.pending) and _nbytes(self.pending) + _nbytes(tensors) > self.max_bytes
        if flushed:
            self.flush()
        # clone: a slice shares its storage with the tensor it came from, which safetensors refuses
        self.pending.update({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()})
        return flushed

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{len(self.shards) + 1:05d}.safetensors"
        _save(self.directory / name, self.pending)
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.total_bytes += _nbytes(self.pending)
        self.shards.append(name)
        self.pending = {}

    def finish(self, out_dir: Path) -> None:
        """Move the shards into out_dir as model-0000i-of-0000N.safetensors and write the index."""
        self.flush()
        count = len(self.shards)
        final = {part: f"model-{i:05d}-of-{count:05d}.safetensors" for i, part in enumerate(self.shards, 1)}
        for part, name in final.items():
            shutil.move(self.directory / part, out_dir / name)
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}}
        write_json(out_dir / "model.safetensors.index.json", index)


STATE_FIELDS = ("next_group", "shards", "weight_map", "total_bytes", "pending_files", "hidden_file", "stats")


class Progress:
    """Finished groups, their output tensors and the propagated hidden states, saved after each group.

    Files in the state directory: state.json (written last, atomically, so it only ever points at
    complete files), shards/part-*.safetensors, pending-G.safetensors (tensors of finished groups
    not yet in a shard) and hidden-G.safetensors (the input of group G).
    """

    def __init__(self, state_dir: Path | None, key: str, scratch: Path, max_bytes: int, log: Callable):
        self.state_dir, self.key = state_dir, key
        self.next_group, self.hidden, self.stats = 0, None, []
        self.pending_files: list[str] = []
        self.hidden_file: str | None = None
        directory = (state_dir or scratch) / "shards"
        state = self._load_state(log) if state_dir is not None else None
        if state is None:
            if state_dir is not None:
                shutil.rmtree(state_dir, ignore_errors=True)
                state_dir.mkdir(parents=True)
            self.writer = ShardWriter(directory, max_bytes)
            return
        self.writer = ShardWriter(directory, max_bytes, state["shards"], state["weight_map"], state["total_bytes"])
        for file in state["pending_files"]:
            self.writer.pending.update(_load(state_dir / file))
        self.pending_files = state["pending_files"]
        self.hidden_file = state["hidden_file"]
        self.hidden = _load(state_dir / self.hidden_file)["hidden"] if self.hidden_file else None
        self.next_group, self.stats = state["next_group"], state["stats"]
        log(f"resuming after group {self.next_group - 1} from {state_dir}")

    def _load_state(self, log: Callable) -> dict | None:
        try:
            state = json.loads((self.state_dir / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if state.get("key") != self.key:
            log(f"discarding the resume state in {self.state_dir}: it was made from another model, plan, "
                "options or calibration set")
            return None
        if not set(STATE_FIELDS) <= set(state):
            log(f"discarding the resume state in {self.state_dir}: unknown format")
            return None
        files = [f"shards/{s}" for s in state["shards"]] + state["pending_files"]
        if state["hidden_file"]:
            files.append(state["hidden_file"])
        if not all((self.state_dir / f).is_file() for f in files):
            log(f"discarding the incomplete resume state in {self.state_dir}")
            return None
        return state

    def group_done(self, next_group: int, tensors: dict[str, torch.Tensor], hidden: torch.Tensor | None,
                   stats: dict) -> None:
        self.stats.append(stats)
        self.next_group = next_group
        flushed = self.writer.add(tensors)
        if self.state_dir is None:
            return
        obsolete = self.pending_files if flushed else []
        if flushed:
            self.pending_files = []
        pending = f"pending-{next_group:05d}.safetensors"
        _save(self.state_dir / pending, {k: self.writer.pending[k] for k in tensors})
        self.pending_files.append(pending)
        if self.hidden_file:
            obsolete.append(self.hidden_file)
        self.hidden_file = None
        if hidden is not None:
            self.hidden_file = f"hidden-{next_group:05d}.safetensors"
            _save(self.state_dir / self.hidden_file, {"hidden": hidden.contiguous()})
        state = dict(zip(STATE_FIELDS, (next_group, self.writer.shards, self.writer.weight_map, self.writer.total_bytes,
                                        self.pending_files, self.hidden_file, self.stats)))
        write_json(self.state_dir / "state.json", {"key": self.key, **state})
        for file in obsolete:
            (self.state_dir / file).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- one group


def _summary(t: torch.Tensor) -> dict:
    t = t.double()
    return {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}


def _per_block(indices: torch.Tensor, width: int, group: list[int]) -> dict[str, int]:
    """How many of the kept indices (along a width-per-block concatenated axis) came from each block."""
    counts = torch.bincount(indices // width, minlength=len(group))
    return {str(block): int(c) for block, c in zip(group, counts)}


def _cast(block: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    return {k: v.to(dtypes[k]) for k, v in block.items()}


def _check_finite(hidden: torch.Tensor, what: str) -> None:
    if not torch.isfinite(hidden).all():
        raise FloatingPointError(f"non-finite activations in {what}; try dtype float32 or check the checkpoint")


@torch.no_grad()
def compress_group(runner: BlockwiseModel, group: list[int], hidden: torch.Tensor, *, lambda_factor: float = 10.0,
                   compensation_target: str = "flattened", attn_compensation: bool = False, batch_size: int = 8,
                   save_dtypes: dict[str, torch.dtype] | None = None, keep_kv_heads: int | None = None,
                   keep_channels: int | None = None, solve_device: str = "auto",
                   solve_dtype: str = "float64") -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """Flatten `group` and prune it to `keep_kv_heads` KV groups and `keep_channels` MLP channels.

    `hidden` is the group's input over the calibration set. Returns the pruned block (cast to
    `save_dtypes`), its output on `hidden` (the next group's input) and statistics. The widths
    default to the original ones; other widths are for tests and experiments.
    A group of one block is returned as the source checkpoint stores it, bit for bit. A wider group
    is flattened from the stored tensors too (in their own precision, on the host), so the kept rows
    are never rounded through the compute dtype; only the activations are computed in it.
    solve_device "host" moves the Gram sums to CPU RAM for the solves; solve_dtype is the
    precision of the factorisations and triangular solves (the sums and error checks stay float64).
    """
    adapter, device, dtype = runner.adapter, runner.device, runner.dtype
    shape, first, m = adapter.shape, group[0], len(group)
    n = names(adapter)
    solve_precision = SOLVE_DTYPES[solve_dtype]

    sources = [runner.checkpoint.tensors(adapter.layer_prefix(i)) for i in group]  # as stored, on the host
    save_dtypes = save_dtypes or {k: v.dtype for k, v in sources[0].items()}
    for block in sources:
        check_block(block, adapter, shape)
    del block  # the loop variable would keep the last source block alive through the whole group
    stats: dict = {"blocks": group}
    if m == 1:  # nothing to flatten: the block is kept as it is
        new_hidden = runner.run_block(runner.load_block(first), first, hidden, batch_size)
        _check_finite(new_hidden, "the block's output")
        return sources[0], new_hidden, {**stats, "flattened": False}

    def batches():
        for start in range(0, hidden.shape[0], batch_size):
            x = hidden[start:start + batch_size].to(device, dtype)
            yield x, runner.block_kwargs(first, x)

    def solve_place(gram: Gram) -> Gram:  # where the solves run: the device the sums were made on, or the host
        if solve_device == "host":
            gram.C = gram.C.cpu()
            gram.cross = None if gram.cross is None else gram.cross.cpu()
        return gram

    wide_shape = widen(shape, m)
    keep_kv = keep_kv_heads or shape.num_kv_heads
    keep_channels = keep_channels or shape.intermediate_size
    wide = flatten_group(sources, adapter)
    del sources

    # 1. Heads: score on the wide block, keep the best KV groups (their query heads with them).
    layer = build_block(adapter, wide, first, wide_shape, device, dtype)
    head_scores, attn_gram = attention_statistics(layer, adapter, wide_shape, batches())
    del layer
    kept_kv, kept_heads = select_kv_groups(head_scores, shape.kv_group_size, keep_kv)
    attn_gram = solve_place(attn_gram)
    W_o = wide[f"{n['o']}.weight"].T.double().to(attn_gram.C.device)  # W = W_O^T: (heads * head_dim) x hidden
    cols = head_columns(kept_heads, shape.head_dim).to(W_o.device)
    attn_C, attn_gram.C = attn_gram.C, None  # its storage is reused by the solve
    attn_fit = ridge_fit(attn_C, W_o, cols, ridge_lambda(attn_C, lambda_factor), overwrite=True,
                         dtype=solve_precision)
    del attn_C, W_o
    o_weight = attn_fit.weight.T if attn_compensation else None
    pruned = prune_heads(wide, adapter, kept_kv, kept_heads, shape.head_dim, o_weight)
    mid_shape = replace(wide_shape, num_heads=len(kept_heads), num_kv_heads=len(kept_kv))
    stats["heads"] = {
        "kept_kv_groups": kept_kv.tolist(), "kept_query_heads": kept_heads.tolist(),
        "kept_kv_groups_per_block": _per_block(kept_kv, shape.num_kv_heads, group),
        "head_scores": [round(float(s), 6) for s in head_scores], "head_scores_summary": _summary(head_scores),
        # the attention output error of head selection, and of the o_proj refit when it is used
        "attention_error": {**attn_fit.summary(attn_gram.tokens), "refit_applied": attn_compensation},
        "solve": attn_fit.solve,
    }
    del attn_gram, attn_fit

    # 2. MLP channels on the residual after the pruned attention.
    layer = build_block(adapter, pruned, first, mid_shape, device, dtype)
    target = None
    if compensation_target == "original":
        originals = [runner.load_block(i) for i in group]
        # y - h is a small difference of two large residuals: form it in float32 at least, whatever the compute dtype
        target_dtype = torch.promote_types(dtype, torch.float32)

        def target(x, h):  # the residual the original blocks a..b add to the same input, minus h
            y = x
            for index, block in zip(group, originals):
                y = block(y, **runner.block_kwargs(index, y))
                y = y[0] if isinstance(y, tuple) else y
            return y.to(target_dtype) - h.to(target_dtype)
    gram = solve_place(mlp_statistics(layer, adapter, batches(), target))
    del layer, target
    originals = None
    W = wide[f"{n['down']}.weight"].T.double().to(gram.C.device)  # W = W_down^T: (m*I) x hidden
    C, gram.C = gram.C, None  # select_channels factors C in its own storage
    lam = ridge_lambda(C, lambda_factor)
    norm2 = None if gram.cross is None else gram.norm2
    scores, fit, fit_flattened = select_channels(C, W, keep_channels, lam, gram.cross, norm2, dtype=solve_precision)
    del C, W
    keep = fit.keep.cpu()
    stats["mlp"] = {
        "kept_channels": len(keep), "of_channels": wide_shape.intermediate_size,
        "kept_channels_per_block": _per_block(keep, shape.intermediate_size, group),
        "leverage_summary": _summary(scores), "target": compensation_target,
        "error": fit.summary(gram.tokens), "solve": fit.solve,
    }
    if compensation_target == "original":  # the same selection and fit measured against the flattened MLP output
        stats["mlp"]["error_vs_flattened"] = fit_flattened.summary(gram.tokens)
    del gram

    final = _cast(prune_channels(pruned, adapter, keep, fit.weight.T.cpu()), save_dtypes)
    final_shape = replace(mid_shape, intermediate_size=len(keep))
    layer = build_block(adapter, final, first, final_shape, device, dtype)  # as it will be saved
    new_hidden = runner.run_block(layer, first, hidden, batch_size)
    _check_finite(new_hidden, "the compressed block's output")
    return final, new_hidden, {**stats, "flattened": True}


def group_memory_bytes(shape: BlockShape, group_size: int, *, compute_dtype_bytes: int, batch_size: int, seq_len: int,
                       compensation_target: str, solve_device: str, n_samples: int = 128,
                       source_dtype_bytes: int | None = None, lambda_factor: float = 10.0,
                       device: str = "cuda") -> dict[str, int]:
    """Peak bytes of compressing one group of `group_size` blocks of `shape`: {"device": .., "host": ..}.

    The formula of the module docstring, phase by phase; n_samples x seq_len is the calibration set
    (default the paper's 128 sequences). With device "cpu" everything is host memory ("device": 0).
    """
    m, w, b = group_size, compute_dtype_bytes, BLOCK
    s = compute_dtype_bytes if source_dtype_bytes is None else source_dtype_bytes
    d, hd, I = shape.hidden_size, shape.head_dim, shape.intermediate_size
    n, n_attn, kv = m * I, m * shape.num_heads * hd, m * shape.num_kv_heads * hd
    p_attn = 2 * d * shape.num_heads * hd + 2 * d * shape.num_kv_heads * hd  # q, o; k, v of one block
    p_block = p_attn + 3 * d * I + 2 * d
    original = compensation_target == "original"
    shared = device == "cpu" and w == s  # the layers are built from the host tensors without a copy
    tokens, chunk = batch_size * seq_len, 2**24 * 8
    layer_wide = 0 if shared else m * p_block * w
    heads = n_attn**2 * 8 + max(layer_wide + tokens * (d + 4 * n_attn + 4 * kv) * w + batch_size * seq_len**2 * w
                                + chunk,
                                (2 * n_attn + 6 * n_attn // m) * d * 8 + 4 * n_attn * b * 8)
    mlp = (n**2 * 8 + (0 if shared else (p_attn + 3 * d * n) * w) + (m * p_block * w if original else 0)
           + 3 * tokens * n * w + 4 * tokens * d * w + chunk + (n * d * 8 if original else 0))
    solve = n**2 * 8 + (3 if original else 2) * n * d * 8 + 4 * I * d * 8 + 4 * n * b * 8
    if lambda_factor == 0:
        solve += 3 * n**2 * 8 + 4 * I**2 * 8
    host = 2 * n_samples * seq_len * d * w + 3 * m * p_block * s + 2**29
    if device == "cpu":
        return {"device": 0, "host": host + max(heads, mlp, solve)}
    if solve_device == "host":
        return {"device": max(heads, mlp), "host": host + solve}
    return {"device": max(heads, mlp, solve), "host": host}


def _calibration_nll(runner: BlockwiseModel, hidden: torch.Tensor, input_ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL of the calibration ids from the final hidden states X_L."""
    total, count = runner.next_token_nll(hidden, input_ids)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- the driver


def compress_model(model_dir, groups: list[list[int]], calib_input_ids: torch.Tensor, out_dir, *,
                   method: str = "flattengpt", lambda_factor: float = 10.0, compensation_target: str = "flattened",
                   attn_compensation: bool = False, head_scoring: str = "output_norm", device: str = "cpu",
                   dtype: str = "float32", batch_size: int = 8, solve_device: str = "auto", solve_dtype: str = "float64",
                   state_dir=None, provenance: dict | None = None,
                   log: Callable[[str], None] | None = None, max_shard_bytes: int = 64 * 2**20) -> dict:
    """Compress the checkpoint in `model_dir` by the plan `groups`; write a HF model to `out_dir`.

    Finished blocks wait in memory only until `max_shard_bytes` of them are queued, then go to disk:
    a small shard size keeps the stage's memory independent of the model's size.

    `calib_input_ids` [n, T] is used by method "flattengpt" only (the others accept and ignore it).
    Returns the content of out_dir/compression.json.
    """
    started = time.perf_counter()
    log = log or logger.info
    _check_options(method, compensation_target, head_scoring, lambda_factor, solve_device, solve_dtype)
    checkpoint = Checkpoint(model_dir)
    runner = BlockwiseModel(checkpoint, device=device, dtype=dtype)
    adapter, shape = runner.adapter, runner.adapter.shape
    groups = validate_plan(groups, adapter)
    ids = torch.as_tensor(calib_input_ids, dtype=torch.long)
    if method == "flattengpt" and (ids.dim() != 2 or ids.numel() == 0):
        raise CompressionError(f"calibration ids must be a non-empty [n, T] tensor, got shape {tuple(ids.shape)}")

    options = {"lambda_factor": float(lambda_factor), "compensation_target": compensation_target,
               "attn_compensation": bool(attn_compensation), "head_scoring": head_scoring,
               "dtype": dtype, "device": str(runner.device), "solve_device": solve_device, "solve_dtype": solve_dtype}
    fingerprint, ids_hash = checkpoint.fingerprint(), tensor_sha256(ids)
    key = json_sha256({"model": fingerprint, "groups": groups, "method": method, "options": options,
                       "calibration": ids_hash})
    widest_group = widen(shape, max(len(group) for group in groups))
    output_shape = shape
    if method == "flatten-only":
        output_shape = adapter.config_width(widest_group)  # more zero heads where the config class demands it
        if output_shape != widest_group:
            log(f"flatten-only: {widest_group.num_heads} heads padded to {output_shape.num_heads} for the config class")
    state_dir = Path(state_dir) if state_dir is not None else None

    with atomic_dir(Path(out_dir)) as tmp:
        progress = Progress(state_dir, key, tmp, max_shard_bytes, log)
        resumed_from, hidden = progress.next_group, progress.hidden
        if method == "flattengpt" and hidden is None:
            hidden = torch.cat([runner.embed(ids[i:i + batch_size]).cpu() for i in range(0, ids.shape[0], batch_size)])
        for g in range(progress.next_group, len(groups)):
            group, group_started, label = groups[g], time.perf_counter(), group_label(g, groups[g])
            try:
                block, hidden, stats = _compress_one(method, runner, group, hidden, output_shape, options, batch_size)
            except torch.cuda.OutOfMemoryError as error:
                error.add_note(f"while compressing {label}; try a smaller batch_size")
                raise
            except (ValueError, RuntimeError, FloatingPointError) as error:  # shapes, solves, non-finite values
                raise CompressionError(f"{label}: {error}") from error
            except Exception as error:
                error.add_note(f"while compressing {label}")
                raise
            stats = {"group": g, **stats, "seconds": round(time.perf_counter() - group_started, 3)}
            prefix = adapter.layer_prefix(g)  # output block g: the blocks are renumbered in order
            progress.group_done(g + 1, {prefix + k: v for k, v in block.items()}, hidden, stats)
            del block  # the writer holds its own copy; this one would stay alive through the next group
            log(f"{label} done in {stats['seconds']:.1f}s{_errors_line(stats)} (peak RSS {peak_rss_mib():.0f} MiB)")

        calibration_nll = _calibration_nll(runner, hidden, ids, batch_size) if method == "flattengpt" else None
        block_prefixes = tuple(adapter.layer_prefix(i) for i in range(adapter.num_layers))
        for name in checkpoint.tensor_files:  # embeddings, final norm, lm_head: copied as they are
            if not name.startswith(block_prefixes):
                progress.writer.add({name: checkpoint.tensor(name)})
        overrides = adapter.width_overrides(output_shape) if method == "flatten-only" else {}
        adapter.shallower_config([group[0] for group in groups], **overrides).save_pretrained(tmp)
        for pattern in COPIED_FILES:
            for file in Path(model_dir).glob(pattern):
                if file.is_file():
                    shutil.copy2(file, tmp / file.name)

        record = {
            "method": method,
            "groups": groups,
            "num_layers": {"original": adapter.num_layers, "compressed": len(groups)},
            "source_layers": [group[0] for group in groups],  # the block whose config entries each new block takes
            "options": {**options, "batch_size": batch_size},
            "shape": {"original": shape.__dict__, "output": output_shape.__dict__,
                      "widest_group": widest_group.__dict__},
            "calibration": {"n_sequences": int(ids.shape[0]) if ids.dim() == 2 else 0,
                            "seq_len": int(ids.shape[1]) if ids.dim() == 2 else 0,
                            "input_ids_sha256": ids_hash, "used": method == "flattengpt"},
            "calibration_nll": calibration_nll,  # mean next-token NLL of the compressed model on them
            "group_stats": progress.stats,
            "timings": {"seconds": round(time.perf_counter() - started, 3),
                        "group_seconds": [s["seconds"] for s in progress.stats]},
            "resumed_from_group": resumed_from,
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "model": {"path": str(model_dir), "fingerprint": fingerprint,
                      "model_type": getattr(adapter.config, "model_type", None)},
            "provenance": provenance or {},
        }
        write_json(tmp / "compression.json", record)
        progress.writer.finish(tmp)  # last: it moves the shards out of the resume state
        shutil.rmtree(tmp / "shards", ignore_errors=True)
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
    return record


def _check_options(method: str, compensation_target: str, head_scoring: str, lambda_factor: float,
                   solve_device: str = "auto", solve_dtype: str = "float64") -> None:
    for name, value, allowed in (("method", method, METHODS), ("compensation_target", compensation_target, TARGETS),
                                 ("head_scoring", head_scoring, HEAD_SCORINGS), ("solve_device", solve_device, SOLVE_DEVICES),
                                 ("solve_dtype", solve_dtype, tuple(SOLVE_DTYPES))):
        if value not in allowed:
            raise CompressionError(f"{name} {value!r} is not one of {', '.join(allowed)}")
    if not lambda_factor >= 0:
        raise CompressionError(f"lambda_factor must be >= 0, got {lambda_factor}")
    if solve_dtype == "float32" and lambda_factor == 0:
        # without the ridge the systems can be singular: float32 has no margin for that
        raise CompressionError("solve_dtype float32 needs lambda_factor > 0 (the least-squares solve at lambda 0 "
                               "can be singular); set solve_dtype: float64 or lambda_factor > 0")


def _compress_one(method: str, runner: BlockwiseModel, group: list[int], hidden: torch.Tensor | None,
                  output_shape, options: dict, batch_size: int):
    """(output block tensors, hidden states after it or None, statistics) of one group."""
    checkpoint, adapter = runner.checkpoint, runner.adapter
    source = adapter.layer_prefix(group[0])
    if method == "drop":
        return checkpoint.tensors(source), None, {"blocks": group, "kept": group[0]}
    # computed tensors are saved in the dtype the source checkpoint stores them in
    save_dtypes = {name[len(source):]: SAFETENSORS_DTYPES[info["dtype"]]
                   for name, info in checkpoint.headers.items() if name.startswith(source)}
    if method == "flatten-only":
        return _flatten_only(runner, group, output_shape, save_dtypes), None, {"blocks": group}
    _check_finite(hidden, "the group's input")
    return compress_group(runner, group, hidden, lambda_factor=options["lambda_factor"],
                          compensation_target=options["compensation_target"],
                          attn_compensation=options["attn_compensation"], batch_size=batch_size,
                          save_dtypes=save_dtypes, solve_device=options["solve_device"],
                          solve_dtype=options["solve_dtype"])


def _flatten_only(runner: BlockwiseModel, group: list[int], output_shape, save_dtypes) -> dict[str, torch.Tensor]:
    """The group's wide block (a single block as it is), zero-padded to the output widths."""
    adapter, shape = runner.adapter, runner.adapter.shape
    sources = [runner.checkpoint.tensors(adapter.layer_prefix(i)) for i in group]  # as stored: exact copies, padding
    for block in sources:
        check_block(block, adapter, shape)
    wide = sources[0] if len(group) == 1 else flatten_group(sources, adapter)
    return _cast(pad_block(wide, adapter, widen(shape, len(group)), output_shape), save_dtypes)


def _errors_line(stats: dict) -> str:
    """The relative calibration errors of a flattened group, for the log."""
    if not stats.get("flattened"):
        return ""
    attn, mlp = stats["heads"]["attention_error"], stats["mlp"]["error"]
    attn_line = f"{attn['rel_error_plain']:.3f}"
    if attn["refit_applied"]:
        attn_line += f" -> {attn['rel_error_compensated']:.3f}"
    mlp_line = f"{mlp['rel_error_plain']:.3f} -> {mlp['rel_error_compensated']:.3f}"
    return f"; relative error attention {attn_line}, MLP {mlp_line}"

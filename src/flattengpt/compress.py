"""The compression driver: apply any method's plan to a checkpoint and write the shallower model.

The driver owns everything that is the same for every method: reading the source checkpoint
lazily, the resume state, the output shards, the rewritten config (fewer layers, renumbered
per-layer entries) and compression.json. What an output layer is made of is the method's
business (methods/): the driver walks the plan's layers from the bottom and asks the method to
build each one; for methods that fit (`fits`), it keeps the calibration hidden states at the
current layer's input in the compressed model, propagated through the layers built so far.

Memory: one output layer's source blocks are resident at a time, read lazily from the source
safetensors; the calibration hidden states (2 N T d w for N x T calibration tokens of width d in
the compute dtype's w bytes, fitting methods only) are the only other large state; finished
blocks go to disk as they come. FlattenGPT's peak per group is methods/flattengpt.py's
`group_memory_bytes`. The output is written to a temporary sibling of `out_dir` and renamed
into place at the end.

Resuming: with `state_dir`, the state after every finished layer (propagated hidden states, the
shards written so far and the not yet sharded tensors) is saved there, keyed by a hash of the
model, the plan, the method and its options and the calibration ids; a rerun with the same key
continues after the last finished layer, any other key starts afresh.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .blockwise import BlockwiseModel
from .checkpoint import Checkpoint
from .flatten import build_block, widen
from .methods import BuildContext, Method, MethodError, get_method
from .plan import Plan
from .provenance import atomic_dir, atomic_path, json_sha256, tensor_sha256, write_json
from .runtime import peak_rss_mib

logger = logging.getLogger(__name__)

COPIED_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                "*.model", "*.tiktoken", "chat_template*", "generation_config.json")


class CompressionError(ValueError):
    pass


def group_label(g: int, group: list[int]) -> str:
    blocks = f"block {group[0]}" if len(group) == 1 else f"blocks {group[0]}-{group[-1]}"
    return f"layer {g} ({blocks})"


def as_plan(plan, num_layers: int, method: Method) -> Plan:
    """A Plan from a Plan, a plan.json record, or a flattening partition (a list of groups).

    A partition becomes the method's own plan for it (`drop` keeps each group's first block).
    """
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_json(plan)
    if not plan:
        raise CompressionError("the plan has no groups")
    groups = [[int(i) for i in group] for group in plan]
    if any(not group for group in groups):
        raise CompressionError(f"group {next(g for g, group in enumerate(groups) if not group)} is empty")
    covered = [i for group in groups for i in group]
    if covered != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(covered))
        repeated = sorted({i for i in covered if covered.count(i) > 1})
        outside = sorted({i for i in covered if not 0 <= i < num_layers})
        unordered = [g for g, group in enumerate(groups) if group != list(range(group[0], group[0] + len(group)))]
        details = [f"missing {missing}" if missing else "", f"repeated {repeated}" if repeated else "",
                   f"blocks {outside} outside 0-{num_layers - 1}" if outside else "",
                   f"group {unordered[0]} {groups[unordered[0]]} not consecutive ascending" if unordered else ""]
        raise CompressionError(
            f"the plan does not match the model: its groups must partition blocks 0-{num_layers - 1} in order "
            f"({'; '.join(d for d in details if d) or 'out of order'}; plan {groups})")
    return method.plan_from_partition(num_layers, groups)


def validate_plan(plan: Plan, adapter) -> Plan:
    """The plan checked against the model (block range, attention types), or a CompressionError naming the layer."""
    if plan.num_layers != adapter.num_layers:
        raise CompressionError(f"the plan is for a model of {plan.num_layers} blocks; this one has "
                               f"{adapter.num_layers}: the model has blocks 0-{adapter.num_layers - 1} only")
    try:
        return plan.validate(adapter.layer_type)
    except ValueError as err:
        raise CompressionError(str(err)) from err


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


def _calibration_nll(runner: BlockwiseModel, hidden: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Mean next-token NLL of the calibration ids from the final hidden states X_L."""
    total, count = runner.next_token_nll(hidden, input_ids)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- the driver


def compress_model(model_dir, plan, calib_input_ids: torch.Tensor | None, out_dir, *,
                   method: str | dict | Method = "flattengpt", device: str = "cpu", dtype: str = "float32",
                   batch_size: int = 8, state_dir=None, provenance: dict | None = None,
                   log: Callable[[str], None] | None = None, max_shard_bytes: int = 64 * 2**20,
                   **options) -> dict:
    """Compress the checkpoint in `model_dir` by `plan` with `method`; write a HF model to `out_dir`.

    `plan` is a Plan, a plan.json record or a flattening partition (list of groups); `method` a
    name (its options as keyword arguments), a `methods:` entry or a Method. Finished blocks wait
    in memory only until `max_shard_bytes` of them are queued, then go to disk: a small shard size
    keeps the stage's memory independent of the model's size. `calib_input_ids` [n, T] is read by
    fitting methods only. Returns the content of out_dir/compression.json.
    """
    started = time.perf_counter()
    log = log or logger.info
    try:
        if isinstance(method, Method):
            if options:
                raise MethodError("give options inside the Method, not as keyword arguments")
            runner_method = method
        else:
            spec = {"method": method} if isinstance(method, str) else dict(method)
            runner_method = get_method({**spec, **options})
    except MethodError as err:
        raise CompressionError(str(err)) from err
    method = runner_method
    checkpoint = Checkpoint(model_dir)
    runner = BlockwiseModel(checkpoint, device=device, dtype=dtype)
    adapter, shape = runner.adapter, runner.adapter.shape
    plan = validate_plan(as_plan(plan, adapter.num_layers, method), adapter)
    ids = torch.as_tensor(calib_input_ids if calib_input_ids is not None else torch.zeros(0, 0), dtype=torch.long)
    if method.fits and (ids.dim() != 2 or ids.numel() == 0):
        raise CompressionError(f"calibration ids must be a non-empty [n, T] tensor, got shape {tuple(ids.shape)}")

    options = {**method.recorded_options(), "dtype": dtype, "device": str(runner.device)}
    layers = [layer.to_json() for layer in plan.layers]
    fingerprint, ids_hash = checkpoint.fingerprint(), tensor_sha256(ids) if method.fits else None
    key = json_sha256({"model": fingerprint, "layers": layers, "method": method.name, "options": options,
                       "calibration": ids_hash})
    output_shape = method.output_shape(adapter, plan)
    if output_shape != shape:
        log(f"{method.name}: every block saved with {output_shape.num_heads} heads, {output_shape.num_kv_heads} KV "
            f"heads and {output_shape.intermediate_size} MLP channels")
    state_dir = Path(state_dir) if state_dir is not None else None
    ctx = BuildContext(runner=runner, plan=plan, batch_size=batch_size, output_shape=output_shape, log=log)

    with atomic_dir(Path(out_dir)) as tmp:
        progress = Progress(state_dir, key, tmp, max_shard_bytes, log)
        resumed_from, hidden = progress.next_group, progress.hidden
        if method.fits and hidden is None:
            hidden = torch.cat([runner.embed(ids[i:i + batch_size]).cpu() for i in range(0, ids.shape[0], batch_size)])
        for g in range(progress.next_group, len(plan.layers)):
            layer, layer_started = plan.layers[g], time.perf_counter()
            label = f"{group_label(g, layer.blocks)}, {layer.op}"
            try:
                built = method.build(ctx, layer, hidden if method.fits else None)
                if method.fits:
                    hidden = built.hidden_out if built.hidden_out is not None else _propagate(
                        runner, built, layer.base, output_shape, hidden, batch_size)
                    if not torch.isfinite(hidden).all():
                        raise FloatingPointError(f"non-finite activations after {label}; try dtype float32 "
                                                 "or check the checkpoint")
            except torch.cuda.OutOfMemoryError as error:
                error.add_note(f"while compressing {label}; try a smaller batch_size")
                raise
            except (ValueError, RuntimeError, FloatingPointError) as error:  # shapes, solves, non-finite values
                raise CompressionError(f"{label}: {error}") from error
            except Exception as error:
                error.add_note(f"while compressing {label}")
                raise
            stats = {"group": g, "blocks": layer.blocks, **built.stats,
                     "seconds": round(time.perf_counter() - layer_started, 3)}
            prefix = adapter.layer_prefix(g)  # output block g: the blocks are renumbered in order
            progress.group_done(g + 1, {prefix + k: v for k, v in built.tensors.items()},
                                hidden if method.fits else None, stats)
            del built  # the writer holds its own copy; this one would stay alive through the next layer
            log(f"{label} done in {stats['seconds']:.1f}s{_errors_line(stats)} (peak RSS {peak_rss_mib():.0f} MiB)")

        calibration_nll = _calibration_nll(runner, hidden, ids) if method.fits else None
        block_prefixes = tuple(adapter.layer_prefix(i) for i in range(adapter.num_layers))
        for name in checkpoint.tensor_files:  # embeddings, final norm, lm_head: copied as they are
            if not name.startswith(block_prefixes):
                progress.writer.add({name: checkpoint.tensor(name)})
        overrides = adapter.width_overrides(output_shape) if output_shape != shape else {}
        adapter.shallower_config(plan.kept_blocks, **overrides).save_pretrained(tmp)
        for pattern in COPIED_FILES:
            for file in Path(model_dir).glob(pattern):
                if file.is_file():
                    shutil.copy2(file, tmp / file.name)

        record = {
            "method": method.name,
            "layers": layers,
            "groups": plan.groups,
            "dropped_blocks": plan.dropped_blocks,
            "num_layers": {"original": adapter.num_layers, "compressed": len(plan.layers)},
            "source_layers": plan.kept_blocks,  # the block whose config entries each new block takes
            "options": {**options, "batch_size": batch_size},
            "shape": {"original": shape.__dict__, "output": output_shape.__dict__,
                      "widest_group": widen(shape, max((len(layer.blocks) for layer in plan.layers
                                                        if layer.op == "flatten"), default=1)).__dict__},
            "calibration": {"n_sequences": int(ids.shape[0]) if ids.dim() == 2 else 0,
                            "seq_len": int(ids.shape[1]) if ids.dim() == 2 else 0,
                            "input_ids_sha256": ids_hash, "used": method.fits},
            "calibration_nll": calibration_nll,  # mean next-token NLL of the compressed model on them
            "plan_cost": plan.cost,  # what the choice spent (block forwards, seconds), from plan.json
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


def _propagate(runner: BlockwiseModel, built, base: int, output_shape, hidden: torch.Tensor,
               batch_size: int) -> torch.Tensor:
    """The built layer's output on `hidden`: the next layer's calibration input."""
    layer = build_block(runner.adapter, built.tensors, base, built.shape or output_shape, runner.device, runner.dtype)
    return runner.run_block(layer, base, hidden, batch_size)


def _errors_line(stats: dict) -> str:
    from .methods.flattengpt import errors_line

    return errors_line(stats)

"""Recovery tuning: LoRA (or full fine-tuning) of a compressed checkpoint, resumable, merged on output.

    recover(model_dir, data, out_dir, options={...}, state_dir=...)

trains any Hugging Face causal-LM directory on instruction data (Alpaca records) or plain text with
its own deterministic loop and writes, atomically, a standard checkpoint to `out_dir`:

    out_dir/config.json, model.safetensors, tokenizer files   the LoRA merged in (loads without peft)
    out_dir/adapter/                                          the adapter alone (peft), LoRA only
    out_dir/curve.csv, curve.png                              step, epoch, loss, lr, val_loss
    out_dir/recovery.json                                     options, data, steps, timings, provenance

The defaults (`RECIPE`) are the paper's recipe (docs/methods.md): LoRA rank 8, alpha 16, dropout
0.05 on every attention and MLP projection, AdamW at 1e-4 with a linear schedule, 2 epochs, batches
of 64 examples in micro-batches of 4, 256-token examples, loss on the response only.

Determinism: the examples of epoch e are visited in the order `torch.randperm(n, seed(seed, e))`; an
optimizer step sums the token losses of its micro-batches and divides by the number of target tokens
of the whole batch, so the gradient does not depend on micro_batch_size. The last batch of an epoch
may be smaller (no example is dropped).

Resume: every `save_every` steps and at the end, `state_dir/step-NNNNNNNN/` is written (to a
temporary folder first, then renamed): trainable parameters and the optimizer's tensors as
safetensors, everything else (optimizer scalars and param groups, scheduler, step, curve, RNG as a
uint8 tensor) as JSON/safetensors; nothing is pickled. The state is keyed by the model fingerprint,
the hash of the tokenised data and the options; a state from other inputs is discarded. A rerun
resumes from the last save and ends, on CPU, with bit-identical weights to an uninterrupted run.

Data size rule: the training split (after the validation records are held out) must hold at least
`batch_size` examples, so that at least one full optimizer step exists; smaller data is refused,
naming the file, before any model is loaded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .data import read_records
from .provenance import atomic_dir, atomic_path, file_sha256, json_sha256, provenance, read_json, write_json
from .runtime import peak_rss_mib

logger = logging.getLogger(__name__)

RECIPE: dict[str, Any] = {
    "rank": 8,
    "alpha": 16,
    "dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "learning_rate": 1e-4,
    "weight_decay": 0.0,
    "schedule": "linear",        # linear | cosine | constant (each after warmup_steps of linear warm-up)
    "warmup_steps": 0,
    "epochs": 2,
    "max_steps": None,           # if set, the number of optimizer steps (overrides epochs)
    "batch_size": 64,            # examples per optimizer step
    "micro_batch_size": 4,       # examples per forward/backward; must divide batch_size
    "cutoff_len": 256,           # tokens per example (longer ones are truncated)
    "seed": 0,
    "full_finetune": False,      # train every parameter instead of a LoRA adapter
    "loss_on": "response",       # response (prompt tokens get label -100) | all
    "val_fraction": 0.05,        # records held out (seeded) for val_loss
    "eval_every": 200,           # steps between val_loss evaluations (0: only at the end)
    "save_every": 200,           # steps between resume saves (0: only at the end)
    "log_every": 10,             # steps between progress lines
}
SCHEDULES = ("linear", "cosine", "constant")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATE_NAME = "alpaca"

COPIED_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                "*.model", "*.tiktoken", "chat_template*", "generation_config.json")


class RecoveryError(ValueError):
    """Bad options or inputs of a recovery run."""


class RecoveryDataError(RecoveryError):
    """Recovery data that cannot be used; the message names the file (and record)."""


class RecoveryInterrupted(RuntimeError):
    """Raised by the `stop_after_steps` test hook, as if the job had been killed."""


# ----------------------------------------------------------------------------- options


def recovery_options(options: dict | None = None) -> dict:
    """RECIPE updated by `options`, validated; errors name the option."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(RECIPE))
    if unknown:
        raise RecoveryError(f"unknown recovery option(s) {', '.join(unknown)}; known: {', '.join(RECIPE)}")
    out = {**RECIPE, **options}

    def bad(name, expected):
        raise RecoveryError(f"recovery option {name} must be {expected}, got {out[name]!r}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for name in ("rank", "epochs", "batch_size", "micro_batch_size", "cutoff_len"):
        if not is_int(out[name]) or out[name] < 1:
            bad(name, "a positive integer")
    if out["cutoff_len"] < 2:
        bad("cutoff_len", "at least 2 (one input and one target token)")
    for name in ("warmup_steps", "eval_every", "save_every", "seed"):
        if out[name] is None and name in ("eval_every", "save_every"):
            out[name] = 0
        if not is_int(out[name]) or out[name] < 0:
            bad(name, "a non-negative integer")
    if not is_int(out["log_every"]) or out["log_every"] < 1:
        bad("log_every", "a positive integer")
    if out["max_steps"] is not None and (not is_int(out["max_steps"]) or out["max_steps"] < 1):
        bad("max_steps", "null or a positive integer")
    if not is_num(out["alpha"]) or out["alpha"] <= 0:
        bad("alpha", "a positive number")
    if not is_num(out["dropout"]) or not 0 <= out["dropout"] < 1:
        bad("dropout", "a number in [0, 1)")
    if not is_num(out["learning_rate"]) or out["learning_rate"] <= 0:
        bad("learning_rate", "a positive number")
    if not is_num(out["weight_decay"]) or out["weight_decay"] < 0:
        bad("weight_decay", "a non-negative number")
    if not is_num(out["val_fraction"]) or not 0 <= out["val_fraction"] < 1:
        bad("val_fraction", "a number in [0, 1)")
    if out["schedule"] not in SCHEDULES:
        bad("schedule", " or ".join(SCHEDULES))
    if out["loss_on"] not in ("response", "all"):
        bad("loss_on", "response or all")
    if not isinstance(out["full_finetune"], bool):
        bad("full_finetune", "true or false")
    modules = out["target_modules"]
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    if not isinstance(modules, (list, tuple)) or not modules or not all(isinstance(m, str) and m for m in modules):
        bad("target_modules", "a non-empty list of module names (or a comma-separated string)")
    out["target_modules"] = list(modules)
    if out["batch_size"] % out["micro_batch_size"]:
        raise RecoveryError(f"recovery option micro_batch_size ({out['micro_batch_size']}) must divide "
                            f"batch_size ({out['batch_size']})")
    out["alpha"], out["dropout"] = float(out["alpha"]), float(out["dropout"])
    out["learning_rate"], out["weight_decay"] = float(out["learning_rate"]), float(out["weight_decay"])
    out["val_fraction"] = float(out["val_fraction"])
    return out


# ----------------------------------------------------------------------------- which models a setting recovers


def recovered_sources(config: dict) -> list[tuple[str, str, str]]:
    """(recovery name, model, source variant) of every model the workflow config's recovery: settings tune.

    The source variant is "calib/target/method" for a compressed model: every run (model, calibration,
    target) whose target is in the setting's `targets` and every method in its `methods` (null: all of
    them, [] none), or "dense" for the dense model of every run's model when the setting has `dense: true`.
    The recovered model is "{source variant}+{name}"; method and recovery names hold no "+" (schema).
    """
    from .config import runs

    found = []
    for name, spec in (config.get("recovery") or {}).items():
        methods = spec.get("methods")
        targets = spec.get("targets")
        if spec.get("dense"):
            found += [(name, model, "dense") for model in dict.fromkeys(run["model"] for run in runs(config))]
        found += [(name, run["model"], f"{run['calibration']}/{run['target']}/{method}")
                  for run in runs(config) if targets is None or run["target"] in targets
                  for method in run["methods"] if methods is None or method in methods]
    return found


# ----------------------------------------------------------------------------- data


def _data_kind(path: Path, kind: str) -> str:
    if kind not in ("auto", "alpaca", "text"):
        raise RecoveryDataError(f"recovery data kind must be auto, alpaca or text, got {kind!r}")
    if kind == "auto":
        return "alpaca" if path.suffix in (".json", ".jsonl") else "text"
    return kind


def n_validation(n: int, val_fraction: float) -> int:
    """Records held out: round(n * val_fraction), at least one when val_fraction > 0 and n > 1."""
    if val_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * val_fraction)))


def _check_size(path, n: int, unit: str, options: dict) -> None:
    n_train = n - n_validation(n, options["val_fraction"])
    if n_train < options["batch_size"]:
        raise RecoveryDataError(
            f"{path}: {n} {unit} give {n_train} training examples after holding out val_fraction "
            f"{options['val_fraction']}, fewer than one batch (batch_size {options['batch_size']}); "
            "give more data or a smaller batch_size")


# `data: {source: hub, name: ...}`: a file of a Hugging Face dataset repository, (repo, file)
HUB_RECORDS: dict[str, tuple[str, str]] = {
    "alpaca": ("yahma/alpaca-cleaned", "alpaca_data_cleaned.json"),  # cleaned Alpaca, 51.8k records
}


def hub_data_location(data: dict) -> tuple[str, str, str | None]:
    """(repo, file, revision) of a `source: hub` recovery data spec: a known `name`, or `repo` and `file`."""
    if data.get("name") is not None:
        if data["name"] not in HUB_RECORDS:
            raise RecoveryDataError(f"unknown hub recovery data {data['name']!r}; known: {', '.join(HUB_RECORDS)} "
                                    "(or give repo and file of any dataset repository)")
        repo, file = HUB_RECORDS[data["name"]]
    elif data.get("repo") and data.get("file"):
        repo, file = data["repo"], data["file"]
    else:
        raise RecoveryDataError("hub recovery data needs a name (" + ", ".join(HUB_RECORDS) + ") or repo and file")
    return repo, file, data.get("revision")


def hub_data_file(data: dict, offline_cache_only: bool = False) -> Path | None:
    """The local path of a hub recovery data file, downloaded into the Hugging Face cache on first use
    (HF_HUB_OFFLINE=1: read from the cache only, as on an air-gapped node).

    offline_cache_only: return None instead of downloading when the file is not in the cache yet
    (config-time checks, which must not download).
    """
    repo, file, revision = hub_data_location(data)
    if offline_cache_only:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, file, revision=revision, repo_type="dataset")
        return Path(found) if isinstance(found, str) else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=file, revision=revision, repo_type="dataset"))
    except Exception as err:  # offline without a cached copy, no such repo or file, no network
        raise RecoveryDataError(f"hub recovery data {repo}/{file}: cannot be fetched ({type(err).__name__}: {err}); "
                                "download it once where the hub is reachable (the Hugging Face cache keeps it), "
                                "or use source: local with a copy of the file") from err


def check_recovery_data(path: str | os.PathLike, kind: str = "auto", options: dict | None = None) -> dict:
    """Check a recovery data file without a tokenizer; return {file, kind, n_records, sha256}.

    Alpaca records (.json list or .jsonl) need string fields `instruction` and `output`; `input` is
    optional (a string or null). A malformed record is named by its 0-based index in the file. An
    empty file (or an empty list) is refused. With `options`, too few records for one batch after
    the validation split are refused as well (plain text is measured in windows, which needs the
    tokenizer: `load_recovery_data` checks it).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise RecoveryDataError(f"recovery data file {path} does not exist")
    kind = _data_kind(path, kind)
    if path.stat().st_size == 0:
        raise RecoveryDataError(f"{path}: the recovery data file is empty")
    info = {"file": str(path), "kind": kind, "sha256": file_sha256(path)}
    if kind == "text":
        if not path.read_text(encoding="utf-8").strip():
            raise RecoveryDataError(f"{path}: the recovery data file holds no text")
        return info
    try:
        records = read_records(path)
    except ValueError as err:
        raise RecoveryDataError(str(err)) from None
    if not records:
        raise RecoveryDataError(f"{path}: the recovery data file holds no records")
    for i, record in enumerate(records):
        where = f"{path}, record {i} (0-based)"
        if not isinstance(record, dict):
            raise RecoveryDataError(f"{where}: expected an object with instruction, output (and optional input), "
                                    f"found a {type(record).__name__}")
        for name in ("instruction", "output"):
            if name not in record:
                raise RecoveryDataError(f"{where}: missing field {name!r}")
            if not isinstance(record[name], str):
                raise RecoveryDataError(f"{where}: field {name!r} must be a string, "
                                        f"found a {type(record[name]).__name__}")
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise RecoveryDataError(f"{where}: field 'input' must be a string or null, "
                                    f"found a {type(record['input']).__name__}")
    info["n_records"] = len(records)
    if options is not None:
        _check_size(path, len(records), "records", recovery_options(options))
    return info


def alpaca_prompt(record: dict) -> str:
    """The standard Alpaca prompt (with or without input) for one record, ending in '### Response:\\n'."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


@dataclass
class RecoveryData:
    train: list[tuple[list[int], list[int]]]   # (input_ids, labels); label -100: no loss
    val: list[tuple[list[int], list[int]]]
    info: dict = field(default_factory=dict)


def _data_spec(spec) -> dict:
    if isinstance(spec, (str, os.PathLike)):
        return {"path": str(spec), "kind": "auto"}
    if isinstance(spec, dict) and ("path" in spec) != ("text" in spec):
        return {"kind": "auto", **spec}
    raise RecoveryDataError("recovery data must be a path, {'path': ..., 'kind': auto|alpaca|text} "
                            f"or {{'text': ...}}, got {spec!r}")


def load_recovery_data(spec, tokenizer, options: dict | None = None) -> RecoveryData:
    """Tokenised training and validation examples.

    `spec`: a file path, {"path": ..., "kind": "auto"|"alpaca"|"text"} (auto: .json/.jsonl are Alpaca
    records, anything else plain text) or {"text": "..."} for text given directly. Alpaca records are
    rendered with the Alpaca template; prompt and response are tokenised apart (so the prompt/response
    boundary is exact), eos is appended and the example truncated to cutoff_len; with loss_on
    response the prompt tokens are labelled -100. Plain text is cut into consecutive cutoff_len
    windows (a tail of fewer than 2 tokens is dropped), loss on every token. Validation examples are
    the first round(n * val_fraction) of a randperm seeded by `seed`.
    """
    options = recovery_options(options)
    spec = _data_spec(spec)
    cutoff, eos = options["cutoff_len"], tokenizer.eos_token_id
    examples: list[tuple[list[int], list[int]]] = []
    if "text" in spec:
        if not isinstance(spec["text"], str) or not spec["text"].strip():
            raise RecoveryDataError("recovery data: the text given directly is empty")
        name, kind, text = "<text>", "text", spec["text"]
        info = {"file": None, "kind": "text", "sha256": hashlib.sha256(text.encode()).hexdigest()}
    else:
        info = check_recovery_data(spec["path"], spec["kind"])
        name, kind = info["file"], info["kind"]
        text = Path(name).read_text(encoding="utf-8") if kind == "text" else None
    no_target = truncated = 0
    if kind == "text":
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), cutoff):
            window = ids[start:start + cutoff]
            if len(window) >= 2:
                examples.append((window, list(window)))
        info.update(template=None, loss_on="all", n_tokens=len(ids))
    else:
        if eos is None:
            raise RecoveryDataError(f"the tokenizer has no eos token; Alpaca examples end with one")
        for record in read_records(name):
            prompt = tokenizer(alpaca_prompt(record), add_special_tokens=True)["input_ids"]
            response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [eos]
            ids = prompt + response
            masked = [-100] * len(prompt) if options["loss_on"] == "response" else list(prompt)
            labels = masked + response
            if len(ids) > cutoff:
                truncated += 1
                ids, labels = ids[:cutoff], labels[:cutoff]
            if all(label == -100 for label in labels[1:]):
                no_target += 1  # the prompt fills cutoff_len: nothing to learn from
                continue
            examples.append((ids, labels))
        info.update(template=TEMPLATE_NAME, loss_on=options["loss_on"], truncated=truncated,
                    dropped_no_target=no_target)
    unit = "windows" if kind == "text" else "usable records"
    if not examples:
        raise RecoveryDataError(f"{name}: no usable examples (cutoff_len {cutoff})")
    _check_size(name, len(examples), unit, options)
    n_val = n_validation(len(examples), options["val_fraction"])
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(options["seed"])).tolist()
    held_out = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in held_out]
    val = [e for i, e in enumerate(examples) if i in held_out]
    digest = hashlib.sha256(json.dumps([train, val], separators=(",", ":")).encode()).hexdigest()
    info.update(n_examples=len(examples), n_train=len(train), n_val=len(val), cutoff_len=cutoff,
                n_target_tokens=sum(sum(1 for x in lab[1:] if x != -100) for _, lab in train),
                examples_sha256=digest)
    return RecoveryData(train=train, val=val, info=info)


# ----------------------------------------------------------------------------- batches and losses


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def n_targets(examples) -> int:
    """Tokens that carry a loss (a label other than -100 at positions 1..)."""
    return sum(sum(1 for x in lab[1:] if x != -100) for _, lab in examples)


def _loss_sum(model, batch: dict, device) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1), ignore_index=-100, reduction="sum")


@torch.no_grad()
def evaluate(model, examples, micro_batch_size: int, pad_id: int, device) -> float | None:
    """Mean token loss on `examples` (None without examples)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(examples), micro_batch_size):
        total += float(_loss_sum(model, collate(examples[i:i + micro_batch_size], pad_id), device))
    model.train(was_training)
    return total / max(n_targets(examples), 1)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"recover:{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------- resume state


def _state_dirs(state_dir: Path) -> list[Path]:
    return sorted(p for p in state_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def _optimizer_to_files(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _optimizer_from_files(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _set_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors, key=lambda k: int(k.rsplit("_", 1)[1]) if k.startswith("torch_cuda_") else -1)
            if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_state(state_dir: Path, key: str, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
               curve: list[dict], extra: dict) -> Path:
    """Write state_dir/step-NNNNNNNN atomically (provenance.atomic_dir); drop older saves."""
    from safetensors.torch import save_file

    final = state_dir / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        write_json(tmp / "state.json", {"key": key, "step": step, "optimizer": opt_meta,
                                        "scheduler": scheduler.state_dict(), "curve": curve, **extra})
    for old in _state_dirs(state_dir):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(state_dir: Path | None, key: str, log) -> Path | None:
    """The newest save made from the same inputs; saves from other inputs are discarded."""
    if state_dir is None or not state_dir.is_dir():
        return None
    found = None
    for path in reversed(_state_dirs(state_dir)):
        try:
            meta = read_json(path / "state.json")
        except (OSError, ValueError):
            meta = None
        if found is None and meta is not None and meta.get("key") == key:
            found = path
            continue
        log(f"recovery: discarding resume state {path} ({'other inputs' if meta else 'unreadable'})")
        shutil.rmtree(path, ignore_errors=True)
    return found


# ----------------------------------------------------------------------------- curve outputs


CURVE_FIELDS = ("step", "epoch", "loss", "lr", "val_loss")


def write_curve(curve: list[dict], out_dir: Path) -> None:
    with atomic_path(out_dir / "curve.csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CURVE_FIELDS)
            writer.writeheader()
            for row in curve:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CURVE_FIELDS})
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([r["step"] for r in curve], [r["loss"] for r in curve], label="training loss")
    val = [(r["step"], r["val_loss"]) for r in curve if r.get("val_loss") is not None]
    if val:
        axes.plot(*zip(*val), marker="o", label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean token loss (nats)")
    axes.set_title("recovery tuning")
    axes.legend()
    with atomic_path(out_dir / "curve.png") as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


# ----------------------------------------------------------------------------- the driver


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise RecoveryError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return names[dtype]


def _scheduler(optimizer, options: dict, total_steps: int):
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    warmup = options["warmup_steps"]
    if options["schedule"] == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if options["schedule"] == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def weights_digest(model_dir: Path) -> str:
    """sha256 over config.json and the sha256 of every safetensors file of a checkpoint: its content.

    The resume key needs the content, not only the shapes (`Checkpoint.fingerprint` hashes headers
    and sizes): a compressed checkpoint rebuilt with other weights of the same shapes (another
    lambda, another calibration) must not resume an adapter trained on the old one. A workflow
    checkpoint's manifest (`<dir>.manifest.json`, integrity.write_manifest) already holds every
    file's sha256, written by the job that built it and checked against the files' sizes by every job
    that reads it; without one every weight file is read once (about 1 s per GB).
    """
    from .integrity import read_manifest, sha256_file

    model_dir = Path(model_dir)
    names = sorted(["config.json"] + [f.name for f in model_dir.glob("*.safetensors")])
    files = (read_manifest(model_dir) or {}).get("files", {})
    digest = hashlib.sha256()
    for name in names:
        size = (model_dir / name).stat().st_size
        known = files.get(name, {})
        sha = known.get("sha256") if known.get("size") == size else None
        digest.update(f"{name}\0{sha or sha256_file(model_dir / name)}\n".encode())
    return digest.hexdigest()


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def recover(model_dir, data, out_dir, *, options: dict | None = None, state_dir=None, device: str = "cpu",
            dtype: str = "auto", log: Callable[[str], None] | None = print,
            stop_after_steps: int | None = None, job_provenance: dict | None = None) -> dict:
    """Recovery-tune the checkpoint in `model_dir` on `data`; write the merged model to `out_dir`.

    `data`: see `load_recovery_data`. `device`: cpu, cuda, cuda:N, mps or auto (cuda when visible).
    `dtype` auto: bfloat16 on CUDA (with gradient checkpointing),
    float32 elsewhere. `state_dir`: where resume saves go (None: no resume). `stop_after_steps` is a
    test hook: raise RecoveryInterrupted once that many steps are done (after any save).
    `job_provenance`: the workflow job's provenance record, used instead of a bare one. Returns the
    content of out_dir/recovery.json.
    """
    started = time.perf_counter()
    log = log or logger.info
    options = recovery_options(options)
    spec = _data_spec(data)
    if "path" in spec:  # the data is checked before anything of the model is read
        check_recovery_data(spec["path"], spec["kind"], options if _data_kind(Path(spec["path"]), spec["kind"])
                            == "alpaca" else None)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import Checkpoint

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise RecoveryError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_recovery_data(spec, tokenizer, options)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    from .blockwise import resolve_device

    device = resolve_device(str(device))  # auto (the workflow's compute.device default): cuda when visible
    torch_dtype = _resolve_dtype(dtype, device)
    fingerprint = Checkpoint(model_dir).fingerprint()
    weights_sha256 = weights_digest(model_dir)
    n_train, bs, mbs = len(dataset.train), options["batch_size"], options["micro_batch_size"]
    steps_per_epoch = math.ceil(n_train / bs)
    total_steps = options["max_steps"] or options["epochs"] * steps_per_epoch
    key = json_sha256({"model": fingerprint, "weights": weights_sha256, "data": dataset.info["examples_sha256"],
                       "options": options,
                       "dtype": str(torch_dtype), "device_type": device.type})

    torch.manual_seed(options["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device)
    model.config.use_cache = False
    if options["full_finetune"]:
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=options["rank"], lora_alpha=options["alpha"], lora_dropout=options["dropout"],
                            target_modules=options["target_modules"], bias="none", task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, config)
        except ValueError as err:
            raise RecoveryError(f"recovery option target_modules {options['target_modules']}: {err}") from err
    if device.type == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in trainable.values())
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=options["learning_rate"],
                                  weight_decay=options["weight_decay"])
    scheduler = _scheduler(optimizer, options, total_steps)

    state_dir = Path(state_dir) if state_dir is not None else None
    step, curve, train_seconds = 0, [], 0.0
    resumed = load_state(state_dir, key, log)
    if resumed is not None:
        from safetensors.torch import load_file

        meta = read_json(resumed / "state.json")
        saved = load_file(str(resumed / "trainable.safetensors"))
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(saved[name])
        _optimizer_from_files(optimizer, load_file(str(resumed / "optimizer.safetensors")), meta["optimizer"])
        scheduler.load_state_dict(meta["scheduler"])
        _set_rng(load_file(str(resumed / "rng.safetensors")))
        step, curve, train_seconds = meta["step"], meta["curve"], meta.get("train_seconds", 0.0)
        log(f"recovery: resuming at step {step} of {total_steps} from {resumed}")
    resumed_from = step

    def save():
        if state_dir is not None:
            save_state(state_dir, key, step, trainable, optimizer, scheduler, curve,
                       {"epoch": step // steps_per_epoch, "position": step % steps_per_epoch,
                        "train_seconds": train_seconds})

    log(f"recovery: {'full fine-tuning' if options['full_finetune'] else 'LoRA'} of {model_dir}, "
        f"{n_trainable:,} trainable parameters, {n_train} training / {len(dataset.val)} validation examples, "
        f"{total_steps} steps of {bs} ({steps_per_epoch} per epoch), {torch_dtype} on {device}")
    model.train()
    perm_epoch, perm = None, None
    session_start, session_steps = time.perf_counter(), 0
    while step < total_steps:
        step_start = time.perf_counter()
        epoch, position = divmod(step, steps_per_epoch)
        if perm_epoch != epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(options["seed"], epoch))
            perm, perm_epoch = torch.randperm(n_train, generator=generator).tolist(), epoch
        batch = [dataset.train[i] for i in perm[position * bs:(position + 1) * bs]]
        targets = max(n_targets(batch), 1)
        optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for i in range(0, len(batch), mbs):
            loss = _loss_sum(model, collate(batch[i:i + mbs], pad_id), device) / targets
            loss.backward()
            loss_total += float(loss.detach())
        if not math.isfinite(loss_total):
            raise FloatingPointError(f"recovery: non-finite loss at step {step + 1}; try a smaller learning_rate "
                                     "or dtype float32")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1
        session_steps += 1
        train_seconds += time.perf_counter() - step_start
        row = {"step": step, "epoch": round(step / steps_per_epoch, 6), "loss": loss_total, "lr": lr,
               "val_loss": None}
        if dataset.val and ((options["eval_every"] and step % options["eval_every"] == 0) or step == total_steps):
            row["val_loss"] = evaluate(model, dataset.val, mbs, pad_id, device)
        curve.append(row)
        if step % options["log_every"] == 0 or step == total_steps or step == resumed_from + 1:
            per_step = (time.perf_counter() - session_start) / session_steps
            val = f", val_loss {row['val_loss']:.4f}" if row["val_loss"] is not None else ""
            log(f"recovery: step {step}/{total_steps} epoch {row['epoch']:.2f} loss {loss_total:.4f}{val} "
                f"lr {lr:.3g}, {per_step:.2f}s/step, {_fmt_seconds(per_step * (total_steps - step))} left")
        if (options["save_every"] and step % options["save_every"] == 0) or step == total_steps:
            save()
        if stop_after_steps is not None and step >= stop_after_steps and step < total_steps:
            raise RecoveryInterrupted(f"stopped after step {step} (test hook)")

    model.eval()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if options["full_finetune"]:
            merged = model
        else:
            model.save_pretrained(tmp / "adapter")
            merged = model.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(tmp)
        for pattern in COPIED_FILES:
            for file in model_dir.glob(pattern):
                if file.is_file():
                    shutil.copy2(file, tmp / file.name)
        write_curve(curve, tmp)
        record_options = {**options, "dtype": str(torch_dtype).removeprefix("torch."), "device": str(device)}
        last_val = next((r["val_loss"] for r in reversed(curve) if r.get("val_loss") is not None), None)
        record = {
            "method": "full_finetune" if options["full_finetune"] else "lora",
            "options": record_options,
            "data": {**dataset.info, "template": dataset.info.get("template")},
            "steps": {"total": total_steps, "per_epoch": steps_per_epoch, "resumed_from": resumed_from,
                      "accumulation": bs // mbs},
            "trainable_parameters": n_trainable,
            "loss": {"first": curve[0]["loss"] if curve else None, "last": curve[-1]["loss"] if curve else None,
                     "val_last": last_val},
            "timings": {"seconds": round(time.perf_counter() - started, 3), "train_seconds": round(train_seconds, 3),
                        "seconds_per_step": round(train_seconds / max(total_steps, 1), 4)},
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "model": {"path": str(model_dir), "fingerprint": fingerprint, "weights_sha256": weights_sha256},
            # a workflow job's record (rule, params, wildcards) when there is one, with the data's hashes
            "provenance": {**(job_provenance or provenance(params=record_options)),
                           "inputs": {**(job_provenance or {}).get("inputs", {}), "model_fingerprint": fingerprint,
                                      "model_weights_sha256": weights_sha256,
                                      "data_sha256": dataset.info["sha256"],
                                      "examples_sha256": dataset.info["examples_sha256"]}},
        }
        write_json(tmp / "recovery.json", record)
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
    log(f"recovery: wrote {out_dir} in {record['timings']['seconds']:.1f}s (peak RSS {record['peak_rss_mib']:.0f} MiB)")
    return record

"""Lazy access to a Hugging Face checkpoint's safetensors files.

Nothing here loads a whole model: tensors are read one by one by name, and parameter counts come
from the safetensors headers, so a 70B checkpoint can be inspected on a laptop.
"""

from __future__ import annotations

import hashlib
import json
import struct
from functools import cached_property
from math import prod
from pathlib import Path

import torch
from safetensors import safe_open

from .adapters import ModelAdapter, get_adapter


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    pass


def _read_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def safetensors_size_problem(file: Path) -> str | None:
    """Whether a safetensors file is as long as its own header says (header length + the end of its
    last tensor's data): a truncated copy or download is found by reading the header alone."""
    size = file.stat().st_size
    expected = None
    try:
        if size >= 8:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if 8 + length <= size:
                    header = json.loads(handle.read(length))
                    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
                    expected = 8 + length + max(ends, default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        return f"{file} does not start with a safetensors header: it is damaged; copy it again"
    if expected is None or size < expected:
        return (f"{file} is {size} bytes{'' if expected is None else f', its header says {expected}'}: the file is "
                "truncated (an interrupted copy or download); copy it again")
    return None


def model_dir_problems(path: str | Path) -> list[str]:
    """What keeps `path` from being read as a model directory, found without reading any weights:
    config.json, safetensors weights (every shard an index names, each at least a header long), a tokenizer."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} does not exist or is not a directory"]
    if not (path / "config.json").is_file():
        return [f"{path} is not a Hugging Face model directory (no config.json); point it at the folder that "
                "save_pretrained wrote"]
    problems = []
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            return [f"{index} is not a safetensors index with a weight_map ({err})"]
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            problems.append(f"{path}: {len(missing)} of the {len(shards)} weight shards that "
                            f"model.safetensors.index.json names are missing ({', '.join(missing[:3])}"
                            f"{', ...' if len(missing) > 3 else ''}); copy the whole model directory")
        files = [path / s for s in shards if (path / s).is_file()]
    elif single.is_file():
        files = [single]
    else:
        other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf", ".h5"))
        found = f" (found {', '.join(other[:3])})" if other else ""
        return [f"{path} has no safetensors weights (model.safetensors or model.safetensors.index.json){found}; "
                "only safetensors are read: convert with `AutoModelForCausalLM.from_pretrained(dir)"
                ".save_pretrained(new_dir, safe_serialization=True)`"]
    for file in files:
        problem = safetensors_size_problem(file)
        if problem:
            problems.append(problem)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the tokenizer beside the "
                        "weights (`AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)")
    return problems


class Checkpoint:
    """A model directory with config.json and model.safetensors or a sharded index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} is not a Hugging Face model directory (no config.json)")
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.tensor_files = {name: self.path / f for name, f in weight_map.items()}
        elif single.is_file():
            self.tensor_files = {name: single for name in _read_header(single) if name != "__metadata__"}
        else:
            raise CheckpointError(
                f"{self.path} has no model.safetensors or model.safetensors.index.json; "
                "convert .bin checkpoints with `save_pretrained(..., safe_serialization=True)`"
            )

    @cached_property
    def config_dict(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @cached_property
    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)

    @cached_property
    def adapter(self) -> ModelAdapter:
        return get_adapter(self.config)

    @cached_property
    def headers(self) -> dict[str, dict]:
        """name -> {dtype, shape} for every tensor, from the file headers only."""
        out: dict[str, dict] = {}
        for file in sorted(set(self.tensor_files.values())):
            for name, info in _read_header(file).items():
                if name != "__metadata__":
                    out[name] = info
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.tensor_files

    def tensor(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.tensor_files:
            raise CheckpointError(f"tensor {name!r} not found in {self.path}")
        with safe_open(self.tensor_files[name], framework="pt", device="cpu") as handle:
            t = handle.get_tensor(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def tensors(self, prefix: str, device="cpu", dtype=None) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with `prefix`, keyed by the rest of the name."""
        by_file: dict[Path, list[str]] = {}
        for name, file in self.tensor_files.items():
            if name.startswith(prefix):
                by_file.setdefault(file, []).append(name)
        out = {}
        for file, names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in names:
                    out[name[len(prefix):]] = handle.get_tensor(name).to(device=device, dtype=dtype)
        return out

    # ------------------------------------------------------------------ sizes and identity
    def numel(self, name: str) -> int:
        return prod(self.headers[name]["shape"])

    def parameter_counts(self) -> dict:
        """Exact parameter counts: total, per block, and the rest (embeddings, final norm, head).

        Each stored tensor counts once, so tied input/output embeddings count once.
        """
        adapter = self.adapter
        per_block = []
        in_blocks = set()
        for i in range(adapter.num_layers):
            prefix = adapter.layer_prefix(i)
            names = [n for n in self.headers if n.startswith(prefix)]
            in_blocks.update(names)
            per_block.append(sum(self.numel(n) for n in names))
        total = sum(self.numel(n) for n in self.headers)
        return {
            "total": total,
            "per_block": per_block,
            "non_block": total - sum(per_block),
            "embedding": self.numel(adapter.embed_key) if adapter.embed_key in self.headers else 0,
        }

    def fingerprint(self) -> str:
        """Hash of config.json and every safetensors header plus file size.

        Cheap for any model size; changes whenever a tensor's name, shape, dtype or byte range does,
        and catches re-saved weights through the file sizes. (Hashing every weight byte is left to
        `provenance.file_sha256` where it is worth the time.)
        """
        digest = hashlib.sha256((self.path / "config.json").read_bytes())
        for file in sorted(set(self.tensor_files.values())):
            digest.update(file.name.encode())
            digest.update(str(file.stat().st_size).encode())
            digest.update(json.dumps(_read_header(file), sort_keys=True).encode())
        return digest.hexdigest()

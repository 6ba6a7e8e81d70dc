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

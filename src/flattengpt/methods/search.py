"""What the searching methods (SLEB, LaCo, SLM) share: resident blocks, counted forwards, resume state.

A search tries many variants of the model on the same few calibration sequences. Two things keep
it cheap without ever holding the model whole: `ResidentBlocks` keeps built blocks loaded while
they fit in a byte budget (least recently used ones go first), so a block is read from the
checkpoint once per search rather than once per trial, and every block forward is counted, so
that the plan can record what the choice cost. `SearchState` saves the search's progress as one
JSON file keyed by a hash of everything the result depends on, so that an interrupted search
resumes where it stopped and a search with other inputs starts afresh.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..blockwise import BlockwiseModel
from ..provenance import json_sha256, write_json


class ResidentBlocks:
    """Blocks of a BlockwiseModel, built on demand and kept while they fit in `budget_bytes`.

    `forward(index, hidden)` runs source block `index` (or a replacement module registered with
    `put`) on `hidden` in batches and counts it as one block forward per call.
    """

    def __init__(self, runner: BlockwiseModel, budget_bytes: int, batch_size: int = 8):
        self.runner, self.budget, self.batch_size = runner, budget_bytes, batch_size
        self.blocks: OrderedDict[object, tuple[nn.Module, int]] = OrderedDict()
        self.forwards = 0

    def _bytes(self, module: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    def _keep(self, key, module: nn.Module) -> nn.Module:
        size = self._bytes(module)
        self.blocks[key] = (module, size)
        while len(self.blocks) > 1 and sum(s for _, s in self.blocks.values()) > self.budget:
            self.blocks.popitem(last=False)
        return module

    def get(self, index: int) -> nn.Module:
        if index in self.blocks:
            self.blocks.move_to_end(index)
            return self.blocks[index][0]
        return self._keep(index, self.runner.load_block(index))

    def put(self, key, module: nn.Module) -> None:
        """Register a replacement block (e.g. a merged one) under a key of the caller's choice."""
        self._keep(key, module)

    def drop(self, key) -> None:
        self.blocks.pop(key, None)

    @torch.no_grad()
    def forward(self, key, hidden: torch.Tensor, base: int | None = None) -> torch.Tensor:
        """Block `key` applied to `hidden`; `base` is the source index whose mask and positions it uses."""
        module = self.blocks[key][0] if key in self.blocks else self.get(key)
        if key in self.blocks:
            self.blocks.move_to_end(key)
        self.forwards += 1
        return self.runner.run_block(module, key if base is None else base, hidden, self.batch_size)


@torch.no_grad()
def mean_nll(runner: BlockwiseModel, final_hidden: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Mean next-token NLL of input_ids from the final residual X_L (final norm, then head)."""
    total, count = runner.next_token_nll(final_hidden, input_ids)
    return total / max(count, 1)


@torch.no_grad()
def final_normed(runner: BlockwiseModel, final_hidden: torch.Tensor) -> torch.Tensor:
    """The final norm applied to X_L: what Hugging Face returns as hidden_states[-1]."""
    norm = runner.adapter.build_final_norm()
    norm.load_state_dict({"weight": runner.checkpoint.tensor(runner.adapter.final_norm_key)})
    norm = norm.to(runner.device, runner.dtype)
    return torch.cat([norm(final_hidden[i:i + 1].to(runner.device, runner.dtype)).to(final_hidden.device)
                      for i in range(final_hidden.shape[0])])


class SearchState:
    """A search's progress in state_dir/state.json, valid only for the same key (inputs and options)."""

    def __init__(self, state_dir: Path | None, key_material: dict, log: Callable[[str], None]):
        self.path = None if state_dir is None else Path(state_dir) / "state.json"
        self.key = json_sha256(key_material)
        self.log = log

    def load(self) -> dict | None:
        if self.path is None:
            return None
        try:
            state = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if state.get("key") != self.key:
            self.log(f"discarding the search state in {self.path.parent}: it was made from other inputs or options")
            return None
        self.log(f"resuming the search from {self.path}")
        return state["progress"]

    def save(self, progress: dict) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"key": self.key, "progress": progress})  # atomic: never half written

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def search_key(search, method: str, k: int, options: dict) -> dict:
    """What a search's result depends on: the model, the calibration ids, the method, k and its options."""
    from ..provenance import tensor_sha256

    return {"model": search.runner.checkpoint.fingerprint(), "ids": tensor_sha256(search.input_ids),
            "method": method, "k": k, "options": options, "dtype": str(search.runner.dtype)}

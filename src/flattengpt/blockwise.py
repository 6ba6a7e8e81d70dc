"""Run a decoder one block at a time, loading each block's weights only while it runs.

This is how every stage that needs hidden states (activations, compression, evaluation of
partially compressed models) walks a model without ever holding it whole on the device: the
embedding, then block 0, 1, ... each built on the meta device and filled from the safetensors
files, then freed.
"""

from __future__ import annotations

import os

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"compute.device {name!r}: no CUDA device is visible on this machine "
                         f"({os.uname().nodename}); set compute.device: auto (or cpu), or run this job on a GPU node")
    return device


class BlockwiseModel:
    """A checkpoint seen as embedding -> blocks -> final norm, each loaded on demand."""

    def __init__(self, checkpoint: Checkpoint | str, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32", attn_implementation: str = "sdpa"):
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        self.adapter = self.checkpoint.adapter
        self.config = self.adapter.config
        self.config._attn_implementation = attn_implementation
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = resolve_dtype(dtype)
        self.rotary = self.adapter.build_rotary(self.device)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.checkpoint.tensor(self.adapter.embed_key, self.device, self.dtype)
        return F.embedding(input_ids.to(self.device), weight)

    def load_block(self, index: int, device: torch.device | None = None) -> nn.Module:
        layer = self.adapter.build_layer(index)
        state = self.checkpoint.tensors(self.adapter.layer_prefix(index), device or self.device, self.dtype)
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()

    def block_kwargs(self, index: int, hidden: torch.Tensor) -> dict:
        """Keyword arguments the model itself would pass block `index` for full, unpadded sequences."""
        seq_len = hidden.shape[1]
        position_ids = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
        return {
            "attention_mask": self.adapter.attention_mask(index, hidden, position_ids),
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden, position_ids),
        }

    @torch.no_grad()
    def run_block(self, block: nn.Module, index: int, hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Apply one block to `hidden` (samples x tokens x hidden, any device) in batches; same device out."""
        out = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], batch_size):
            batch = hidden[start:start + batch_size].to(self.device, self.dtype)
            result = block(batch, **self.block_kwargs(index, batch))
            result = result[0] if isinstance(result, tuple) else result
            out[start:start + batch_size] = result.to(out.device, out.dtype)
        return out

    @torch.no_grad()
    def next_token_nlls(self, hidden: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int = 512) -> list[float]:
        """Summed NLL (float64) of every row of input_ids[:, 1:] from the final residual X_L (final norm, then head).

        Logits are formed `chunk_tokens` positions at a time: a full batch of them (tokens x vocab in
        float32) would dwarf everything else the stage holds. One sum per row, so that a caller can
        save progress row by row (perplexity windows).
        """
        norm = self.adapter.build_final_norm()
        norm.load_state_dict({"weight": self.checkpoint.tensor(self.adapter.final_norm_key)})
        norm = norm.to(self.device, self.dtype)
        head_key = self.adapter.lm_head_key
        if head_key not in self.checkpoint:  # tied input and output embeddings
            head_key = self.adapter.embed_key
        head = self.checkpoint.tensor(head_key, self.device, self.dtype)
        sums = []
        for row in range(hidden.shape[0]):
            total = 0.0  # a Python float: float64
            for start in range(0, hidden.shape[1] - 1, chunk_tokens):
                states = hidden[row, start:start + chunk_tokens][: hidden.shape[1] - 1 - start]
                targets = input_ids[row, start + 1:start + 1 + states.shape[0]]  # position t predicts token t + 1
                logits = (norm(states.to(self.device, self.dtype)) @ head.T).float()
                total += float(F.cross_entropy(logits, targets.to(self.device), reduction="sum"))
            sums.append(total)
        return sums

    def next_token_nll(self, hidden: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int = 512) -> tuple[float, int]:
        """(summed NLL, predictions) of input_ids[:, 1:] from X_L: the row sums of next_token_nlls, in order."""
        return sum(self.next_token_nlls(hidden, input_ids, chunk_tokens), 0.0), hidden.shape[0] * (hidden.shape[1] - 1)

    @torch.no_grad()
    def residual_stream(self, input_ids: torch.Tensor, batch_size: int = 8, start_hidden: torch.Tensor | None = None,
                        start_layer: int = 0, storage_device: str = "cpu") -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (l, X_l) for l = start_layer .. L: the input of block l, and X_L before the final norm.

        Only one block's weights are resident at a time. `start_hidden` resumes from X_start_layer.
        """
        if start_hidden is None:
            hidden = torch.cat([self.embed(input_ids[i:i + batch_size]).to(storage_device)
                                for i in range(0, input_ids.shape[0], batch_size)])
            start_layer = 0
        else:
            hidden = start_hidden.to(storage_device, self.dtype)
        yield start_layer, hidden
        for index in range(start_layer, self.num_layers):
            block = self.load_block(index)
            hidden = self.run_block(block, index, hidden, batch_size)
            del block
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            yield index + 1, hidden

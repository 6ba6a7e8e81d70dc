"""Flattening a group of decoder blocks into one wide block (METHOD.md section 3).

A block is handled as its state dict, named as the adapter names it relative to the block prefix
("self_attn.q_proj.weight", ...). For blocks a..b of a group:

    fold:     W_q,k,v <- W_q,k,v diag(gamma_1)     W_gate,up <- W_gate,up diag(gamma_2)     gamma <- 1
    concat:   q/k/v rows (heads, with their biases), o_proj columns;
              gate/up rows (channels), down_proj columns
    result:   h = x + sum_i Attn_i(N(x));   y = h + sum_i MLP_i(N(h))

Every block keeps its own KV groups: with H/KV query heads per KV head in each block, query head
j of the wide block reads KV head j // (H/KV), which is the KV head of the same source block.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .adapters import BlockShape, ModelAdapter


def names(adapter: ModelAdapter) -> dict[str, str]:
    """Short role -> tensor-name prefix of one block: q, k, v, o, gate, up, down, norm1, norm2."""
    q, k, v, o = adapter.attn_projections
    gate, up, down = adapter.mlp_projections
    return {"q": q, "k": k, "v": v, "o": o, "gate": gate, "up": up, "down": down,
            "norm1": adapter.attn_norm, "norm2": adapter.mlp_norm}


def widen(shape: BlockShape, m: int) -> BlockShape:
    """The shape of m blocks of `shape` concatenated."""
    return replace(shape, num_heads=m * shape.num_heads, num_kv_heads=m * shape.num_kv_heads,
                   intermediate_size=m * shape.intermediate_size)


def check_block(block: dict[str, torch.Tensor], adapter: ModelAdapter, shape: BlockShape) -> None:
    """Raise ValueError unless the block's tensors have the shapes `shape` says."""
    n = names(adapter)
    d, hd = shape.hidden_size, shape.head_dim
    if shape.num_heads % shape.num_kv_heads:
        raise ValueError(f"{shape.num_heads} query heads do not divide into {shape.num_kv_heads} KV heads")
    expected = {
        f"{n['q']}.weight": (shape.num_heads * hd, d),
        f"{n['k']}.weight": (shape.num_kv_heads * hd, d),
        f"{n['v']}.weight": (shape.num_kv_heads * hd, d),
        f"{n['o']}.weight": (d, shape.num_heads * hd),
        f"{n['gate']}.weight": (shape.intermediate_size, d),
        f"{n['up']}.weight": (shape.intermediate_size, d),
        f"{n['down']}.weight": (d, shape.intermediate_size),
        f"{n['norm1']}.weight": (d,),
        f"{n['norm2']}.weight": (d,),
    }
    for name, want in expected.items():
        if name not in block:
            raise ValueError(f"tensor {name} is missing")
        if tuple(block[name].shape) != want:
            raise ValueError(f"{name} has shape {tuple(block[name].shape)}, expected {want} "
                             f"({shape.num_heads} heads x head_dim {hd}, {shape.num_kv_heads} KV heads, "
                             f"intermediate {shape.intermediate_size})")


def fold_norms(block: dict[str, torch.Tensor], adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """Move the RMSNorm gammas into the projections that read the norms; the gammas become 1.

    N(x) W^T = (x / rms(x) * gamma) W^T = (x / rms(x)) (W diag(gamma))^T: exact.
    """
    n = names(adapter)
    out = dict(block)
    for norm, readers in (("norm1", ("q", "k", "v")), ("norm2", ("gate", "up"))):
        gamma = block[f"{n[norm]}.weight"]
        for role in readers:
            weight = block[f"{n[role]}.weight"]
            out[f"{n[role]}.weight"] = (weight.double() * gamma.double()).to(weight.dtype)
        out[f"{n[norm]}.weight"] = torch.ones_like(gamma)
    return out


def concat_blocks(blocks: list[dict[str, torch.Tensor]], adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """One wide block whose attention and MLP are the sums of the blocks' (norms already folded)."""
    n = names(adapter)
    first = blocks[0]
    for block in blocks:
        for norm in ("norm1", "norm2"):
            if not torch.all(block[f"{n[norm]}.weight"] == 1):
                raise ValueError("concat_blocks needs folded norms (gamma = 1); call fold_norms first")

    def cat(name: str, dim: int) -> torch.Tensor:
        return torch.cat([b[name] for b in blocks], dim=dim)

    out = {}
    for role in ("q", "k", "v"):  # heads are rows
        out[f"{n[role]}.weight"] = cat(f"{n[role]}.weight", 0)
        if f"{n[role]}.bias" in first:
            out[f"{n[role]}.bias"] = cat(f"{n[role]}.bias", 0)
    out[f"{n['o']}.weight"] = cat(f"{n['o']}.weight", 1)  # o_proj reads the heads along its input axis
    if f"{n['o']}.bias" in first:  # the attention outputs add up, so do their constant terms
        out[f"{n['o']}.bias"] = sum(b[f"{n['o']}.bias"] for b in blocks)
    for role in ("gate", "up"):
        out[f"{n[role]}.weight"] = cat(f"{n[role]}.weight", 0)
    out[f"{n['down']}.weight"] = cat(f"{n['down']}.weight", 1)
    for norm in ("norm1", "norm2"):
        out[f"{n[norm]}.weight"] = first[f"{n[norm]}.weight"]
    return out


def flatten_group(blocks: list[dict[str, torch.Tensor]], adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """The wide block of a group (METHOD.md section 3): fold every block's norms, then concatenate."""
    return concat_blocks([fold_norms(b, adapter) for b in blocks], adapter)


def pad_block(block: dict[str, torch.Tensor], adapter: ModelAdapter, shape: BlockShape,
              target: BlockShape) -> dict[str, torch.Tensor]:
    """Zero-pad a block of `shape` to the head counts and MLP width of `target` (flatten-only).

    New query heads and KV heads are appended at the end, so with the same H/KV ratio every real
    query head still reads its own KV head and the zero query heads read the zero KV heads. A zero
    query head attends uniformly to zero values and its o_proj columns are zero; a zero MLP channel
    has silu(0) * 0 = 0 and a zero down column: both add exactly nothing.
    """
    if shape.kv_group_size != target.kv_group_size:
        raise ValueError(f"cannot pad {shape.num_heads}/{shape.num_kv_heads} heads to "
                         f"{target.num_heads}/{target.num_kv_heads}: the query heads per KV head differ")
    if min(target.num_heads - shape.num_heads, target.intermediate_size - shape.intermediate_size) < 0:
        raise ValueError("pad_block can only widen a block")
    n = names(adapter)
    hd = shape.head_dim
    extra = {"q": (target.num_heads - shape.num_heads) * hd,
             "k": (target.num_kv_heads - shape.num_kv_heads) * hd,
             "v": (target.num_kv_heads - shape.num_kv_heads) * hd,
             "gate": target.intermediate_size - shape.intermediate_size,
             "up": target.intermediate_size - shape.intermediate_size}

    def pad(t: torch.Tensor, rows: int = 0, cols: int = 0) -> torch.Tensor:
        if t.dim() == 1:
            return torch.cat([t, t.new_zeros(rows)])
        t = torch.cat([t, t.new_zeros(rows, t.shape[1])], dim=0)
        return torch.cat([t, t.new_zeros(t.shape[0], cols)], dim=1)

    out = dict(block)
    for role, rows in extra.items():
        for kind in ("weight", "bias"):
            if f"{n[role]}.{kind}" in block:
                out[f"{n[role]}.{kind}"] = pad(block[f"{n[role]}.{kind}"], rows=rows)
    out[f"{n['o']}.weight"] = pad(block[f"{n['o']}.weight"], cols=extra["q"])
    out[f"{n['down']}.weight"] = pad(block[f"{n['down']}.weight"], cols=extra["gate"])
    return out


def build_block(adapter: ModelAdapter, block: dict[str, torch.Tensor], index: int, shape: BlockShape,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A decoder-block module of `shape` holding `block`'s weights (built as original block `index`)."""
    layer = adapter.build_layer(index, **adapter.width_overrides(shape))
    state = {k: v.to(device=device, dtype=dtype) for k, v in block.items()}
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


def block_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A block module's weights as a plain state dict (detached)."""
    return {k: v.detach() for k, v in layer.state_dict().items()}

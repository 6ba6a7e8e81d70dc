"""Parameter merging of consecutive blocks (LaCo, SLM): one block whose projections combine theirs.

A merged layer's projection weights (q, k, v, o, gate, up, down) are sum_j w_j theta_j over its
source blocks j; its norms and biases are those of its first (lowest) block. The papers' rule for a
window low..low+n is theta_low + sum_{k=1..n} (theta_{low+k} - theta_low), i.e. w_low = 1 - n and
w = 1 for the others; merging windows that contain already merged layers composes the weights
(`compose`). The released code of both papers updates theta_low in place inside that loop, so the
sum telescopes to the top layer's projections: w_top = 1, the others 0 (variant "code").
"""

from __future__ import annotations

import torch

from ..flatten import names
from ..plan import Layer

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def window_weights(items: list[dict[int, float]], rule: str) -> dict[int, float]:
    """Weights of merging `items` (each a weight dict over source blocks, lowest item first) by `rule`.

    paper: base + sum_i (item_i - base) = sum_i item_i - (n - 1) base, base = items[0];
    code:  the top item (the in-place loop of the released code telescopes to it).
    """
    if rule == "code":
        return dict(items[-1])
    if rule != "paper":
        raise ValueError(f"merge rule {rule!r} is not one of paper, code")
    weights: dict[int, float] = {}
    for item in items:
        for block, w in item.items():
            weights[block] = weights.get(block, 0.0) + w
    for block, w in items[0].items():
        weights[block] = weights.get(block, 0.0) - (len(items) - 1) * w
    return {b: w for b, w in sorted(weights.items()) if w != 0.0}


def merge_tensors(ctx, layer: Layer) -> dict[str, torch.Tensor]:
    """The merged layer's tensors: projections sum_j w_j theta_j (accumulated in float64), the rest of blocks[0]."""
    n = names(ctx.runner.adapter)
    base = ctx.source_tensors(layer.base)
    dtypes = {k: v.dtype for k, v in base.items()}
    out = dict(base)
    sources = {b: ctx.source_tensors(b) if b != layer.base else base for b in layer.weights}
    for role in PROJECTIONS:
        key = f"{n[role]}.weight"
        total = torch.zeros(base[key].shape, dtype=torch.float64)
        for block, w in layer.weights.items():
            total += w * sources[block][key].double()
        out[key] = total.to(dtypes[key])
    return out

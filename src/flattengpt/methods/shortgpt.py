"""ShortGPT (Men et al. 2024): drop the k blocks of lowest block influence, all at once.

BI_l = 1 - S[l, l+1], the token-mean cosine between a block's input and output (similarity stage);
the k blocks with the lowest BI go (ties: the lower index), the others are kept bit for bit.
Cost: no block forward beyond the activations the similarity views come from.
"""

from __future__ import annotations

import numpy as np

from ..plan import Plan, check_remove_blocks
from .base import Method, MethodError


def shortgpt_blocks(block_influence, k: int) -> list[int]:
    """The k blocks with the lowest BI_l (ties: lower index), in ascending order."""
    bi = np.asarray(block_influence, dtype=np.float64)
    if bi.ndim != 1 or not np.isfinite(bi).all():
        raise MethodError("block influence must be a finite vector of one value per block; "
                          "recompute the similarity step")
    check_remove_blocks(k, len(bi))
    return sorted(int(b) for b in np.argsort(bi, kind="stable")[:k])


class ShortGPT(Method):
    name = "shortgpt"
    summary = "drop the k blocks of lowest block influence BI_l = 1 - S[l, l+1]"

    def choose(self, k, *, views=None, search=None, target=None) -> Plan:
        removed = shortgpt_blocks(views.block_influence, k)
        kept = [b for b in range(views.num_layers) if b not in removed]
        steps = [{"block": b, "block_influence": float(views.block_influence[b]), "removed": b in removed}
                 for b in np.argsort(views.block_influence, kind="stable").tolist()]
        return Plan.from_kept(views.num_layers, kept, method=self.name, steps=steps)

"""Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"): drop one span.

The span l..l+k-1 whose input X_l and output X_{l+k} are closest in angular distance on the last
token, d(l, l+k) = arccos(cos(X_l[last], X_{l+k}[last])) / pi (similarity stage), is removed; ties
go to the lower l. The paper heals the cut with QLoRA; that is the recovery stage's job here.
Cost: no block forward beyond the activations.
"""

from __future__ import annotations

import numpy as np

from ..plan import Plan, check_remove_blocks
from .base import Method, MethodError


def span_distances(distance, k: int, first: int = 0) -> list[tuple[int, float]]:
    """(l, d(l, l+k)) for every start l >= first of a span of k blocks."""
    D = np.asarray(distance, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1] or not np.isfinite(D).all():
        raise MethodError("the angular distance matrix must be a finite (L+1) x (L+1) matrix; "
                          "recompute the similarity step")
    num_layers = D.shape[0] - 1
    check_remove_blocks(k, num_layers)
    return [(l, float(D[l, l + k])) for l in range(first, num_layers - k + 1)]


def gromov_span(distance, k: int, first: int = 0) -> list[int]:
    """The blocks l..l+k-1 of the start l >= first minimizing d(l, l+k) (ties: lower l)."""
    candidates = span_distances(distance, k, first)
    if not candidates:
        raise MethodError(f"no span of {k} blocks starts at block {first} or later")
    start = min(candidates, key=lambda c: (c[1], c[0]))[0]
    return list(range(start, start + k))


class Gromov(Method):
    name = "gromov"
    summary = "drop the span l..l+k-1 minimizing the last-token angular distance d(l, l+k)"

    def choose(self, k, *, views=None, search=None, target=None) -> Plan:
        span = gromov_span(views.angular_distance, k)
        kept = [b for b in range(views.num_layers) if b not in span]
        steps = [{"start": l, "distance": d, "chosen": l == span[0]}
                 for l, d in span_distances(views.angular_distance, k)]
        return Plan.from_kept(views.num_layers, kept, method=self.name, steps=steps)

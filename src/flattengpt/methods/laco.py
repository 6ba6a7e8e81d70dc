"""LaCo (Yang et al. 2024, "LaCo: Large Language Model Pruning via Layer Collapse"): merge windows top-down.

With C = merge_layers and I = interval, on the current model (a list of layers, some of them
already merged), starting from lay = highest - C:

    while lay >= lowest:
        tmp = current with layers lay..lay+C-1 merged into layer lay   (at most len(current) - lay - 1
                                                                         extra layers: truncated at the top)
        s = mean over the samples of cos(flatten(final normed states of tmp), flatten(those of the original))
        if s > threshold:  current = tmp;  lay -= I;  if lay >= len(current): lay = len(current) - 1 - C
        else:              lay -= 1

A merged layer's projections are theta_lay + sum_k (theta_{lay+k} - theta_lay) over the window's
layers (rule `paper`; a window reaching into an earlier merge composes the weights) or the top
layer's with the bottom layer's norms (rule `code`, what the released notebook's in-place update
computes); see merging.py. Every merge of m layers removes m - 1 blocks; the plan has one `merge`
layer per merged window (weights over its source blocks) and `keep` layers for the rest.

Options (schema `method_merging`, shared with slm): rule paper, threshold null (bisect),
bisection_steps 16, samples 10, sample_len 128, merge_layers 4 (C), interval 2 (I), lowest null
(= 1, the paper's L_low), highest null (= L: the first window ends at the last block).

Cost in block forwards: L once (the original residual stream of the samples, cached), then per
trial 1 + the current layers above the window (it starts from the cached X_lay); a search makes
at most highest - C - lowest + 1 trials (every one lowers lay), and the bisection runs
bisection_steps + 1 searches whose repeated trials come from a memo (plan.cost: block_forwards,
memo_hits, trials).

Departures from the paper and the released notebook (besides those of merging.py: the stop at
k, the bisection, the cosine after the final norm): the window is shortened *before* its trial
to remove at most the blocks still to remove, so the similarity that accepts it is that of the
merge made; and the released `if lay >= len(current)` reset is kept although it cannot fire with
I >= 1 (the merged layer at lay is still there, so lay - I < len(current)).
"""

from __future__ import annotations

from typing import Callable

from .merging import MergingMethod, SearchResult, Similarity, source_model


def laco_search(num_layers: int, similarity: Similarity, threshold: float, *, merge_layers: int, interval: int,
                lowest: int, highest: int, rule: str = "paper", k: int | None = None,
                allowed: Callable[[tuple[int, ...]], bool] | None = None) -> SearchResult:
    """LaCo's control flow on `similarity(window, current)` (window = current-layer indices, inclusive).

    Stops once k blocks are removed (k None: the released algorithm's full run).
    """
    result = SearchResult(source_model(num_layers), num_layers)
    current = result.layers
    lay = highest - merge_layers
    while lay >= lowest and (k is None or result.removed < k):
        extra = min(merge_layers - 1, len(current) - lay - 1)
        if k is not None:
            extra = min(extra, k - result.removed)  # shortened before the trial: never past k
        if extra < 1:  # nothing above lay to merge into it (cannot happen with interval >= 1)
            lay -= 1
            continue
        window = (lay, lay + extra)
        blocks = tuple(b for layer in current[lay:lay + extra + 1] for b in layer.blocks)
        if allowed is not None and not allowed(blocks):
            result.trial(window, current, None, False)
            lay -= 1
            continue
        s = similarity(window, current)
        accepted = s > threshold  # strict, as released: a tie is rejected
        result.trial(window, current, float(s), accepted)
        if accepted:
            result.merge(window, rule, float(s))
            lay -= interval
            if lay >= len(current):
                lay = len(current) - 1 - merge_layers
        else:
            lay -= 1
    return result


class LaCo(MergingMethod):
    name = "laco"
    summary = "LaCo: merge windows of merge_layers layers top-down while the output stays similar"

    def default_bounds(self, num_layers: int) -> tuple[int, int]:
        return 1, num_layers

    def search(self, num_layers, similarity, threshold, k, lowest, highest, allowed=None) -> SearchResult:
        return laco_search(num_layers, similarity, threshold, merge_layers=self.options["merge_layers"],
                           interval=self.options["interval"], lowest=lowest, highest=highest,
                           rule=self.options["rule"], k=k, allowed=allowed)

    def capacity_hint(self, lowest: int, highest: int) -> str:
        return "lower `lowest`, raise `highest`, raise `merge_layers` or lower `interval`"

    def _options_text(self, lowest: int, highest: int) -> str:
        return f" (merge_layers {self.options['merge_layers']}, interval {self.options['interval']})"

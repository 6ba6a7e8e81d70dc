"""SLM (Ding et al. 2025, arXiv 2502.19159, "Sliding-Layer Merging"): windows grown downward from the top.

On the current model, with high = highest - 1 and low = high - 1 (highest null: L - 1, so the
window starts at block L - 2 and the last block stays):

    while low >= lowest:
        tmp = current with layers low..high merged
        s = mean over the samples of cos(flatten(final normed states of tmp), flatten(those of the original))
        if s > threshold:        low -= 1                          (grow the window downward)
        elif low + 1 != high:    merge low+1..high for good;  high = low;  low -= 1
        else:                    high -= 1;  low -= 1              (two layers that do not merge: slide)

Windows never reach an earlier merge (the next window ends below it), so every merged layer is
a flat run of source blocks: theta_low + sum_k (theta_{low+k} - theta_low) (rule `paper`) or the
top block's projections with the bottom block's norms (rule `code`, what the released SLM.py's
in-place update computes); see merging.py. A merge of m blocks removes m - 1.

Options (schema `method_merging`, shared with laco): rule paper, threshold null (bisect),
bisection_steps 16, samples 10, sample_len 128, lowest null (= 0), highest null (= L - 1).
`merge_layers` and `interval` are LaCo's and are ignored here (SLM's windows have no fixed size
and do not jump).

Cost in block forwards: L once (the cached original residual stream of the samples), then per
trial 1 + the current layers above the window; a search makes at most 2 (highest - 1 - lowest)
trials (every step lowers low or high), the bisection bisection_steps + 1 searches, repeated
trials from a memo (plan.cost: block_forwards, memo_hits, trials).

Departures from the paper and the released SLM.py (besides those of merging.py: the stop at k
-- here as soon as an accepted window low..high removes exactly the remaining count --, the
bisection, the cosine after the final norm):
* after a merge the released code keeps `low` and so tries the one-layer window low..low next:
  that trial is the current model itself, which is accepted (its similarity is the merge's,
  which passed), and only then lowers low; the trial is skipped here, with the same outcome;
* when the loop runs out while a window is still growing (accepted down to `lowest`), the
  released code leaves that accepted window unmerged; it is merged here. This never changes a
  plan that removes exactly k (that one stops at k before running out).
"""

from __future__ import annotations

from typing import Callable

from .merging import MergingMethod, SearchResult, Similarity, source_model


def slm_search(num_layers: int, similarity: Similarity, threshold: float, *, lowest: int, highest: int,
               rule: str = "paper", k: int | None = None,
               allowed: Callable[[tuple[int, ...]], bool] | None = None) -> SearchResult:
    """SLM's control flow on `similarity(window, current)` (window = current-layer indices, inclusive).

    Stops once k blocks are removed (k None: the released algorithm's full run).
    """
    result = SearchResult(source_model(num_layers), num_layers)
    current = result.layers
    high = highest - 1
    low = high - 1
    accepted_similarity = None  # that of window low+1..high: the last one accepted while it grew
    while low >= lowest and (k is None or result.removed < k):
        window = (low, high)
        if allowed is not None and not allowed(tuple(range(current[low].blocks[0], current[high].blocks[-1] + 1))):
            s, accepted = None, False
        else:
            s = float(similarity(window, current))
            accepted = s > threshold  # strict, as released: a tie is rejected
        result.trial(window, current, s, accepted)
        if accepted:
            accepted_similarity = s
            if k is not None and high - low == k - result.removed:
                result.merge(window, rule, s)  # growing it further would remove more than k
                break
            low -= 1
        elif low + 1 != high:
            result.merge((low + 1, high), rule, accepted_similarity)
            high = low
            low -= 1  # released: low stays and the one-layer window (the current model) is tried and accepted
        else:
            high -= 1
            low -= 1
    if (k is None or result.removed < k) and low + 1 < high:
        result.merge((low + 1, high), rule, accepted_similarity)  # accepted while growing, left by the released code
    return result


class SLM(MergingMethod):
    name = "slm"
    summary = "SLM: windows grown downward from the top while the output stays similar, then merged"

    def default_bounds(self, num_layers: int) -> tuple[int, int]:
        return 0, num_layers - 1

    def search(self, num_layers, similarity, threshold, k, lowest, highest, allowed=None) -> SearchResult:
        return slm_search(num_layers, similarity, threshold, lowest=lowest, highest=highest,
                          rule=self.options["rule"], k=k, allowed=allowed)

"""FlattenGPT's `plan_criterion: trial_error`: choose the pairs by what compensation leaves, not by input cosine.

The paper merges the adjacent blocks whose inputs are most similar. That ignores what the
compensation can recover: a pair with similar inputs may still lose much when pruned, and out of
the calibration domain it is the compensation's regression that carries the weight. This criterion
compresses every candidate pair (l, l+1) of the original model for real (flatten, prune, compensate:
`compress_group` with the method's own fit options) on the fit part of the calibration sequences,
runs the result on the held-out part, and scores the pair by the fraction of its residual
contribution that the compressed block fails to reproduce there:

    e(l) = ||Y_l - X_{l+2}||^2 / ||X_{l+2} - X_l||^2     on the held-out sequences,

Y_l the compressed block on X_l, X_i the input of block i (the original model's residual stream).
The plan is then the k disjoint pairs of least total score (exact, by dynamic programming over the
chain of candidate blocks), the other blocks kept. Pairs only: groups of more than two blocks have
too many candidates to try (set `max_group_size` to 2 or leave it unset).

Cost, in block forwards of the calibration set: L - 1 to walk the stream, plus per candidate pair
about 2 + 2 m (+ m with the `original` target) with m = 2: the wide block's two statistics passes,
the compressed block on both parts, the original blocks for the target. Memory: three hidden-state
sets of the calibration set (X_l, X_{l+1}, X_{l+2}) on the host, plus one group's compression
(group_memory_bytes). The scores are saved after every pair, so an interrupted search resumes.
"""

from __future__ import annotations

import math

import torch

from ..flatten import build_block
from ..plan import Plan
from ..prune import held_out_split
from .base import MethodError, SearchInputs
from .search import SearchState, search_key


def candidate_pairs(num_layers: int, protect_first: bool, protect_last: bool) -> list[int]:
    """First blocks l of the pairs (l, l+1) that may be flattened."""
    low = 1 if protect_first else 0
    high = num_layers - 2 if protect_last else num_layers - 1  # the pair's second block may be at most `high`
    return [l for l in range(low, high)]


def best_disjoint_pairs(scores: dict[int, float], k: int) -> list[int]:
    """The first blocks of k pairwise disjoint pairs (l, l+1) of least total score (ties: the lower blocks).

    best[i][j] = least total of j disjoint pairs among the candidates whose second block is < i.
    """
    if k == 0:
        return []
    starts = sorted(scores)
    if not starts:
        raise MethodError("no candidate pair to flatten")
    top = max(starts) + 2
    inf = (math.inf, ())
    best = [[inf] * (k + 1) for _ in range(top + 1)]
    for i in range(top + 1):
        best[i][0] = (0.0, ())
    for i in range(2, top + 1):
        l = i - 2  # the pair (l, l+1) ends just before i
        for j in range(1, k + 1):
            skip = best[i - 1][j]
            take = inf
            if l in scores and best[l][j - 1][0] < math.inf:
                total, chosen = best[l][j - 1]
                take = (total + scores[l], chosen + (l,))
            best[i][j] = min(skip, take, key=lambda t: (t[0], t[1]))
    total, chosen = best[top][k]
    if total == math.inf:
        raise MethodError(f"remove_blocks: {k} disjoint pairs do not fit among the {len(starts)} candidate pairs "
                          f"(first blocks {starts[0]}..{starts[-1]}); lower remove_blocks or unprotect first/last")
    return list(chosen)


def _sq(t: torch.Tensor) -> float:
    return sum(float(t[i:i + 1].double().pow(2).sum()) for i in range(t.shape[0]))


@torch.no_grad()
def trial_plan(method, k: int, search: SearchInputs, target: dict | None) -> Plan:
    """The plan of k flattened pairs of least held-out trial error (module docstring)."""
    from .flattengpt import compress_group, validation_settings  # the module imports this one

    target = target or {}
    if target.get("plan_file"):
        raise MethodError("plan_criterion trial_error chooses the groups itself; a target with plan_file needs "
                          "plan_criterion: cosine")
    if target.get("max_group_size") not in (None, 2):
        raise MethodError(f"plan_criterion trial_error plans pairs only: max_group_size "
                          f"{target['max_group_size']} must be 2 or unset")
    runner, o = search.runner, method.options
    num_layers = runner.num_layers
    protect_first, protect_last = bool(target.get("protect_first")), bool(target.get("protect_last"))
    candidates = candidate_pairs(num_layers, protect_first, protect_last)
    ids = search.input_ids
    fit_rows, held_rows = held_out_split(ids.shape[0], o["validation_fraction"], o["validation_seed"])
    options = {"protect_first": protect_first, "protect_last": protect_last, **method.recorded_options()}
    state = SearchState(search.state_dir, search_key(search, method.name, k, options), search.log)
    progress = state.load() or {"scores": {}, "block_forwards": 0}
    per_trial = 2 + 2 * 2 + (2 if o["compensation_target"] == "original" else 0)  # m = 2 (docstring)

    batch = search.batch_size
    stream = torch.cat([runner.embed(ids[i:i + batch]) for i in range(0, ids.shape[0], batch)])
    window = [stream]  # X_l, X_{l+1}, X_{l+2}
    forwards = 0
    for block in range(min(2, num_layers)):
        window.append(runner.run_block(runner.load_block(block), block, window[-1], batch))
        forwards += 1
    for l in range(num_layers - 1):
        x, _, y = window
        if l in candidates and str(l) not in progress["scores"]:
            final, _, stats = compress_group(
                runner, [l, l + 1], x[fit_rows], lambda_factor=o["lambda_factor"],
                compensation_target=o["compensation_target"], attn_compensation=o["attn_compensation"],
                batch_size=batch, solve_device=o["solve_device"], solve_dtype=o["solve_dtype"],
                validation=validation_settings(o))
            layer = build_block(runner.adapter, final, l, runner.adapter.shape, runner.device, runner.dtype)
            out = runner.run_block(layer, l, x[held_rows], batch)
            target_out, start = y[held_rows], x[held_rows]
            error = _sq(out - target_out) / max(_sq(target_out - start), 1e-300)
            progress["scores"][str(l)] = error
            progress["block_forwards"] += per_trial
            state.save(progress)
            search.log(f"trial_error: pair {l}-{l + 1}: held-out relative error {error:.4f} "
                       f"({len(progress['scores'])} of {len(candidates)} pairs)")
            del final, layer, out, stats
        if l + 2 < num_layers:  # slide: X_{l+3} = block l+2 (X_{l+2})
            window = [window[1], window[2], runner.run_block(runner.load_block(l + 2), l + 2, window[2], batch)]
            forwards += 1
    scores = {int(l): s for l, s in progress["scores"].items()}
    chosen = best_disjoint_pairs({l: s for l, s in scores.items() if math.isfinite(s)}, k)
    groups, b = [], 0
    while b < num_layers:
        groups.append([b, b + 1] if b in chosen else [b])
        b += len(groups[-1])
    state.clear()
    steps = [{"pair": [l, l + 1], "held_out_rel_error": scores[l], "chosen": l in chosen} for l in sorted(scores)]
    plan = Plan.from_groups(num_layers, groups, scores=[scores.get(g[0]) if len(g) == 2 else None for g in groups],
                            method=method.name, steps=steps,
                            options={**options, "held_out_sequences": held_rows.tolist(), "criterion": "trial_error"},
                            cost={"block_forwards": progress["block_forwards"] + forwards})
    plan.target = dict(target)
    return plan

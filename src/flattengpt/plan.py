"""The flattening plan: which runs of adjacent blocks become one wide block (METHOD.md section 2).

Greedy search on the block-input similarity S ((L+1) x (L+1)): start from singleton groups and,
k times, merge the adjacent pair of groups g = [a..b], h = [b+1..c] with the largest S[a, c],
the similarity between the input of the merged group's first block and the input of its last
block (for two single blocks, S[l, l+1]). Every merge removes one block: a group of m blocks
becomes one block of the original width.

Also here: resolving a target (a block count, a parameter ratio or a hand-written plan file)
and the block selections of the baselines that read the same activations (ShortGPT, Gromov et al.).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np

TARGET_KEYS = ("remove_blocks", "ratio", "plan_file")


@dataclass
class Plan:
    num_layers: int
    groups: list[list[int]]
    steps: list[dict] = field(default_factory=list)
    group_scores: list[float | None] | None = None  # S[a, c] of each multi-block group a..c
    target: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    params_before: int | None = None
    params_after: int | None = None
    ratio_achieved: float | None = None
    method: str = "flattengpt"

    @property
    def remove_blocks(self) -> int:
        return self.num_layers - len(self.groups)

    @property
    def removed_blocks(self) -> list[int]:
        """Every block but the first of its group: the blocks whose slots disappear."""
        return [block for group in self.groups for block in group[1:]]

    @property
    def kept_blocks(self) -> list[int]:
        return [group[0] for group in self.groups]

    def to_json(self) -> dict:
        record = asdict(self)
        record.update(remove_blocks=self.remove_blocks, removed_blocks=self.removed_blocks,
                      kept_blocks=self.kept_blocks, num_layers_after=len(self.groups))
        order = ["method", "num_layers", "num_layers_after", "remove_blocks", "removed_blocks", "kept_blocks",
                 "groups", "group_scores", "target", "options", "params_before", "params_after",
                 "ratio_achieved", "steps"]
        return {key: record[key] for key in order}

    @classmethod
    def from_json(cls, record: dict) -> "Plan":
        """A Plan from `to_json` output; derived and extra keys (provenance, model) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in names})

    def describe_groups(self) -> list[str]:
        """One readable line per group, i.e. per block of the compressed model."""
        scores = self.group_scores or [None] * len(self.groups)
        width = len(str(len(self.groups) - 1))
        lines = []
        for new_index, (group, score) in enumerate(zip(self.groups, scores)):
            head = f"new block {new_index:>{width}}: "
            if len(group) == 1:
                lines.append(head + f"block {group[0]} kept")
            else:
                score_text = "" if score is None else f", S[{group[0]},{group[-1]}] = {score:.4f}"
                lines.append(head + f"blocks {span_text(group)} flattened ({len(group)} blocks{score_text})")
        return lines


def span_text(group: Sequence[int]) -> str:
    return str(group[0]) if len(group) == 1 else f"{group[0]}-{group[-1]}"


# ----------------------------------------------------------------------------- validation


def _check_similarity(similarity) -> np.ndarray:
    matrix = np.asarray(similarity, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 3:
        raise ValueError(f"the similarity matrix must be square (L+1) x (L+1) with L >= 2 blocks, "
                         f"got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("the similarity matrix has NaN or infinite entries; recompute the similarity step")
    return matrix


def check_remove_blocks(k, num_layers: int, field_name: str = "remove_blocks") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"{field_name}: {k!r} is not a whole number of blocks")
    if not 1 <= k <= num_layers - 1:
        raise ValueError(f"{field_name}: {k} blocks cannot be removed from a model with {num_layers} blocks; "
                         f"give 1 to {num_layers - 1} (at least one block must remain)")
    return int(k)


def _check_options(max_group_size, protect_first, protect_last) -> None:
    if max_group_size is not None and (isinstance(max_group_size, bool) or not isinstance(max_group_size, int)
                                       or max_group_size < 2):
        raise ValueError(f"max_group_size: {max_group_size!r} is not allowed; give an integer >= 2, "
                         "or null for unlimited")
    for name, value in (("protect_first", protect_first), ("protect_last", protect_last)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: {value!r} is not true or false")


def _protected(num_layers: int, protect_first: bool, protect_last: bool) -> set[int]:
    return {block for block, on in ((0, protect_first), (num_layers - 1, protect_last)) if on}


# ----------------------------------------------------------------------------- the greedy search


def greedy_plan(similarity, k: int, max_group_size: int | None = None, protect_first: bool = False,
                protect_last: bool = False) -> Plan:
    """Merge adjacent groups k times, each time the pair with the largest S[a, c] (ties: lower index)."""
    S = _check_similarity(similarity)
    num_layers = S.shape[0] - 1
    check_remove_blocks(k, num_layers)
    _check_options(max_group_size, protect_first, protect_last)
    protected = _protected(num_layers, protect_first, protect_last)

    def may_merge(g: list[int], h: list[int]) -> bool:
        too_big = max_group_size is not None and len(g) + len(h) > max_group_size
        return not too_big and not protected.intersection(g + h)

    groups = [[block] for block in range(num_layers)]
    steps = []
    for step in range(1, k + 1):
        best, best_score = None, -math.inf
        for i in range(len(groups) - 1):
            g, h = groups[i], groups[i + 1]
            # the merged group's first block a = g[0] and last block c = h[-1]: row a, column c
            if may_merge(g, h) and S[g[0], h[-1]] > best_score:  # strict: on ties the lower index stays
                best, best_score = i, S[g[0], h[-1]]
        if best is None:
            raise ValueError(
                f"cannot remove {k} blocks: the greedy search stopped after {step - 1} of {k} merges: "
                f"no adjacent pair of groups can merge with max_group_size={max_group_size}, "
                f"protect_first={protect_first}, protect_last={protect_last} "
                f"(groups so far: {[span_text(g) for g in groups if len(g) > 1]}); "
                f"remove at most {step - 1} blocks, raise or lift max_group_size, drop a protection, "
                "or list the groups yourself in a plan_file")
        g, h = groups[best], groups[best + 1]
        steps.append({"step": step, "left": g, "right": h, "merged": g + h, "score": float(best_score)})
        groups[best:best + 2] = [g + h]
    return Plan(num_layers=num_layers, groups=groups, steps=steps, group_scores=group_scores(S, groups),
                target={"remove_blocks": k},
                options={"max_group_size": max_group_size, "protect_first": protect_first,
                         "protect_last": protect_last, "source": "greedy"})


def group_scores(similarity: np.ndarray, groups: list[list[int]]) -> list[float | None]:
    return [float(similarity[g[0], g[-1]]) if len(g) > 1 else None for g in groups]


# ----------------------------------------------------------------------------- targets


def blocks_for_ratio(ratio: float, total_params: int, params_per_block: int | float | Sequence[int]) -> int:
    """k = round(ratio * total / per_block), the paper's sparsity counted over all parameters.

    With blocks of different sizes the mean block size is used; halves round up.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"ratio: {ratio!r} is outside (0, 1); give the fraction of all parameters to remove, "
                         "e.g. 0.21")
    per_block = float(np.mean(params_per_block)) if isinstance(params_per_block, Sequence) else float(params_per_block)
    return math.floor(ratio * total_params / per_block + 0.5)


def _options(target: dict, options: dict | None) -> dict:
    """max_group_size / protect_first / protect_last from `options`, else the target, else the defaults."""
    defaults = {"max_group_size": None, "protect_first": False, "protect_last": False}
    resolved = {}
    for key, default in defaults.items():
        given = [source[key] for source in (options or {}, target) if source.get(key) is not None]
        resolved[key] = given[0] if given else default
    return resolved


def make_plan(similarity, param_counts: dict, target: dict, options: dict | None = None) -> Plan:
    """A plan for `target` ({"remove_blocks": k}, {"ratio": r} or {"plan_file": path}), with parameter counts.

    `param_counts` is {"total": int, "per_block": [int, ...]} as `Checkpoint.parameter_counts` gives it.
    """
    S = _check_similarity(similarity)
    num_layers = S.shape[0] - 1
    per_block = [int(n) for n in param_counts["per_block"]]
    total = int(param_counts["total"])
    if len(per_block) != num_layers:
        raise ValueError(f"the similarity matrix covers {num_layers} blocks ({num_layers + 1} rows) but the model "
                         f"has {len(per_block)}; recompute the similarity for this model")
    given = [key for key in TARGET_KEYS if target.get(key) is not None]
    if len(given) != 1:
        raise ValueError(f"target: give exactly one of remove_blocks, ratio or plan_file (got {given or 'none'})")
    opts = _options(target, options)
    _check_options(**opts)

    if given == ["plan_file"]:
        plan = plan_from_file(target["plan_file"], num_layers)
        _check_file_plan_options(plan, target["plan_file"], **opts)
        plan.group_scores = group_scores(S, plan.groups)
    else:
        if given == ["ratio"]:
            k = blocks_for_ratio(target["ratio"], total, per_block)
            if not 1 <= k <= num_layers - 1:
                share = float(np.mean(per_block)) / total
                raise ValueError(f"ratio: {target['ratio']} of {total:,} parameters is {k} blocks of "
                                 f"{np.mean(per_block):,.0f} (one block is {share:.4f} of the model); give a ratio "
                                 f"that removes 1 to {num_layers - 1} blocks, i.e. between "
                                 f"{0.5 * share:.4f} and {(num_layers - 0.5) * share:.4f}")
        else:
            k = check_remove_blocks(target["remove_blocks"], num_layers)
        try:
            plan = greedy_plan(S, k, **opts)
        except ValueError as err:
            resolved = f" (k = {k} blocks)" if given == ["ratio"] else ""
            raise ValueError(f"{given[0]}: {target[given[0]]}{resolved}: {err}") from err
    plan.target = dict(target)
    plan.options = {**opts, "source": plan.options["source"]}
    removed = sum(per_block[block] for block in plan.removed_blocks)
    plan.params_before, plan.params_after = total, total - removed
    plan.ratio_achieved = removed / total
    return plan


# ----------------------------------------------------------------------------- hand-written plans


def plan_from_file(path: str | Path, num_layers: int) -> Plan:
    """A plan written by hand: YAML or JSON {"groups": [[0], [1, 2], ...]}.

    Either a full partition of blocks 0..L-1 or only the merged groups; unlisted blocks stay alone.
    """
    path = Path(path)
    where = f"plan_file {path}"
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"{where}: cannot be read ({err}); check the path") from err
    try:
        if path.suffix == ".json":
            content = json.loads(text)
        else:
            import yaml

            content = yaml.safe_load(text)
    except Exception as err:  # yaml.YAMLError, json.JSONDecodeError
        raise ValueError(f"{where}: not valid YAML/JSON ({err})") from err
    if not isinstance(content, dict) or not isinstance(content.get("groups"), list):
        raise ValueError(f"{where}: expected a mapping with a `groups` list, e.g. `groups: [[0], [1, 2], [3]]`")

    owner: dict[int, int] = {}
    groups = []
    for n, group in enumerate(content["groups"]):
        name = f"groups[{n}] = {group!r}"
        if not isinstance(group, list) or not group or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in group):
            raise ValueError(f"{where}: {name} is not a non-empty list of block indices; write it like [4, 5]")
        outside = [b for b in group if not 0 <= b < num_layers]
        if outside:
            raise ValueError(f"{where}: {name} has block {outside[0]} outside 0..{num_layers - 1} "
                             f"(the model has {num_layers} blocks); use indices from 0 to {num_layers - 1}")
        if group != list(range(group[0], group[0] + len(group))):
            raise ValueError(f"{where}: {name} is not a run of consecutive blocks in ascending order; "
                             f"a group must look like [{group[0]}, {group[0] + 1}, ...]")
        for block in group:
            if block in owner:
                raise ValueError(f"{where}: block {block} is in groups[{owner[block]}] = "
                                 f"{content['groups'][owner[block]]!r} and in {name}; list each block once")
            owner[block] = n
        groups.append(list(group))
    groups += [[block] for block in range(num_layers) if block not in owner]
    groups.sort()
    if len(groups) == num_layers:
        raise ValueError(f"{where}: no group has more than one block, so nothing would be removed; "
                         "list at least one run of consecutive blocks, e.g. [4, 5]")
    return Plan(num_layers=num_layers, groups=groups, target={"plan_file": str(path)},
                options={"max_group_size": None, "protect_first": False, "protect_last": False, "source": "file"})


def _check_file_plan_options(plan: Plan, path, max_group_size, protect_first, protect_last) -> None:
    """A hand-written plan must still respect the constraints the target states."""
    protected = _protected(plan.num_layers, protect_first, protect_last)
    for n, group in enumerate(plan.groups):
        if len(group) > 1 and protected.intersection(group):
            raise ValueError(f"plan_file {path}: the group of blocks {span_text(group)} merges protected block "
                             f"{sorted(protected.intersection(group))[0]} (protect_first={protect_first}, "
                             f"protect_last={protect_last}); leave it out of the groups or drop the protection")
        if max_group_size is not None and len(group) > max_group_size:
            raise ValueError(f"plan_file {path}: the group of blocks {span_text(group)} has {len(group)} blocks, "
                             f"more than max_group_size={max_group_size}; split it or raise max_group_size")


# ----------------------------------------------------------------------------- baselines on the same activations


def shortgpt_blocks(block_influence: Sequence[float], k: int) -> list[int]:
    """ShortGPT: the k blocks with the lowest BI_l (ties: lower index), in ascending order."""
    bi = np.asarray(block_influence, dtype=np.float64)
    check_remove_blocks(k, len(bi))
    return sorted(int(b) for b in np.argsort(bi, kind="stable")[:k])


def gromov_span(distance, k: int) -> list[int]:
    """Gromov et al.: the blocks l..l+k-1 of the start l minimizing d(l, l+k) (ties: lower l)."""
    D = _check_similarity(distance)
    num_layers = D.shape[0] - 1
    check_remove_blocks(k, num_layers)
    start = int(np.argmin([D[l, l + k] for l in range(num_layers - k + 1)]))  # argmin returns the first minimum
    return list(range(start, start + k))

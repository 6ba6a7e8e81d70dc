"""The flattening plan: which runs of adjacent blocks become one wide block (METHOD.md section 2).

Greedy search on the block-input similarity S ((L+1) x (L+1)): start from singleton groups and,
k times, merge the adjacent pair of groups g = [a..b], h = [b+1..c] with the largest S[a, c],
the similarity between the input of the merged group's first block and the input of its last
block (for two single blocks, S[l, l+1]). Every merge removes one block: a group of m blocks
becomes one block of the original width.

Also here: the plan format every method writes (Plan: for every output layer, its source blocks
and how it is made from them), resolving a target (a block count, a parameter ratio or a
hand-written plan file) and parameter counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np

TARGET_KEYS = ("remove_blocks", "ratio", "plan_file")
PLAN_FORMAT = 2

# How an output layer comes from its source blocks (plan.json "layers"[i]["op"]):
OPS = {
    "keep": "one source block, as it is",
    "flatten": "the blocks flattened into one wide block (then pruned back by FlattenGPT, or padded by flatten-only)",
    "merge": "one block whose projections are a linear combination of the blocks' (weights), norms of the first",
    "patch": "the first block with a fitted linear map folded into it that stands in for the others (ReplaceMe)",
}


@dataclass
class Layer:
    """One block of the compressed model: the source blocks it stands for and how it is made from them.

    `blocks` is a run of consecutive source blocks; blocks[0] is the layer's base, whose config
    entries (attention type, sliding window) the new layer takes. `weights` (op merge only) maps a
    source block to its coefficient in the merged projections q/k/v/o/gate/up/down.
    """

    op: str
    blocks: list[int]
    weights: dict[int, float] | None = None
    score: float | None = None

    @property
    def base(self) -> int:
        return self.blocks[0]

    def to_json(self) -> dict:
        record = {"op": self.op, "blocks": list(self.blocks)}
        if self.weights is not None:
            record["weights"] = {str(b): float(w) for b, w in sorted(self.weights.items())}
        if self.score is not None:
            record["score"] = float(self.score)
        return record

    @classmethod
    def from_json(cls, record: dict) -> "Layer":
        weights = record.get("weights")
        return cls(op=record["op"], blocks=[int(b) for b in record["blocks"]],
                   weights=None if weights is None else {int(b): float(w) for b, w in weights.items()},
                   score=record.get("score"))


@dataclass
class Plan:
    """For every block of the compressed model, which source blocks it comes from and how.

    Source blocks that no layer lists are dropped. `steps` is the trace of the method's choice
    (greedy merges and their scores, SLEB's losses per round, a threshold bisection, ...).
    """

    num_layers: int
    layers: list[Layer]
    steps: list[dict] = field(default_factory=list)
    target: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    params_before: int | None = None
    params_after: int | None = None
    ratio_achieved: float | None = None
    method: str = "flattengpt"
    cost: dict = field(default_factory=dict)  # block_forwards and seconds the choice spent

    @classmethod
    def from_groups(cls, num_layers: int, groups: list[list[int]], scores: list[float | None] | None = None,
                    **kwargs) -> "Plan":
        """A partition into runs of blocks: one flattened layer per group (a single block is kept)."""
        scores = scores or [None] * len(groups)
        layers = [Layer("keep" if len(g) == 1 else "flatten", list(g), score=s) for g, s in zip(groups, scores)]
        return cls(num_layers=num_layers, layers=layers, **kwargs)

    @classmethod
    def from_kept(cls, num_layers: int, kept: Sequence[int], **kwargs) -> "Plan":
        """Keep the listed blocks as they are, drop the others."""
        return cls(num_layers=num_layers, layers=[Layer("keep", [int(b)]) for b in sorted(kept)], **kwargs)

    @property
    def groups(self) -> list[list[int]]:
        """The source blocks of each output layer."""
        return [list(layer.blocks) for layer in self.layers]

    @property
    def group_scores(self) -> list[float | None]:
        return [layer.score for layer in self.layers]

    @property
    def remove_blocks(self) -> int:
        return self.num_layers - len(self.layers)

    @property
    def kept_blocks(self) -> list[int]:
        """The base block of every output layer."""
        return [layer.base for layer in self.layers]

    @property
    def removed_blocks(self) -> list[int]:
        """Every source block that is not the base of an output layer: the slots that disappear."""
        kept = set(self.kept_blocks)
        return [block for block in range(self.num_layers) if block not in kept]

    @property
    def dropped_blocks(self) -> list[int]:
        """Source blocks no output layer stands for."""
        listed = {block for layer in self.layers for block in layer.blocks}
        return [block for block in range(self.num_layers) if block not in listed]

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "method": self.method, "num_layers": self.num_layers,
                "num_layers_after": len(self.layers), "remove_blocks": self.remove_blocks,
                "removed_blocks": self.removed_blocks, "dropped_blocks": self.dropped_blocks,
                "kept_blocks": self.kept_blocks, "layers": [layer.to_json() for layer in self.layers],
                "groups": self.groups, "target": self.target, "options": self.options,
                "params_before": self.params_before, "params_after": self.params_after,
                "ratio_achieved": self.ratio_achieved, "cost": self.cost, "steps": self.steps}

    @classmethod
    def from_json(cls, record: dict) -> "Plan":
        """A Plan from `to_json` output; derived and extra keys (provenance, model) are ignored."""
        if "layers" not in record:
            raise ValueError("not a plan.json of format 2 (no `layers`); rerun the plan step")
        names = {f.name for f in fields(cls)} - {"layers"}
        return cls(layers=[Layer.from_json(layer) for layer in record["layers"]],
                   **{key: value for key, value in record.items() if key in names})

    def validate(self, layer_type=None) -> "Plan":
        """Raise ValueError unless every source block appears once, in order, in runs of consecutive blocks.

        `layer_type(block)`, where given, forbids flatten and merge layers that mix attention types.
        """
        seen: list[int] = []
        for i, layer in enumerate(self.layers):
            where = f"layers[{i}] ({layer.op} {layer.blocks})"
            if layer.op not in OPS:
                raise ValueError(f"{where}: op {layer.op!r} is not one of {', '.join(OPS)}")
            blocks = layer.blocks
            if not blocks or blocks != list(range(blocks[0], blocks[0] + len(blocks))):
                raise ValueError(f"{where}: not a non-empty run of consecutive blocks in ascending order")
            if blocks[0] < 0 or blocks[-1] >= self.num_layers:
                raise ValueError(f"{where}: the model has blocks 0-{self.num_layers - 1} only")
            if layer.op == "keep" and len(blocks) != 1:
                raise ValueError(f"{where}: a kept layer has exactly one source block")
            if layer.op in ("flatten", "merge", "patch") and len(blocks) < 2:
                raise ValueError(f"{where}: {layer.op} needs two or more source blocks")
            if layer.op == "merge":
                if not layer.weights or not set(layer.weights) <= set(blocks):
                    raise ValueError(f"{where}: a merge needs weights over its own blocks, got {layer.weights}")
            elif layer.weights is not None:
                raise ValueError(f"{where}: only merge layers carry weights")
            if layer_type is not None and layer.op in ("flatten", "merge"):
                types = {layer_type(b) for b in blocks}
                if len(types) > 1:
                    raise ValueError(f"{where}: mixes attention types {sorted(types)}; one block has one mask")
            if seen and blocks[0] <= seen[-1]:
                raise ValueError(f"{where}: overlaps or precedes the layer before it (blocks must appear once, in order)")
            seen += blocks
        if not self.layers:
            raise ValueError("the plan has no layers")
        return self

    def describe_groups(self) -> list[str]:
        """One readable line per block of the compressed model, then the dropped blocks."""
        width = len(str(len(self.layers) - 1))
        lines = []
        for new_index, layer in enumerate(self.layers):
            head = f"new block {new_index:>{width}}: "
            group = layer.blocks
            if layer.op == "keep":
                lines.append(head + f"block {group[0]} kept")
            elif layer.op == "flatten":
                score = "" if layer.score is None else f", S[{group[0]},{group[-1]}] = {layer.score:.4f}"
                lines.append(head + f"blocks {span_text(group)} flattened ({len(group)} blocks{score})")
            elif layer.op == "merge":
                terms = " ".join(f"{w:+g}*theta_{b}" for b, w in sorted(layer.weights.items()))
                lines.append(head + f"blocks {span_text(group)} merged: projections {terms}, norms of block {group[0]}")
            else:
                lines.append(head + f"block {group[0]} patched to stand in for blocks {span_text(group[1:])}")
        if self.dropped_blocks:
            lines.append(f"dropped: blocks {', '.join(map(str, self.dropped_blocks))}")
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
    return Plan.from_groups(num_layers, groups, group_scores(S, groups), steps=steps, target={"remove_blocks": k},
                options={"max_group_size": max_group_size, "protect_first": protect_first,
                         "protect_last": protect_last, "source": "greedy"})


def span_plan(similarity, k: int, max_group_size: int | None = None, protect_first: bool = False,
              protect_last: bool = False) -> Plan:
    """One contiguous group of k + 1 blocks, a..a+k, of the largest S[a, a+k] (ties: lower a); the others kept.

    FlattenGPT's own criterion (the inputs of the group's first and last blocks nearly identical) applied
    to a single span, the shape Gromov et al. and ReplaceMe cut out, instead of k greedy merges.
    """
    S = _check_similarity(similarity)
    num_layers = S.shape[0] - 1
    check_remove_blocks(k, num_layers)
    _check_options(max_group_size, protect_first, protect_last)
    if max_group_size is not None and max_group_size < k + 1:
        raise ValueError(f"a span of {k + 1} blocks removes {k}: max_group_size={max_group_size} allows at most "
                         f"{max_group_size} blocks in a group; lift max_group_size or use plan_criterion cosine")
    protected = _protected(num_layers, protect_first, protect_last)
    starts = [a for a in range(num_layers - k) if not protected.intersection(range(a, a + k + 1))]
    if not starts:
        raise ValueError(f"cannot remove {k} blocks as one span of {k + 1}: the model has {num_layers} blocks "
                         f"(protect_first={protect_first}, protect_last={protect_last}); remove fewer blocks")
    steps = [{"start": a, "group": [a, a + k], "score": float(S[a, a + k])} for a in starts]
    best = max(starts, key=lambda a: (S[a, a + k], -a))  # the largest score; on ties the lower start
    for step in steps:
        step["chosen"] = step["start"] == best
    groups = [[b] for b in range(best)] + [list(range(best, best + k + 1))] + \
             [[b] for b in range(best + k + 1, num_layers)]
    return Plan.from_groups(num_layers, groups, group_scores(S, groups), steps=steps, target={"remove_blocks": k},
                            options={"max_group_size": max_group_size, "protect_first": protect_first,
                                     "protect_last": protect_last, "source": "span"})


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


def target_blocks(target: dict, param_counts: dict, num_layers: int) -> int:
    """k, the blocks a target removes: remove_blocks as given, or round(ratio * total / per block)."""
    per_block = [int(n) for n in param_counts["per_block"]]
    total = int(param_counts["total"])
    if len(per_block) != num_layers:
        raise ValueError(f"the similarity matrix covers {num_layers} blocks ({num_layers + 1} rows) but the model "
                         f"has {len(per_block)}; recompute the similarity for this model")
    given = [key for key in TARGET_KEYS if target.get(key) is not None]
    if len(given) != 1:
        raise ValueError(f"target: give exactly one of remove_blocks, ratio or plan_file (got {given or 'none'})")
    if given == ["plan_file"]:
        raise ValueError("target: a plan_file lists its groups; it has no block count")
    if given == ["ratio"]:
        k = blocks_for_ratio(target["ratio"], total, per_block)
        if not 1 <= k <= num_layers - 1:
            share = float(np.mean(per_block)) / total
            raise ValueError(f"ratio: {target['ratio']} of {total:,} parameters is {k} blocks of "
                             f"{np.mean(per_block):,.0f} (one block is {share:.4f} of the model); give a ratio "
                             f"that removes 1 to {num_layers - 1} blocks, i.e. between "
                             f"{0.5 * share:.4f} and {(num_layers - 0.5) * share:.4f}")
        return k
    return check_remove_blocks(target["remove_blocks"], num_layers)


def count_parameters(plan: Plan, param_counts: dict) -> Plan:
    """Set the plan's parameter counts: every output layer has the width of one source block (its base)."""
    per_block = [int(n) for n in param_counts["per_block"]]
    total = int(param_counts["total"])
    removed = sum(per_block[block] for block in plan.removed_blocks)
    plan.params_before, plan.params_after = total, total - removed
    plan.ratio_achieved = removed / total
    return plan


def make_plan(similarity, param_counts: dict, target: dict, options: dict | None = None, span: bool = False) -> Plan:
    """The flattening plan for `target` ({"remove_blocks": k}, {"ratio": r} or {"plan_file": path}).

    `param_counts` is {"total": int, "per_block": [int, ...]} as `Checkpoint.parameter_counts` gives it.
    `span`: one group of k + 1 blocks (span_plan) instead of the greedy merges.
    """
    S = _check_similarity(similarity)
    num_layers = S.shape[0] - 1
    given = [key for key in TARGET_KEYS if target.get(key) is not None]
    opts = _options(target, options)
    _check_options(**opts)

    if given == ["plan_file"]:
        if len(param_counts["per_block"]) != num_layers:
            target_blocks({"remove_blocks": 1}, param_counts, num_layers)  # raises the mismatch
        plan = plan_from_file(target["plan_file"], num_layers)
        _check_file_plan_options(plan, target["plan_file"], **opts)
        for layer, score in zip(plan.layers, group_scores(S, plan.groups)):
            layer.score = score
    else:
        k = target_blocks(target, param_counts, num_layers)
        try:
            plan = (span_plan if span else greedy_plan)(S, k, **opts)
        except ValueError as err:
            resolved = f" (k = {k} blocks)" if given == ["ratio"] else ""
            raise ValueError(f"{given[0]}: {target[given[0]]}{resolved}: {err}") from err
    plan.target = dict(target)
    plan.options = {**opts, "source": plan.options["source"]}
    return count_parameters(plan, param_counts)


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
    return Plan.from_groups(num_layers, groups, target={"plan_file": str(path)},
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

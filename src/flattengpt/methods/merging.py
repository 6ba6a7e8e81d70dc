"""Parameter merging of consecutive blocks (LaCo, SLM): the merge rule and the search machinery they share.

**The merge.** A merged layer's projection weights (q, k, v, o, gate, up, down) are
sum_j w_j theta_j over its source blocks j (accumulated in float64, saved in the source dtype);
its norms and biases are those of its first (lowest) block. Rule `paper` (both papers' formula)
for a window of items low..low+n is

    theta_low + sum_{k=1..n} (theta_{low+k} - theta_low),   i.e. w_low = 1 - n and w = 1 for the others;

an item may itself be a merged layer (LaCo's windows reach into earlier merges), whose weight
dict then enters the formula as its theta does, so the weights compose (`window_weights`): a flat
window a, b, c gives {a: -1, b: 1, c: 1}; [a, b, M] with M = {c: -2, d: 1, e: 1, f: 1} gives
{a: -1, b: 1, c: -2, d: 1, e: 1, f: 1}. Rule `code`: the released code of both papers updates
theta_low in place inside that loop (theta_low += theta_j - theta_low), which telescopes to the
top item's projections with the bottom item's norms: the weights of the top item.

**The searches** (laco.py, slm.py) walk windows of the *current* model (a list of `CurrentLayer`,
each a run of source blocks and its weights) from the top down, and accept a window when the mean
over the calibration samples of cos(flattened final normed hidden states of the trial model,
those of the original model) is above a threshold. The control flow of each search is a pure
function of a `similarity(window, current)` callable (tested on hand-made ones); `Trials` is the
real one:

* it never copies the model: blocks are built from the checkpoint and kept in `ResidentBlocks`
  (merged ones registered with `put`);
* it computes once the original residual stream X_0..X_L of the samples (L block forwards) and
  the original final normed states; since windows move down and everything below a window's
  lowest block is still original, a trial starts from the cached X_low, runs the merged block,
  then the current layers above the window (1 + layers-above forwards);
* it memoizes similarities by (the merged window, the current layers above it), which is all a
  trial depends on, so that the repeated searches of the threshold bisection reuse them.

**Hitting k** (`MergingMethod.choose`): the searches stop as soon as they have removed k blocks,
and a window that would remove more than the remaining count is shortened before its trial, so
removed(threshold) is in [0, k]. With `threshold: null` the threshold is bisected in [-1, 1] for
the largest one at which the search removes exactly k (removed == k raises the lower bound,
anything else lowers the upper bound; after `bisection_steps` halvings the lower bound's plan is
used). Whether accepting everything (threshold -1) can remove k follows from the options alone
(the control flow run on an always-accepting similarity), so an impossible k is refused before
any forward. Progress is saved after every bisection step (SearchState, with the memo).

Departures from the papers and the released code, common to both methods: the stop at k and the
shortened last window (the released code has no target count, only a hand-set threshold); the
bisection instead of a hand-set threshold; the cosine is taken, as in the released code, on
Hugging Face's hidden_states[-1], which is after the final norm; windows that would mix
attention types (a merged block has one mask) are rejected without a trial.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from ..flatten import build_block, names
from ..plan import Layer, Plan, check_remove_blocks
from .base import Method, MethodError
from .search import ResidentBlocks, SearchState, final_normed, search_key

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
RULES = ("paper", "code")


# ----------------------------------------------------------------------------- the merge rule


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


def merged_tensors(tensors_of: Callable[[int], dict[str, torch.Tensor]], adapter, base: int,
                   weights: dict[int, float], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A merged block's tensors: projections sum_j w_j theta_j (float64, then the source dtype), the rest of `base`.

    The terms are added in ascending block order wherever this runs (search trials on the device,
    the driver on the host): with the same order and integer weights the float64 sums are the same
    bits, so a trial measures exactly the model the driver writes.
    """
    n = names(adapter)
    base_tensors = tensors_of(base)
    out = dict(base_tensors)  # norms and biases (qwen2's q/k/v) of the lowest block, as the released code keeps them
    sources = {b: base_tensors if b == base else tensors_of(b) for b in weights}
    for role in PROJECTIONS:
        key = f"{n[role]}.weight"
        total = torch.zeros(base_tensors[key].shape, dtype=torch.float64, device=device)
        for block, w in sorted(weights.items()):
            total += w * sources[block][key].to(device=device, dtype=torch.float64)
        out[key] = total.to(base_tensors[key].dtype)
    return out


def merge_tensors(ctx, layer: Layer) -> dict[str, torch.Tensor]:
    """The driver's merged layer (build_standard): `merged_tensors` of the plan layer on the host."""
    return merged_tensors(ctx.source_tensors, ctx.runner.adapter, layer.base, layer.weights)


def build_merged_block(runner, blocks: Sequence[int], weights: dict[int, float]) -> nn.Module:
    """A block module of the merged layer over `blocks` (built as its lowest block, on the runner's device)."""
    adapter = runner.adapter
    tensors = merged_tensors(lambda b: runner.checkpoint.tensors(adapter.layer_prefix(b)), adapter, blocks[0],
                             weights, runner.device)
    return build_block(adapter, tensors, blocks[0], adapter.shape, runner.device, runner.dtype)


# ----------------------------------------------------------------------------- the current model


class CurrentLayer(NamedTuple):
    """One layer of the model a search is editing: a run of source blocks and the weights over them.

    Hashable and canonical (weights sorted by block), so that it can key the memo and the resident blocks.
    """

    blocks: tuple[int, ...]
    weights: tuple[tuple[int, float], ...]

    @classmethod
    def source(cls, block: int) -> "CurrentLayer":
        return cls((block,), ((block, 1.0),))

    @property
    def merged(self) -> bool:
        return len(self.blocks) > 1

    @property
    def weight_dict(self) -> dict[int, float]:
        return dict(self.weights)

    def to_json(self) -> list:
        return [list(self.blocks), [[b, w] for b, w in self.weights]]


def merge_items(items: Sequence[CurrentLayer], rule: str) -> CurrentLayer:
    """The layer that merging the consecutive current layers `items` (lowest first) makes."""
    blocks = tuple(b for item in items for b in item.blocks)
    weights = window_weights([item.weight_dict for item in items], rule)
    return CurrentLayer(blocks, tuple(sorted(weights.items())))


def source_model(num_layers: int) -> list[CurrentLayer]:
    return [CurrentLayer.source(b) for b in range(num_layers)]


@dataclass
class SearchResult:
    """What one run of a search's control flow did: its trials, its accepted merges, the model it ended with."""

    layers: list[CurrentLayer]
    num_layers: int
    # window: current-layer indices (inclusive); span: its first and last source block
    trials: list[dict] = field(default_factory=list)   # every window tried, in order
    merges: list[dict] = field(default_factory=list)   # the merges made, in order
    scores: dict[CurrentLayer, float] = field(default_factory=dict)  # merged layer -> similarity that accepted it

    @property
    def removed(self) -> int:
        return self.num_layers - len(self.layers)

    def trial(self, window: tuple[int, int], current: list[CurrentLayer], similarity: float | None,
              accepted: bool) -> None:
        low, high = window
        self.trials.append({"window": [low, high], "span": [current[low].blocks[0], current[high].blocks[-1]],
                            "similarity": similarity, "accepted": accepted})

    def merge(self, window: tuple[int, int], rule: str, similarity: float) -> CurrentLayer:
        """Merge current layers window[0]..window[1] into one (in place) and record it."""
        low, high = window
        merged = merge_items(self.layers[low:high + 1], rule)
        self.merges.append({"window": [low, high], "span": [merged.blocks[0], merged.blocks[-1]],
                            "weights": {str(b): w for b, w in merged.weights}, "removes": high - low,
                            "similarity": similarity})
        self.layers[low:high + 1] = [merged]
        self.scores[merged] = similarity
        return merged


Similarity = Callable[[tuple[int, int], list[CurrentLayer]], float]


def always_accept(window, current) -> float:
    """The similarity of a search that accepts every window: what the options alone allow."""
    return math.inf


def mean_cosine(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of cos(out[i].flatten(), reference[i].flatten()), in float64."""
    a, b = out.flatten(1).double(), reference.to(out.device).flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return float(cos.mean())


# ----------------------------------------------------------------------------- trials on the model


class Trials:
    """`similarity(window, current)` on the model: cached original states, resident blocks, a memo.

    `memo` maps a trial's key (the merged window and the layers above it, as JSON) to its
    similarity; it is plain JSON so that the resume state can carry it.
    """

    def __init__(self, runner, input_ids: torch.Tensor, rule: str, *, batch_size: int = 8,
                 resident_bytes: int = 8 * 2**30, memo: dict[str, float] | None = None):
        self.runner, self.input_ids, self.rule, self.batch_size = runner, input_ids, rule, batch_size
        self.resident = ResidentBlocks(runner, resident_bytes, batch_size)
        self.memo: dict[str, float] = dict(memo or {})
        self.hits = 0
        self.evaluated = 0
        self.states: list[torch.Tensor] | None = None  # X_0..X_L of the samples (host), built on the first miss
        self.reference: torch.Tensor | None = None     # the original final normed states (device)

    @property
    def forwards(self) -> int:
        return self.resident.forwards

    def _cache(self) -> None:
        """The original residual stream and final normed states of the samples: L block forwards, once."""
        if self.states is not None:
            return
        runner, ids, bs = self.runner, self.input_ids, self.batch_size
        hidden = torch.cat([runner.embed(ids[i:i + bs]) for i in range(0, ids.shape[0], bs)])
        states = [hidden.cpu()]
        for block in range(runner.num_layers):
            hidden = self.resident.forward(block, hidden)
            states.append(hidden.cpu())  # host: L + 1 of them would crowd the device on a large model
        self.reference = final_normed(runner, hidden)
        self.states = states

    def _forward(self, layer: CurrentLayer, hidden: torch.Tensor) -> torch.Tensor:
        if not layer.merged:
            return self.resident.forward(layer.blocks[0], hidden)
        # keyed by the blocks too: [4, M(5-7)] has M's weights by rule paper (2-4 and 3-4 the same by rule
        # code), but the norms of its own lowest block
        key = ("merge", layer)
        if key not in self.resident.blocks:
            # registered just before its forward, so it is the newest entry and cannot be evicted in between
            self.resident.put(key, build_merged_block(self.runner, layer.blocks, layer.weight_dict))
        return self.resident.forward(key, hidden, base=layer.blocks[0])

    @staticmethod
    def key(merged: CurrentLayer, above: Sequence[CurrentLayer]) -> str:
        return json.dumps([merged.to_json(), [layer.to_json() for layer in above]])

    def __call__(self, window: tuple[int, int], current: list[CurrentLayer]) -> float:
        return self.similarity(window, current)

    @torch.no_grad()
    def similarity(self, window: tuple[int, int], current: list[CurrentLayer]) -> float:
        low, high = window
        if any(layer != CurrentLayer.source(i) for i, layer in enumerate(current[:low])):
            # the cached X_low is the trial's input only if nothing below the window has changed
            raise RuntimeError(f"window {window} lies above a merged layer; the searches move down, never up")
        merged = merge_items(current[low:high + 1], self.rule)
        above = current[high + 1:]
        key = self.key(merged, above)
        if key in self.memo:
            self.hits += 1
            return self.memo[key]
        self._cache()
        hidden = self.states[merged.blocks[0]].to(self.runner.device)
        for layer in [merged, *above]:
            hidden = self._forward(layer, hidden)
        # most windows are rejected or superseded: the window's module goes, so that it does not push source
        # blocks out of the budget; an accepted merge is rebuilt once, by the first trial that runs it above
        self.resident.drop(("merge", merged))
        value = mean_cosine(final_normed(self.runner, hidden), self.reference)
        self.evaluated += 1
        self.memo[key] = value
        return value


# ----------------------------------------------------------------------------- the methods' shared driver


MERGING_OPTIONS = {"rule": "paper", "threshold": None, "bisection_steps": 16, "samples": 10, "sample_len": 128,
                   "merge_layers": 4, "interval": 2, "lowest": None, "highest": None}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MergingMethod(Method):
    """LaCo and SLM: options, the capacity check, the threshold bisection, resume and the plan.

    A subclass sets `default_bounds(L)` (lowest, highest when null) and `search(L, similarity,
    threshold, k, lowest, highest, allowed)`, its control flow.
    """

    chooses_with = "model"
    fits = False
    OPTIONS = dict(MERGING_OPTIONS)
    CHOICE_OPTIONS = tuple(MERGING_OPTIONS)  # every option changes the choice; the build has none

    # ------------------------------------------------------------------ options

    def check_options(self) -> None:
        o = self.options
        if o["rule"] not in RULES:
            raise MethodError(f"method {self.name}: rule {o['rule']!r} is not one of {', '.join(RULES)}")
        t = o["threshold"]
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            raise MethodError(f"method {self.name}: threshold {t!r} is not a number; give a cosine in [-1, 1], "
                              "or null to bisect for the threshold that removes exactly k blocks")
        for name, least in (("bisection_steps", 1), ("samples", 1), ("sample_len", 2), ("merge_layers", 2),
                            ("interval", 1)):
            if not _is_int(o[name]) or o[name] < least:
                raise MethodError(f"method {self.name}: {name} {o[name]!r} is not allowed; give an integer >= {least}")
        for name, least in (("lowest", 0), ("highest", 1)):
            if o[name] is not None and (not _is_int(o[name]) or o[name] < least):
                raise MethodError(f"method {self.name}: {name} {o[name]!r} is not allowed; give an integer >= "
                                  f"{least}, or null for the method's default")
        if o["lowest"] is not None and o["highest"] is not None and o["lowest"] >= o["highest"]:
            raise MethodError(f"method {self.name}: lowest {o['lowest']} must be below highest {o['highest']}")

    def default_bounds(self, num_layers: int) -> tuple[int, int]:
        raise NotImplementedError

    def bounds(self, num_layers: int) -> tuple[int, int]:
        """(lowest, highest) for a model of `num_layers` blocks, defaults filled in and checked against it."""
        low_default, high_default = self.default_bounds(num_layers)
        lowest = low_default if self.options["lowest"] is None else self.options["lowest"]
        highest = high_default if self.options["highest"] is None else self.options["highest"]
        if highest > num_layers:
            raise MethodError(f"method {self.name}: highest {highest} is above the model's {num_layers} blocks; "
                              f"give at most {num_layers} (windows end below block `highest`), or null")
        if lowest >= highest:
            raise MethodError(f"method {self.name}: lowest {lowest} is not below highest {highest} for a model of "
                              f"{num_layers} blocks; lower `lowest` or raise `highest`")
        return lowest, highest

    def search(self, num_layers: int, similarity: Similarity, threshold: float, k: int | None, lowest: int,
               highest: int, allowed: Callable[[tuple[int, ...]], bool] | None = None) -> SearchResult:
        raise NotImplementedError

    def capacity_hint(self, lowest: int, highest: int) -> str:
        """Which options to change when even accepting every window removes too few blocks."""
        return "lower `lowest` or raise `highest`"

    def max_removable(self, num_layers: int) -> int:
        """The most blocks the search can remove with these options: every window accepted (no forward)."""
        lowest, highest = self.bounds(num_layers)
        return self.search(num_layers, always_accept, -1.0, None, lowest, highest).removed

    # ------------------------------------------------------------------ the choice

    def choose(self, k, *, views=None, search=None, target=None) -> Plan:
        if search is None:
            raise MethodError(f"method {self.name} chooses from the model and calibration tokens (the search rule)")
        started = time.perf_counter()
        runner, o = search.runner, self.options
        num_layers = runner.num_layers
        try:
            k = check_remove_blocks(k, num_layers)
        except ValueError as err:
            raise MethodError(str(err)) from err
        lowest, highest = self.bounds(num_layers)
        adapter = runner.adapter

        def allowed(blocks) -> bool:  # a merged block has one attention mask
            return len({adapter.layer_type(b) for b in blocks}) == 1

        # what accepting every window removes follows from the options: refuse an impossible k before any forward
        ceiling = self.search(num_layers, always_accept, -1.0, k, lowest, highest, allowed).removed
        if ceiling < k:
            raise MethodError(
                f"method {self.name}: cannot remove {k} blocks: even accepting every merge, the windows over blocks "
                f"{lowest} (lowest) to {highest - 1} (below highest = {highest}) remove at most {ceiling}"
                f"{self._options_text(lowest, highest)}; {self.capacity_hint(lowest, highest)}, or remove fewer "
                "blocks")

        ids = torch.as_tensor(search.input_ids, dtype=torch.long)
        if ids.dim() != 2 or ids.numel() == 0:
            raise MethodError(f"method {self.name}: calibration ids must be a non-empty [n, T] tensor, "
                              f"got shape {tuple(ids.shape)}")
        ids = ids[:o["samples"], :o["sample_len"]]
        if ids.shape[0] < o["samples"] or ids.shape[1] < o["sample_len"]:
            search.log(f"{self.name}: the calibration set has {ids.shape[0]} sequences of {ids.shape[1]} tokens; "
                       f"the similarity uses those (samples {o['samples']}, sample_len {o['sample_len']})")

        state = SearchState(search.state_dir, search_key(search, self.name, k, self.recorded_options()), search.log)
        progress = state.load() if o["threshold"] is None else None
        trials = Trials(runner, ids, o["rule"], batch_size=search.batch_size, resident_bytes=search.resident_bytes,
                        memo=(progress or {}).get("memo"))
        previous = (progress or {}).get("cost", {"block_forwards": 0, "memo_hits": 0, "trials": 0})

        def run(threshold: float) -> SearchResult:
            return self.search(num_layers, trials, threshold, k, lowest, highest, allowed)

        def cost() -> dict:
            return {"block_forwards": previous["block_forwards"] + trials.forwards,
                    "memo_hits": previous["memo_hits"] + trials.hits,
                    "trials": previous["trials"] + trials.evaluated}

        trace: list[dict] = []
        if o["threshold"] is not None:
            threshold = float(o["threshold"])
            result = run(threshold)
            trace.append({"kind": "search", "threshold": threshold, "removed": result.removed, **cost()})
            if result.removed != k:
                raise MethodError(f"method {self.name}: threshold {threshold} removed {result.removed} of {k} blocks "
                                  f"(the search stops at k); lower the threshold, or give threshold: null to bisect "
                                  "for the largest threshold that removes exactly k")
        else:
            lo, hi, step = -1.0, 1.0, 0
            if progress:
                lo, hi, step, trace = progress["lo"], progress["hi"], progress["step"], progress["trace"]
            while step < o["bisection_steps"]:
                mid = (lo + hi) / 2
                before = cost()
                result = run(mid)
                now = cost()
                trace.append({"kind": "bisection", "step": step + 1, "threshold": mid, "removed": result.removed,
                              "forwards": now["block_forwards"] - before["block_forwards"],
                              "memo_hits": now["memo_hits"] - before["memo_hits"]})
                search.log(f"{self.name}: bisection step {step + 1}/{o['bisection_steps']}: threshold {mid:.6f} "
                           f"removes {result.removed} of {k} blocks ({trace[-1]['forwards']} block forwards)")
                if result.removed == k:
                    lo = mid
                else:
                    hi = mid
                step += 1
                state.save({"lo": lo, "hi": hi, "step": step, "trace": trace, "memo": trials.memo, "cost": now})
            threshold = lo
            result = run(lo)  # from the memo when lo was a bisection point; the accept-everything search if not
            if result.removed != k:  # only at lo = -1 with a similarity of -1 or NaN, which no window passes
                raise MethodError(f"method {self.name}: even threshold -1 removed only {result.removed} of {k} "
                                  "blocks: some trial similarities are -1 or not finite; check the model with "
                                  "compute.dtype float32")
        state.clear()

        layers = [Layer("merge", list(layer.blocks), weights=layer.weight_dict, score=result.scores.get(layer))
                  if layer.merged else Layer("keep", [layer.blocks[0]]) for layer in result.layers]
        steps = [{"kind": "samples", "sequences": int(ids.shape[0]), "tokens": int(ids.shape[1])}, *trace,
                 *({"kind": "trial", **t} for t in result.trials), *({"kind": "merge", **m} for m in result.merges)]
        plan = Plan(num_layers=num_layers, layers=layers, method=self.name, steps=steps,
                    options={**self.recorded_options(), "threshold_found": threshold,
                             "lowest_used": lowest, "highest_used": highest},
                    cost={**cost(), "seconds": round(time.perf_counter() - started, 3)})
        plan.validate(adapter.layer_type)
        search.log(f"{self.name}: threshold {threshold:.6f} removes {k} blocks in {len(result.merges)} merges; "
                   f"{plan.cost['block_forwards']} block forwards, {plan.cost['memo_hits']} memo hits")
        return plan

    def _options_text(self, lowest: int, highest: int) -> str:
        return ""

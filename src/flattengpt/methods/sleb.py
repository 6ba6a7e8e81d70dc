"""SLEB (Song et al. 2024): k greedy rounds, each removing the block whose removal costs least loss.

Round r starts from the model with the blocks removed so far, its remaining blocks b_0 < ... <
b_{R-1}. For every candidate position p (not a protected block) the trial model is the current
one without b_p, and its loss is the mean next-token NLL of the calibration tokens,

    loss(p) = mean_{i, t} -log softmax(head(norm(Y_p)))[i, t, ids[i, t+1]],
    Y_p = f_{b_{R-1}} o ... o f_{b_{p+1}} (X_p),     X_p = f_{b_{p-1}} o ... o f_{b_0} (embed(ids)),

and the block b_p of the lowest loss is removed for good (ties: the lower block index). k rounds
remove k blocks.

The trials share their prefix: one running residual stream X_p walks the remaining blocks in
order; trial p starts from it, skips b_p and runs the R - p - 1 blocks after it, then the stream
advances through b_p. A round therefore holds two copies of the hidden states (the stream and
the trial) and costs

    sum_{p in C} (R - 1 - p) + max(C)  block forwards    (C: the candidate positions),

R(R-1)/2 + R - 1 without protections and (R-2)(R-1)/2 + R - 2 with both (the stream never
advances past the last candidate, whose trial already reached the output). Blocks stay loaded
between trials while they fit in `resident_bytes` (search.ResidentBlocks), so each is read from
the checkpoint about once per search. The forwards of every round and their total are recorded
in the plan's steps and cost. A step's `loss` is that of the model after its removal, so the
last step's is the compressed model's calibration loss.

Options (all change the choice):
    protect_first  true   never remove block 0
    protect_last   true   never remove block L-1
    samples        null   measure the losses on the first `samples` calibration sequences; null: all

Progress is saved after every round (the removals, every round's candidate losses and the
forwards spent), so an interrupted search resumes after its last finished round and removes the
same blocks; the state is cleared once the plan is made.

Departures from the paper and its released code (jiwonsong-dev/SLEB, sleb.py): the paper states
the criterion as perplexity and the code compares summed NLLs (each window's mean cross-entropy
times its length); the loss here is the mean NLL over the calibration windows, a monotone map of
both, so the argmin is the same. The released code measures it on 128 wikitext2 samples of the
model's sequence length (`model.seqlen`); here on the workflow's calibration windows
(`samples`: the first ones of them). Its `early_barrier`/`latter_barrier` protect any number of
blocks at each end (default 1 and 1); here protect_first/protect_last protect one block each or
none. It reruns the whole model for every trial (R - 1 block forwards each, (R-2)(R-1) a round
with both barriers); sharing the prefix computes the same losses up to floating-point rounding
with about half the forwards. Ties go to the lower
index in both (a strict `<` over ascending candidates).
"""

from __future__ import annotations

import math

import torch

from ..plan import Plan
from .base import Method, MethodError, protection
from .search import ResidentBlocks, SearchState, mean_nll, search_key


def candidate_positions(remaining: list[int], protected: set[int]) -> list[int]:
    """Positions p in `remaining` whose block may be removed."""
    return [p for p, block in enumerate(remaining) if block not in protected]


def round_forwards(num_remaining: int, positions: list[int]) -> int:
    """Block forwards of one round: every trial's suffix, plus the stream's advances up to the last candidate."""
    return sum(num_remaining - 1 - p for p in positions) + (max(positions) if positions else 0)


@torch.no_grad()
def sleb_round(blocks: ResidentBlocks, remaining: list[int], protected: set[int], input_ids: torch.Tensor,
               batch_size: int) -> dict[int, float]:
    """{block: calibration loss of the current model without it} for every removable block of `remaining`."""
    runner = blocks.runner
    positions = candidate_positions(remaining, protected)
    last = max(positions)
    stream = torch.cat([runner.embed(input_ids[i:i + batch_size]) for i in range(0, input_ids.shape[0], batch_size)])
    losses = {}
    for p, block in enumerate(remaining):
        if p in positions:
            trial = stream
            for later in remaining[p + 1:]:
                trial = blocks.forward(later, trial)
            losses[block] = mean_nll(runner, trial, input_ids)
            del trial
        if p == last:
            break  # no candidate left downstream: advancing the stream further would be wasted forwards
        stream = blocks.forward(block, stream)
    return losses


def pick(losses: dict[int, float]) -> int:
    """The block of the lowest loss; ties go to the lower block index; non-finite losses never win."""
    def rank(block):
        loss = losses[block]
        return (loss if math.isfinite(loss) else math.inf, block)

    return min(losses, key=rank)


class SLEB(Method):
    name = "sleb"
    chooses_with = "model"
    fits = False
    OPTIONS = {"protect_first": True, "protect_last": True, "samples": None}
    CHOICE_OPTIONS = ("protect_first", "protect_last", "samples")
    summary = "k rounds of removing the block whose removal costs least calibration loss"

    def check_options(self) -> None:
        for key in ("protect_first", "protect_last"):
            if not isinstance(self.options[key], bool):
                raise MethodError(f"method sleb: {key}: {self.options[key]!r} is not true or false")
        samples = self.options["samples"]
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise MethodError(f"method sleb: samples: {samples!r} is not allowed; give a whole number >= 1 "
                              "(the first calibration sequences), or null for all of them")

    def _protected(self, num_layers: int, target: dict | None) -> tuple[bool, bool, set[int]]:
        first, last = protection(self.options, target, True)
        return first, last, {b for b, on in ((0, first), (num_layers - 1, last)) if on}

    def max_removable(self, num_layers: int, target: dict | None = None) -> int:
        # at least one block must stay even when nothing is protected
        return min(num_layers - 1, num_layers - len(self._protected(num_layers, target)[2]))

    def choose(self, k, *, views=None, search=None, target=None) -> Plan:
        if search is None:
            raise MethodError("method sleb chooses from the model and the calibration tokens (the search rule)")
        runner = search.runner
        num_layers = runner.num_layers
        protect_first, protect_last, protected = self._protected(num_layers, target)
        limit = self.max_removable(num_layers, target)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MethodError(f"remove_blocks: {k!r} is not a whole number of blocks >= 1")
        if k > limit:
            raise MethodError(
                f"remove_blocks: sleb cannot remove {k} of {num_layers} blocks with protect_first={protect_first} "
                f"and protect_last={protect_last}: at most {limit} are removable; lower remove_blocks to "
                f"{limit} or less, or set protect_first/protect_last to false")

        input_ids = search.input_ids
        samples = self.options["samples"]
        if samples is not None:
            if samples > input_ids.shape[0]:
                search.log(f"sleb: samples = {samples} but there are only {input_ids.shape[0]} calibration "
                           "sequences; using all of them")
            input_ids = input_ids[:samples]
        options = {"protect_first": protect_first, "protect_last": protect_last, "samples": samples}
        state = SearchState(search.state_dir, search_key(search, self.name, k, options), search.log)
        progress = state.load() or {"removed": [], "steps": [], "block_forwards": 0}
        if progress["removed"]:
            search.log(f"sleb: resumed after round {len(progress['removed'])} of {k} "
                       f"(removed so far: {progress['removed']})")

        blocks = ResidentBlocks(runner, search.resident_bytes, search.batch_size)
        for r in range(len(progress["removed"]) + 1, k + 1):
            remaining = [b for b in range(num_layers) if b not in progress["removed"]]
            before = blocks.forwards
            losses = sleb_round(blocks, remaining, protected, input_ids, search.batch_size)
            removed = pick(losses)
            if not math.isfinite(losses[removed]):
                raise MethodError(f"sleb round {r}: every trial loss is non-finite; rerun with dtype float32")
            spent = blocks.forwards - before
            # str keys: what the plan.json (and the resume state) hold, so a resumed plan equals a fresh one
            step = {"round": r, "removed": removed, "loss": losses[removed],
                    "losses": {str(b): loss for b, loss in losses.items()}, "block_forwards": spent}
            progress = {"removed": progress["removed"] + [removed], "steps": progress["steps"] + [step],
                        "block_forwards": progress["block_forwards"] + spent}
            state.save(progress)
            runner_up = [pick({b: l for b, l in losses.items() if b != removed})] if len(losses) > 1 else []
            other = f"; next best block {runner_up[0]} ({losses[runner_up[0]]:.4f})" if runner_up else ""
            search.log(f"sleb round {r}/{k}: removed block {removed} (loss {losses[removed]:.4f}{other}), "
                       f"{spent} block forwards, {progress['block_forwards']} in all")

        state.clear()
        kept = [b for b in range(num_layers) if b not in progress["removed"]]
        return Plan.from_kept(num_layers, kept, method=self.name, steps=progress["steps"], options=options,
                              cost={"block_forwards": progress["block_forwards"]})

"""The interface every depth-compression method implements, and what the driver hands it.

A method does two things:

1. **choose** what to remove or merge, as a `Plan` (plan.py): for every block of the compressed
   model, the source blocks it stands for and how (keep, flatten, merge, patch); blocks that no
   layer lists are dropped. Methods with `chooses_with = "similarity"` choose in the cheap `plan`
   rule from the similarity views of the cached activations (`SimilarityViews`); methods with
   `chooses_with = "model"` choose in the `search` rule, which reads the model and the
   calibration tokens (`SearchInputs`) and may save resume state.
2. **build** one output layer's tensors from its source blocks (`build`), called by the driver
   (compress.py) layer by layer from the bottom. Methods with `fits = True` get the calibration
   hidden states at the layer's input in the compressed model (propagated by the driver through
   the layers already built) and fit their compensation on them.

Options: `OPTIONS` maps each option to its default (the schema repeats them; a test compares),
`CHOICE_OPTIONS` names those that change the choice. The workflow passes the choice options to
the plan/search rule and the rest to compress, so that changing a fit option reruns only the
compress stage of that method, and methods without fit options never rerun for one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from ..blockwise import BlockwiseModel
from ..plan import Layer, Plan

logger = logging.getLogger(__name__)


class MethodError(ValueError):
    """A method's options or inputs are wrong; the message names the option and the fix."""


@dataclass
class SimilarityViews:
    """The views of the cached activations (similarity stage): all (L+1) x (L+1) but the BI vector."""

    cosine: np.ndarray            # S[i, j] = token-mean cos(X_i, X_j)
    angular_distance: np.ndarray  # d(i, j) = arccos(cos(X_i[last], X_j[last])) / pi
    block_influence: np.ndarray   # BI_l = 1 - S[l, l+1], length L

    @property
    def num_layers(self) -> int:
        return self.cosine.shape[0] - 1

    @classmethod
    def load(cls, cosine_csv, angular_csv=None, influence_csv=None) -> "SimilarityViews":
        from ..similarity import load_matrix

        cosine, _ = load_matrix(cosine_csv)
        angular = load_matrix(angular_csv)[0] if angular_csv else np.full_like(cosine, np.nan)
        if influence_csv:
            import pandas as pd

            frame = pd.read_csv(influence_csv)
            if "block_influence" not in frame.columns:
                raise MethodError(f"{influence_csv}: no block_influence column; recompute the similarity step")
            influence = frame["block_influence"].to_numpy(dtype=np.float64)
        else:
            influence = 1.0 - np.diag(cosine, 1)
        return cls(np.asarray(cosine, dtype=np.float64), np.asarray(angular, dtype=np.float64), influence)


@dataclass
class SearchInputs:
    """What a model-reading choice (SLEB, LaCo, SLM) gets: the model block by block and the tokens."""

    runner: BlockwiseModel
    input_ids: torch.Tensor                 # [n, T] calibration windows
    state_dir: Path | None = None           # resume state; None: no resume
    batch_size: int = 8
    log: Callable[[str], None] = logger.info
    resident_bytes: int = 8 * 2**30         # blocks kept loaded between trials while they fit in this


@dataclass
class Built:
    """One output layer: its tensors (names relative to the layer prefix), widths and statistics."""

    tensors: dict[str, torch.Tensor]
    stats: dict = field(default_factory=dict)
    shape: object | None = None  # BlockShape of the tensors; None: the model's own block shape
    hidden_out: torch.Tensor | None = None  # the layer's output on the calibration input, if build ran it


@dataclass
class BuildContext:
    """What `build` gets besides the layer: the model, the plan and the compute settings."""

    runner: BlockwiseModel
    plan: Plan
    batch_size: int
    output_shape: object  # BlockShape every output layer is saved with
    log: Callable[[str], None] = logger.info

    def source_tensors(self, block: int) -> dict[str, torch.Tensor]:
        """Block `block`'s tensors as stored (names relative to its prefix), on the host."""
        return self.runner.checkpoint.tensors(self.runner.adapter.layer_prefix(block))

    def save_dtypes(self, block: int) -> dict[str, torch.dtype]:
        """The dtype the source checkpoint stores each of block `block`'s tensors in."""
        from ..checkpoint import SAFETENSORS_DTYPES

        prefix = self.runner.adapter.layer_prefix(block)
        return {name[len(prefix):]: SAFETENSORS_DTYPES[info["dtype"]]
                for name, info in self.runner.checkpoint.headers.items() if name.startswith(prefix)}


class Method:
    """Base class: subclasses set the class attributes and implement `choose` and `build`."""

    name: ClassVar[str]
    chooses_with: ClassVar[str] = "similarity"   # "similarity": plan rule; "model": search rule
    fits: ClassVar[bool] = False                 # build() needs calibration hidden states
    reads_plan_file: ClassVar[bool] = False      # a target's plan_file (flattening groups) replaces its choice
    OPTIONS: ClassVar[dict] = {}                 # option -> default
    CHOICE_OPTIONS: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""

    def __init__(self, options: dict | None = None):
        options = {k: v for k, v in (options or {}).items() if k != "method"}
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise MethodError(f"method {self.name}: unknown option(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(self.OPTIONS)) or 'none'}")
        self.options = {**self.OPTIONS, **options}
        self.check_options()

    # ------------------------------------------------------------------ options

    def check_options(self) -> None:
        """Raise MethodError naming the option when a value is out of range (the schema checks types)."""

    @classmethod
    def choice_source(cls, options: dict) -> str:
        """Where this method chooses with these options: "similarity" (plan rule) or "model" (search rule)."""
        return cls.chooses_with

    @classmethod
    def choice_options(cls, options: dict) -> dict:
        return {k: options[k] for k in cls.CHOICE_OPTIONS if k in options}

    @classmethod
    def fit_options(cls, options: dict) -> dict:
        return {k: v for k, v in options.items() if k in cls.OPTIONS and k not in cls.CHOICE_OPTIONS}

    def recorded_options(self) -> dict:
        """Every option with the value used (defaults filled in), for plan.json and compression.json."""
        return dict(self.options)

    # ------------------------------------------------------------------ the two steps

    def choose(self, k: int, *, views: SimilarityViews | None = None, search: SearchInputs | None = None,
               target: dict | None = None) -> Plan:
        """The plan that removes k blocks (the driver fills in parameter counts and provenance)."""
        raise NotImplementedError

    def build(self, ctx: BuildContext, layer: Layer, hidden: torch.Tensor | None) -> Built:
        """The tensors of output layer `layer`; `hidden` is its calibration input when `fits`."""
        return build_standard(ctx, layer)

    def plan_from_partition(self, num_layers: int, groups: list[list[int]]) -> Plan:
        """This method's plan for a partition of the blocks into runs (the Python API's list of groups)."""
        return Plan.from_groups(num_layers, groups, method=self.name)

    def max_removable(self, num_layers: int) -> int:
        """The most blocks this method can remove from a model of `num_layers` blocks with its options."""
        return num_layers - 1

    def output_shape(self, adapter, plan: Plan):
        """The block shape every output layer is saved with (one uniform checkpoint)."""
        return adapter.shape


def build_standard(ctx: BuildContext, layer: Layer) -> Built:
    """The layers every method builds the same way: keep (a bit-exact copy) and merge (linear combination)."""
    if layer.op == "keep":
        return Built(ctx.source_tensors(layer.base), {"op": "keep", "blocks": layer.blocks})
    if layer.op == "merge":
        from .merging import merge_tensors

        return Built(merge_tensors(ctx, layer), {"op": "merge", "blocks": layer.blocks,
                                                 "weights": {str(b): w for b, w in layer.weights.items()}})
    raise MethodError(f"layer {layer.to_json()}: this method cannot build a {layer.op!r} layer")


def protection(options: dict, target: dict | None, default: bool) -> tuple[bool, bool]:
    """(protect_first, protect_last): the method's option, else the target's, else the method's default."""
    target = target or {}
    resolved = []
    for key in ("protect_first", "protect_last"):
        value = options.get(key)
        if value is None:
            value = target.get(key)
        resolved.append(default if value is None else bool(value))
    return resolved[0], resolved[1]

"""Heatmaps and bar charts of the similarity views, written atomically.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot state, no display),
so plotting works on headless cluster nodes and from several threads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .provenance import atomic_path

MAX_TICKS = 16


def _tick_step(n: int) -> int:
    return max(1, math.ceil(n / MAX_TICKS))


def _save(figure: Figure, path: str | Path) -> None:
    path = Path(path)
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        # the temporary name ends in .tmp, so the format must be given explicitly
        figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")


def heatmap(matrix: np.ndarray, labels: Sequence[str], title: str, path: str | Path,
            groups: Sequence[Sequence[int]] | None = None, cmap: str = "viridis") -> None:
    """A labelled heatmap with a colorbar; `groups` (lists of block indices) are outlined in red.

    A group of blocks a..c is drawn over rows and columns a..c: the inputs of its blocks, whose
    similarity S[a, c] decided the merge.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    size = min(12.0, 4.0 + 0.2 * n)
    figure = Figure(figsize=(size + 1.5, size))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap=cmap, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = list(range(0, n, _tick_step(n)))
    if n - 1 not in ticks:
        ticks.append(n - 1)
    axes.set_xticks(ticks, [labels[i] for i in ticks], rotation=90)
    axes.set_yticks(ticks, [labels[i] for i in ticks])
    axes.set_title(title)
    for group in groups or []:
        if len(group) > 1:
            start, span = group[0] - 0.5, len(group)
            axes.add_patch(Rectangle((start, start), span, span, fill=False, edgecolor="red", linewidth=1.5))
    _save(figure, path)


def bar(values: Sequence[float], labels: Sequence[str], title: str, path: str | Path,
        xlabel: str | None = None, ylabel: str | None = None) -> None:
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    figure = Figure(figsize=(min(14.0, 4.0 + 0.25 * n), 4.0))
    axes = figure.add_subplot()
    axes.bar(np.arange(n), values, color="tab:blue")
    ticks = list(range(0, n, _tick_step(n)))
    axes.set_xticks(ticks, [labels[i] for i in ticks])
    axes.set_title(title)
    if xlabel:
        axes.set_xlabel(xlabel)
    if ylabel:
        axes.set_ylabel(ylabel)
    axes.grid(axis="y", alpha=0.3)
    _save(figure, path)


# how each source block fares in a plan: colour of its cell in the overlay strip
FATE_COLOURS = {"keep": "#d9d9d9", "dropped": "#d62728", "flatten": "#1f77b4", "merge": "#2ca02c",
                "patch": "#9467bd"}


def plan_overlay(matrix: np.ndarray, labels: Sequence[str], plans: dict[str, dict], title: str,
                 path: str | Path) -> None:
    """The cosine heatmap over one strip per method: every source block coloured by its fate.

    `plans` maps a method's name to its plan.json record. In a strip, a multi-block output layer
    (flattened, merged, patched) is one bar over its blocks; dropped blocks are red. The heatmap
    outlines the groups of the first plan with flattened groups.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    num_layers = n - 1
    size = min(12.0, 4.0 + 0.2 * n)
    rows = max(1, len(plans))
    figure = Figure(figsize=(size + 1.5, size + 0.35 * rows + 0.8))
    grid = figure.add_gridspec(2, 1, height_ratios=[size, 0.35 * rows + 0.4], hspace=0.25)
    axes = figure.add_subplot(grid[0])
    image = axes.imshow(matrix, cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = list(range(0, n, _tick_step(n)))
    axes.set_xticks(ticks, [labels[i] for i in ticks], rotation=90)
    axes.set_yticks(ticks, [labels[i] for i in ticks])
    axes.set_title(title)
    outlined = next((p for p in plans.values() if any(l["op"] == "flatten" for l in p.get("layers", []))), None)
    for layer in (outlined or {}).get("layers", []):
        if len(layer["blocks"]) > 1:
            start, span = layer["blocks"][0] - 0.5, len(layer["blocks"])
            axes.add_patch(Rectangle((start, start), span, span, fill=False, edgecolor="red", linewidth=1.5))

    strip = figure.add_subplot(grid[1])
    for row, (name, plan) in enumerate(plans.items()):
        y = rows - 1 - row
        for block in plan.get("dropped_blocks", []):
            strip.add_patch(Rectangle((block - 0.5, y - 0.4), 1, 0.8, color=FATE_COLOURS["dropped"]))
        for layer in plan.get("layers", []):
            blocks = layer["blocks"]
            strip.add_patch(Rectangle((blocks[0] - 0.45, y - 0.4), len(blocks) - 0.1, 0.8,
                                      color=FATE_COLOURS.get(layer["op"], "black")))
    strip.set_xlim(-0.5, num_layers - 0.5)
    strip.set_ylim(-0.6, rows - 0.4)
    strip.set_yticks(range(rows), list(reversed(list(plans))))
    block_ticks = list(range(0, num_layers, _tick_step(num_layers)))
    strip.set_xticks(block_ticks, [str(b) for b in block_ticks])
    strip.set_xlabel("source block")
    handles = [Rectangle((0, 0), 1, 1, color=colour) for colour in FATE_COLOURS.values()]
    # above the strip: below it the legend would cover the axis label
    strip.legend(handles, ["kept", "dropped", "flattened", "merged", "patched"], ncols=5, fontsize="small",
                 loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    _save(figure, path)
